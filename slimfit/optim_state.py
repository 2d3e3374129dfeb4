"""What happens to a layer's optimizer state (``optimizer.state[p]``, e.g. Adam moments) while it is frozen.

* ``"keep"``: untouched, as in the original SlimFit. Costs the full state (2x the weights for Adam) on
  the device for every layer, trained or not.
* ``"drop"``: freed when the layer freezes; the optimizer starts it afresh (step 0, zero moments) when
  the layer thaws. Least memory everywhere, but every thaw restarts Adam's bias correction, so the first
  update of a thawed layer is a full-size, sign-like step.
* ``"offload"``: moved to host memory (pinned, copied asynchronously) when a CUDA layer freezes and
  back when it thaws. Same numerics as ``"keep"`` with device memory like ``"drop"``; host RAM and
  PCIe traffic for the layers that change set each step are the price. Parameters already in host memory
  are left where they are (nothing to gain).

State is only ever moved or freed for frozen layers, which have no gradient, so the optimizer never
touches it while it is away; ``optimizer.state_dict()`` keeps working (offloaded tensors are saved from
host memory, dropped ones are simply absent).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZER_STATE_POLICIES = ("keep", "drop", "offload")


class OptimizerStateManager:
    """Applies one of :data:`OPTIMIZER_STATE_POLICIES` to the state of parameters as they freeze and thaw."""

    def __init__(self, optimizer: torch.optim.Optimizer, policy: str) -> None:
        if policy not in OPTIMIZER_STATE_POLICIES:
            raise ValueError(f"optimizer_state must be one of {list(OPTIMIZER_STATE_POLICIES)}, got {policy!r}")
        self.optimizer = optimizer
        self.policy = policy
        # Keys of optimizer.state[p] moved to host memory, per parameter, so they go back where they were.
        self._offloaded: dict[torch.Tensor, list[str]] = {}
        self._copy_done: torch.cuda.Event | None = None

    def freeze(self, params: Iterable[torch.Tensor]) -> None:
        """Parameters that stopped training: drop or offload their state according to the policy."""
        if self.policy == "drop":
            for p in params:
                self.optimizer.state.pop(p, None)
        elif self.policy == "offload":
            for p in params:
                self._offload(p)

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
        if self._copy_done is not None:
            self._copy_done.synchronize()
            self._copy_done = None

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

    def _offload(self, p: torch.Tensor) -> None:
        if p.device.type == "cpu" or p in self._offloaded or p not in self.optimizer.state:
            return
        state = self.optimizer.state[p]
        moved = []
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device == p.device:
                host = torch.empty(value.shape, dtype=value.dtype, pin_memory=p.device.type == "cuda")
                state[key] = host.copy_(value, non_blocking=True)
                moved.append(key)
        self._offloaded[p] = moved
        if p.device.type == "cuda":
            self._copy_done = torch.cuda.Event()
            self._copy_done.record(torch.cuda.current_stream(p.device))
