"""Inter-layer scheduling (ILS): from per-layer scores to the next trainable set.

Pure bookkeeping over layer indices ``0 .. N-1``; it knows nothing about models or optimizers.

* Every step exactly ``K`` layers train.
* A layer that has never been scored is *pending*. Pending layers are chosen before scored ones, in a
  random order drawn once at construction (the *warm-up order*), so the first ``ceil(N / K)`` steps are a
  random round-robin in which every layer trains at least once. This replaces the original SlimFit trick
  of initialising scores with huge random values, which a genuinely large score could beat.
* After a step, the layers that trained get a fresh score; frozen layers keep theirs. The next set is
  the pending layers in warm-up order followed by the scored layers by descending score (ties broken by
  layer index), cut at ``K``.
* A non-finite score is rejected: the layer keeps its previous score (or stays pending), so one bad step
  cannot poison the schedule.

The warm-up order is the only random draw, so it is the scheduler's whole RNG state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class InterLayerScheduler:
    """Chooses which ``num_trainable`` of ``num_layers`` layers train at each step.

    Args:
        num_layers: number of schedulable layers ``N`` (at least 1).
        num_trainable: layers trained per step ``K``, ``1 <= K <= N``.
        generator: source of the warm-up order; ``None`` uses torch's default generator.
    """

    def __init__(self, num_layers: int, num_trainable: int, generator: torch.Generator | None = None) -> None:
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if (
            not isinstance(num_trainable, int)
            or isinstance(num_trainable, bool)
            or not 1 <= num_trainable <= num_layers
        ):
            raise ValueError(f"num_trainable must be an int in [1, {num_layers}], got {num_trainable!r}")
        self.num_layers = num_layers
        self.num_trainable = num_trainable
        self.scores = torch.zeros(num_layers, dtype=torch.float32)
        self.scored = torch.zeros(num_layers, dtype=torch.bool)
        self.warmup_order = torch.randperm(num_layers, generator=generator)
        self.step_count = 0
        self._trainable = self._select()

    @property
    def trainable(self) -> list[int]:
        """Indices of the layers that train at the current step, ascending."""
        return list(self._trainable)

    def step(self, indices: Sequence[int], scores: torch.Tensor) -> list[int]:
        """Record fresh ``scores`` (float, shape ``[len(indices)]``) for ``indices`` and choose the next set.

        Pass empty ``indices`` for a step in which nothing was updated (e.g. a skipped optimizer step).
        Returns the indices whose score was NaN or infinite; those layers keep their previous score.
        """
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        new = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
        if new.numel() != idx.numel():
            raise ValueError(f"scores must have one value per index ({idx.numel()}), got shape {tuple(new.shape)}")
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < self.num_layers):
            raise ValueError(f"indices must lie in [0, {self.num_layers}), got {idx.tolist()}")
        finite = torch.isfinite(new)
        self.scores[idx[finite]] = new[finite]
        self.scored[idx[finite]] = True
        self.step_count += 1
        self._trainable = self._select()
        return idx[~finite].tolist()

    def _select(self) -> list[int]:
        scored = self.scored.tolist()
        scores = self.scores.tolist()
        pending = [i for i in self.warmup_order.tolist() if not scored[i]]
        ranked = sorted((i for i in range(self.num_layers) if scored[i]), key=lambda i: (-scores[i], i))
        return sorted((pending + ranked)[: self.num_trainable])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the schedule exactly, as plain Python values.

        JSON-safe, so it can live in a Trainer's ``trainer_state.json``: the float32 scores become Python floats,
        which ``json`` writes with ``repr`` (infinities as ``Infinity``) and reads back to the same float32.
        """
        return {
            "num_layers": self.num_layers,
            "num_trainable": self.num_trainable,
            "scores": self.scores.tolist(),
            "scored": self.scored.tolist(),
            "warmup_order": self.warmup_order.tolist(),
            "step": self.step_count,
            "trainable": list(self._trainable),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the layer count and ``K`` must match this scheduler."""
        for key in ("num_layers", "num_trainable"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"scheduler state has {key}={state.get(key)!r}, this scheduler has {getattr(self, key)}"
                )
        order = torch.as_tensor(state["warmup_order"], dtype=torch.long)
        if sorted(order.tolist()) != list(range(self.num_layers)):
            raise ValueError("scheduler state has a warmup_order that is not a permutation of the layers")
        self.scores = torch.as_tensor(state["scores"], dtype=torch.float32).clone().reshape(self.num_layers)
        self.scored = torch.as_tensor(state["scored"], dtype=torch.bool).clone().reshape(self.num_layers)
        self.warmup_order = order.clone()
        self.step_count = int(state["step"])
        self._trainable = sorted(int(i) for i in state["trainable"])
        if len(self._trainable) != self.num_trainable:
            raise ValueError(
                f"scheduler state lists {len(self._trainable)} trainable layers, expected {self.num_trainable}"
            )
