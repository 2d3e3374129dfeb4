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

    ``activations`` is the largest number of bytes held for backward by a measured forward pass: what the
    autograd graph saved (saved-tensor hooks: what the method really keeps, compressed or not) plus, under
    activation checkpointing, the inputs each checkpointed block keeps for its recomputation and what one block
    saves when backward recomputes it (measured by running the first checkpointed block once more, without
    checkpointing, on a forked RNG); ``gradients`` the largest
    ``.grad`` total after a backward; ``optimizer_state`` the largest optimizer state on the model's device
    after a step (``optimizer_state_host`` what SlimFit offloaded to host memory, on CUDA only); ``scoring`` the
    most bytes SlimFit's update scoring held (:attr:`slimfit.SlimFit.scoring_bytes`: its snapshot across the
    optimizer step; 0 for methods without SlimFit); ``temporaries`` the most bytes of compressed activations
    decoded at once in backward (:class:`slimfit.memory.DecodeMeter`; 0 without compression); ``total`` the sum
    of those peaks and ``weights`` (an upper bound: the peaks need not coincide). On CUDA,
    ``cuda_max_memory_allocated`` adds what the allocator itself saw, workspace and temporaries included.

    With ``profile_decodes``, :attr:`decodes` profiles what backward decoded, so that
    :mod:`slimfit.finetune.estimate` can scale temporaries to larger batches (chunked decodes stop growing).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, profile_decodes: bool = False
    ) -> None:
        self._memory = memory
        self.decodes = memory.DecodeProfile() if profile_decodes else None
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.peaks = {"weights": memory.parameter_bytes(model), "gradients": 0, "optimizer_state": 0}
        self.peaks["activations"] = 0
        self.peaks["scoring"] = 0
        self.peaks["temporaries"] = 0
        self.last_activation_bytes = 0
        if device.type == "cuda":
            self.peaks["optimizer_state_host"] = 0
            torch.cuda.reset_peak_memory_stats(device)

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Measure the bytes saved for backward by the forward pass run inside."""
        held: dict[int, int] = {}
        recomputed: list[int] = []
        hooks = [
            module.register_forward_pre_hook(functools.partial(_record_inputs, held, recomputed), with_kwargs=True)
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
        self.last_activation_bytes = meter.live_bytes + sum(held.values()) + sum(recomputed)
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

    @contextlib.contextmanager
    def backward(self) -> Iterator[None]:
        """Measure the compressed activations decoded at once by the backward pass run inside."""
        with self._memory.DecodeMeter(self.decodes) as meter:
            yield
        self._peak("temporaries", meter.peak_bytes)

    def _peak(self, category: str, value: int) -> None:
        self.peaks[category] = max(self.peaks[category], value)

    def report(self) -> dict[str, int]:
        """Bytes by category (see the class docstring)."""
        report = dict(self.peaks)
        report["total"] = sum(v for k, v in self.peaks.items() if k != "optimizer_state_host")
        if self.device.type == "cuda":
            report["cuda_max_memory_allocated"] = self._memory.cuda_peak_bytes(self.device)
        return report


def _record_inputs(held: dict[int, int], recomputed: list[int], module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a checkpointed block: bytes of its (non-parameter) tensor inputs, by storage; at the
    first block of a forward, also what the block saves for backward when it is recomputed."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            storage = value.untyped_storage()
            held[storage.data_ptr()] = storage.nbytes()
    if not recomputed and module.training and torch.is_grad_enabled():
        recomputed.append(_saved_without_checkpointing(module, args, kwargs))


def _saved_without_checkpointing(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """Bytes ``module`` saves for backward in a forward without checkpointing, as during its recomputation. The
    RNG is forked so the real forward (and the recomputation, which replays its RNG state) see the same draws."""
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    # Its inputs are held for the recomputation already (counted apart), and weights are never activations.
    inputs = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    module.gradient_checkpointing = False
    try:
        with torch.random.fork_rng(devices=devices):
            forward = functools.partial(module.forward, *args, **kwargs)
            return memory.measure_saved_bytes(forward, exclude=[*module.parameters(), *inputs])
    finally:
        module.gradient_checkpointing = True
