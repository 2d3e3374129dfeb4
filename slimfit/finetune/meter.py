"""Peak memory by category over a fine-tuning run: :class:`PeakMemory`."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from slimfit import memory


class PeakMemory:
    """Peak bytes by category over a training run, measured with :mod:`slimfit.memory`.

    ``activations`` is the largest number of bytes held for backward at the end of a forward pass: what the
    autograd graph saved (saved-tensor hooks: what the method really keeps, compressed or not) plus, under
    activation checkpointing, the inputs each checkpointed block keeps for its recomputation (the one block
    recomputed at a time during backward is not included); ``gradients`` the largest
    ``.grad`` total after a backward; ``optimizer_state`` the largest optimizer state on the model's device
    after a step (``optimizer_state_host`` what SlimFit offloaded to host memory, on CUDA only); ``scoring`` the
    most bytes SlimFit's update scoring held (:attr:`slimfit.SlimFit.scoring_bytes`: its snapshot across the
    optimizer step; 0 for methods without SlimFit); ``total`` the sum of those peaks and ``weights`` (an upper
    bound: the peaks need not coincide). On CUDA,
    ``cuda_max_memory_allocated`` adds what the allocator itself saw, workspace and temporaries included.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self._memory = memory
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.peaks = {"weights": memory.parameter_bytes(model), "gradients": 0, "optimizer_state": 0}
        self.peaks["activations"] = 0
        self.peaks["scoring"] = 0
        self.last_activation_bytes = 0
        if device.type == "cuda":
            self.peaks["optimizer_state_host"] = 0
            torch.cuda.reset_peak_memory_stats(device)

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Measure the bytes saved for backward by the forward pass run inside."""
        held: dict[int, int] = {}
        hooks = [
            module.register_forward_pre_hook(functools.partial(_record_inputs, held), with_kwargs=True)
            for module in self.model.modules()
            if getattr(module, "gradient_checkpointing", False) is True
        ]
        try:
            with self._memory.SavedTensorMeter(self.model) as meter:
                yield
        finally:
            for hook in hooks:
                hook.remove()
        # Activation checkpointing keeps each block's inputs for the recomputation outside autograd's saved
        # tensors, where the meter cannot see them; they are held until backward all the same.
        self.last_activation_bytes = meter.live_bytes + sum(held.values())
        self._peak("activations", self.last_activation_bytes)

    def after_backward(self) -> None:
        self._peak("gradients", self._memory.gradient_bytes(self.model))

    def after_step(self, scoring_bytes: int = 0) -> None:
        """Record the optimizer state after a step, and SlimFit's scoring peak so far (``scoring_bytes``)."""
        self._peak("scoring", scoring_bytes)
        on_device = self._memory.optimizer_state_bytes(self.optimizer, self.device)
        self._peak("optimizer_state", on_device)
        if self.device.type == "cuda":
            self._peak("optimizer_state_host", self._memory.optimizer_state_bytes(self.optimizer) - on_device)

    def _peak(self, category: str, value: int) -> None:
        self.peaks[category] = max(self.peaks[category], value)

    def report(self) -> dict[str, int]:
        """Bytes by category (see the class docstring)."""
        report = dict(self.peaks)
        report["total"] = sum(v for k, v in self.peaks.items() if k != "optimizer_state_host")
        if self.device.type == "cuda":
            report["cuda_max_memory_allocated"] = self._memory.cuda_peak_bytes(self.device)
        return report


def _record_inputs(held: dict[int, int], module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: bytes of the (non-parameter) tensor inputs of a checkpointed block, by storage."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            storage = value.untyped_storage()
            held[storage.data_ptr()] = storage.nbytes()
