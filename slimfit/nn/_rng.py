"""Capture and replay the default RNG of a device, so backward can regenerate forward's random draws."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch


def _device_module(device: torch.device) -> ModuleType:
    """``torch.<device type>`` (torch.cuda, torch.xpu, torch.mps, ...), whose RNG functions take a device."""
    try:
        return torch.get_device_module(device.type)
    except RuntimeError as error:
        raise ValueError(
            f"RNG replay needs a device with a default generator (cpu or an accelerator with a torch.<type> "
            f"module), got device {device}"
        ) from error


def rng_state(device: torch.device) -> torch.Tensor:
    """The default generator's state for ``device`` as a uint8 tensor (CPU: 5056 bytes, CUDA: 16 bytes)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return _device_module(device).get_rng_state(device)


@contextlib.contextmanager
def replay(device: torch.device, state: torch.Tensor) -> Iterator[None]:
    """Run the block with ``device``'s default generator set to ``state``, restoring the current state after."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            yield
        return
    module = _device_module(device)
    with torch.random.fork_rng(devices=[device], device_type=device.type):
        module.set_rng_state(state, device)
        yield
