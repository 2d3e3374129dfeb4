"""Capture and replay the default RNG of a device, so backward can regenerate forward's random draws."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def rng_state(device: torch.device) -> torch.Tensor:
    """The default generator's state for ``device`` as a uint8 tensor (CPU: 5056 bytes, CUDA: 16 bytes)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "cpu":
        return torch.get_rng_state()
    raise ValueError(f"RNG replay supports cpu and cuda tensors, got device {device}")


@contextlib.contextmanager
def replay(device: torch.device, state: torch.Tensor) -> Iterator[None]:
    """Run the block with ``device``'s default generator set to ``state``, restoring the current state after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield
