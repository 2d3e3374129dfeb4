"""What happens to a layer's optimizer state (``optimizer.state[p]``, e.g. Adam moments) while it is frozen.

* ``"keep"``: untouched, as in the original SlimFit. Costs the full state (2x the weights for Adam) on
  the device for every layer, trained or not.
* ``"drop"``: freed when the layer freezes; the optimizer starts it afresh (step 0, zero moments) when
  the layer thaws. Least memory everywhere, but every thaw restarts Adam's bias correction, so the first
  update of a thawed layer is a full-size, sign-like step.
* ``"offload"``: moved to host memory when a layer on an accelerator freezes and back when it thaws
  (pinned and copied asynchronously on the current accelerator: CUDA, XPU, MPS, ...). Same numerics as
  ``"keep"`` with device memory like ``"drop"``; host RAM and PCIe traffic for the layers that change set
  each step are the price. Parameters already in host memory are left where they are (nothing to gain).

Measured on a tiny BERT (2 layers, hidden 32; token-counting task; 300 AdamW steps; mean test accuracy of
3 seeds), ``keep`` (= ``offload``) vs ``drop``: 0.981 vs 0.974 at freeze_ratio 0.5, 0.949 vs 0.939 at 0.8,
0.876 vs 0.884 at 0.9 (full fine-tuning: 0.974). The difference is within seed noise there; ``offload`` is
SlimFit's default because it keeps the published algorithm's numerics at ``drop``'s device memory.

State is only ever moved or freed for frozen layers, which have no gradient, so the optimizer never
touches it while it is away; ``optimizer.state_dict()`` keeps working (offloaded tensors are saved from
host memory, dropped ones are simply absent).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZER_STATE_POLICIES = ("offload", "keep", "drop")
"""Where a frozen layer's Adam moments stay: first the default."""


class OptimizerStateManager:
    """Applies one of :data:`OPTIMIZER_STATE_POLICIES` to the state of parameters as they freeze and thaw."""

    def __init__(self, optimizer: torch.optim.Optimizer, policy: str) -> None:
        if policy not in OPTIMIZER_STATE_POLICIES:
            raise ValueError(f"optimizer_state must be one of {list(OPTIMIZER_STATE_POLICIES)}, got {policy!r}")
        self.optimizer = optimizer
        self.policy = policy
        # Keys of optimizer.state[p] moved to host memory, per parameter, so they go back where they were.
        self._offloaded: dict[torch.Tensor, list[str]] = {}
        # Last device-to-host copy per device; later copies on a stream complete after earlier ones.
        self._copy_done: dict[torch.device, torch.Event] = {}

    def freeze(self, params: Iterable[torch.Tensor]) -> None:
        """Parameters that stopped training: drop or offload their state according to the policy."""
        if self.policy == "drop":
            for p in params:
                self.optimizer.state.pop(p, None)
        elif self.policy == "offload":
            devices = {p.device for p in params if self._offload(p)}
            for device in devices:
                if _pinnable(device):
                    event = self._copy_done[device] = torch.Event(device=device)
                    event.record(torch.accelerator.current_stream(device))

    def thaw(self, params: Iterable[torch.Tensor]) -> None:
        """Parameters that start training: bring offloaded state back to their device."""
        for p in params:
            keys = self._offloaded.pop(p, None)
            if keys is None:
                continue
            state = self.optimizer.state[p]
            for key in keys:
                # Stream-ordered after the device-to-host copy, so no synchronisation is needed here.
                state[key] = state[key].to(p.device, non_blocking=True)

    def reload(self, frozen: Iterable[torch.Tensor]) -> None:
        """Re-establish offloading after ``optimizer.load_state_dict`` put every state tensor back on device.

        Loaded state is never dropped here: the checkpoint may have been written with a different trainable
        set than the current one (``SlimFit.load_state_dict`` may follow), and it already lacks the state that
        was dropped when it was saved.
        """
        self._offloaded.clear()
        if self.policy == "offload":
            self.freeze(frozen)

    def restore_all(self) -> None:
        """Bring every offloaded state back to the device (when SlimFit is removed)."""
        self.thaw(list(self._offloaded))

    def synchronize(self) -> None:
        """Wait for pending device-to-host copies, so host copies can be read (saving, accounting)."""
        for event in self._copy_done.values():
            event.synchronize()
        self._copy_done.clear()

    def nbytes(self, params: Iterable[torch.Tensor]) -> tuple[int, int]:
        """Bytes of optimizer state for ``params``: ``(on the parameter's device, elsewhere, i.e. host)``."""
        on_device = elsewhere = 0
        for p in params:
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor):
                    size = value.numel() * value.element_size()
                    if value.device == p.device:
                        on_device += size
                    else:
                        elsewhere += size
        return on_device, elsewhere

    def _offload(self, p: torch.Tensor) -> bool:
        """Start copying ``p``'s on-device state to host memory; True if anything was moved."""
        if p.device.type == "cpu" or p in self._offloaded or p not in self.optimizer.state:
            return False
        state = self.optimizer.state[p]
        moved = []
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device == p.device:
                # Asynchronous only into pinned memory, where an event on the device's stream says when it is done.
                pinned = _pinnable(p.device)
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=pinned)
                state[key] = host.copy_(value, non_blocking=pinned)
                moved.append(key)
        self._offloaded[p] = moved
        return bool(moved)


def _pinnable(device: torch.device) -> bool:
    """Whether host copies of ``device``'s tensors can be pinned: torch pins memory for the current accelerator."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return accelerator is not None and accelerator.type == device.type
