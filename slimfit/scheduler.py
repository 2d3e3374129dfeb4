"""Inter-layer scheduling (ILS): from per-layer scores to the next trainable set.

Pure bookkeeping over layer indices ``0 .. N-1``; it knows nothing about models or optimizers.

* Every step the chosen layers' costs add up to at most a budget. With unit costs (the default) the budget is a
  layer count ``K`` and exactly ``K`` layers train; with ``costs`` (e.g. parameter counts) the ranked layers are
  taken in order while they fit, skipping one that does not (a smaller one further down may still fit).
* With costs, a layer holding at most ``small_share`` of the largest layer's cost trains at every step, paid from
  the budget (smallest first, while what is left still holds the largest layer); with ``sizes``, smallness is
  judged on them instead (a column block is as large as its matrix, not small). Packed by score, such a layer
  trains only when the large layers ranked above it happen to leave room for it: on a ViT at freeze ratio 0.9, one
  feed-forward and three attention matrices left 9,619 of a 267,667-element budget, the position embeddings
  (9,600) and LayerNorm weights lost that room to the patch projection, and trained only at revisits.
* A layer that has never been scored is *pending*. Pending layers are chosen before scored ones, in a
  random order drawn once at construction (the *warm-up order*), so the first ``ceil(N / K)`` steps (a few more
  where small layers take part of a costed budget) are a random round-robin in which every layer trains at least
  once. This replaces the original SlimFit trick of initialising scores with huge random values, which a genuinely
  large score could beat.
* After a step, the layers that trained get a fresh score; frozen layers keep theirs. The next set is
  the pending layers in warm-up order followed by the scored layers by descending score (ties broken by
  layer index), cut at the budget.
* With ``max_frozen_steps`` set, a scored layer that has been frozen for that many steps in a row is *due*: due
  layers are chosen after pending ones and before the ranked rest, longest frozen first, so a layer whose last
  score was low is still revisited (its score may have gone stale while the rest of the model moved).
* A non-finite score is rejected: the layer keeps its previous score (or stays pending), so one bad step
  cannot poison the schedule.

The warm-up order is the only random draw, so it is the scheduler's whole RNG state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

FREEZE_UNITS = ("parameters", "layers")
"""What a freeze ratio counts (slimfit.SlimFit's ``freeze_unit``): the layers' parameters (costs = element counts,
the default) or layers (unit costs)."""
DEFAULT_FREEZE_RATIO = 0.9
"""Share of the schedulable layers (or their elements) frozen at each step, unless the caller says otherwise."""
DEFAULT_REVISIT_ROUNDS = 3
"""slimfit.SlimFit's ``revisit_rounds``: a layer frozen this many rounds of the schedule trains next."""
DEFAULT_SMALL_SHARE = 0.125
"""slimfit.SlimFit's ``small_layer_share``: layers at most this share of the largest train at every step (while the
rest of the budget still holds the largest)."""


class InterLayerScheduler:
    """Chooses which of ``num_layers`` layers train at each step, within a budget of ``num_trainable``.

    Args:
        num_layers: number of schedulable layers ``N`` (at least 1).
        num_trainable: the per-step budget: a layer count ``K``, ``1 <= K <= N``, or with ``costs`` the most
            their sum may reach (at least the largest cost, so every layer can train; all train if it is the sum).
        generator: source of the warm-up order; ``None`` uses torch's default generator.
        costs: what each layer takes of the budget (positive ints, one per layer); ``None``: 1 each.
        max_frozen_steps: how many steps in a row a scored layer may stay frozen before it is chosen ahead of the
            ranking (a positive int), or ``None`` for no bound. Due layers that do not fit the budget wait for the
            next step, longest frozen first.
        small_share: with ``costs``, a layer whose cost is at most this share of the largest cost (a float in
            ``(0, 1]``) trains at every step, taking its cost from the budget; ``None``: packed by score like the rest.
        sizes: with ``costs``, what ``small_share`` compares instead of the costs (positive ints, one per layer; the
            whole matrix of a column block); ``None``: the costs.
    """

    def __init__(
        self,
        num_layers: int,
        num_trainable: int,
        generator: torch.Generator | None = None,
        costs: Sequence[int] | None = None,
        max_frozen_steps: int | None = None,
        small_share: float | None = None,
        sizes: Sequence[int] | None = None,
    ) -> None:
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if costs is not None:
            costs = list(costs)
            if not _positive_ints(costs, num_layers):
                raise ValueError(f"costs must be {num_layers} positive ints, got {costs!r}")
        if sizes is not None:
            sizes = list(sizes)
            if costs is None or not _positive_ints(sizes, num_layers):
                raise ValueError(f"sizes must be None or, with costs, {num_layers} positive ints, got {sizes!r}")
        # A layer count lies in [1, N]; a costed budget must hold the largest layer and may exceed the sum.
        accepted = f"in [1, {num_layers}]" if costs is None else f"at least {max(costs)}"
        in_range = isinstance(num_trainable, int) and (
            1 <= num_trainable <= num_layers if costs is None else num_trainable >= max(costs)
        )
        if isinstance(num_trainable, bool) or not in_range:
            raise ValueError(f"num_trainable must be an int {accepted}, got {num_trainable!r}")
        if max_frozen_steps is not None and (
            not isinstance(max_frozen_steps, int) or isinstance(max_frozen_steps, bool) or max_frozen_steps < 1
        ):
            raise ValueError(f"max_frozen_steps must be a positive int or None, got {max_frozen_steps!r}")
        if small_share is not None and (
            not isinstance(small_share, float | int) or isinstance(small_share, bool) or not 0 < small_share <= 1
        ):
            raise ValueError(f"small_share must be a number in (0, 1] or None, got {small_share!r}")
        self.num_layers = num_layers
        self.num_trainable = num_trainable
        self.costs = costs
        self.max_frozen_steps = max_frozen_steps
        self.small_share = None if small_share is None else float(small_share)
        self.sizes = sizes if sizes is not None else costs
        self.every_step = self._every_step()
        self.scores = torch.zeros(num_layers, dtype=torch.float32)
        self.scored = torch.zeros(num_layers, dtype=torch.bool)
        # The step at which each layer last trained (was scored); -1: never.
        self.last_trained = torch.full((num_layers,), -1, dtype=torch.long)
        self.warmup_order = torch.randperm(num_layers, generator=generator)
        self.step_count = 0
        self._trainable = self._select()

    @property
    def chooses(self) -> bool:
        """Whether the budget leaves any layer frozen; otherwise every layer trains at every step."""
        return self.num_trainable < (self.num_layers if self.costs is None else sum(self.costs))

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
        self.last_trained[idx] = self.step_count
        self.step_count += 1
        self._trainable = self._select()
        return idx[~finite].tolist()

    def _every_step(self) -> list[int]:
        """The small layers that train at every step: smallest first, while the rest still holds the largest."""
        if self.costs is None or self.small_share is None:
            return []
        room = self.num_trainable - max(self.costs)
        threshold = self.small_share * max(self.sizes)
        chosen = []
        for i in sorted(range(self.num_layers), key=lambda i: (self.sizes[i], i)):
            if self.costs[i] > room or self.sizes[i] > threshold:
                break
            chosen.append(i)
            room -= self.costs[i]
        return sorted(chosen)

    def _select(self) -> list[int]:
        scored = self.scored.tolist()
        scores = self.scores.tolist()
        pending = [i for i in self.warmup_order.tolist() if not scored[i]]
        due: list[int] = []
        if self.max_frozen_steps is not None:
            # Frozen in steps last + 1 .. step_count - 1; due if freezing it now would exceed the bound.
            last = self.last_trained.tolist()
            overdue = [
                i for i in range(self.num_layers) if scored[i] and self.step_count - last[i] > self.max_frozen_steps
            ]
            due = sorted(overdue, key=lambda i: (last[i], i))
        taken = set(due)
        ranked = sorted(
            (i for i in range(self.num_layers) if scored[i] and i not in taken), key=lambda i: (-scores[i], i)
        )
        order = pending + due + ranked
        if self.costs is None:
            return sorted(order[: self.num_trainable])
        small = set(self.every_step)
        chosen, left = [], self.num_trainable
        for i in self.every_step + [i for i in order if i not in small]:
            if self.costs[i] <= left:
                chosen.append(i)
                left -= self.costs[i]
        return sorted(chosen)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the schedule exactly, as plain Python values.

        JSON-safe, so it can live in a Trainer's ``trainer_state.json``: the float32 scores become Python floats,
        which ``json`` writes with ``repr`` (infinities as ``Infinity``) and reads back to the same float32.
        """
        return {
            "num_layers": self.num_layers,
            "num_trainable": self.num_trainable,
            "costs": self.costs,
            "max_frozen_steps": self.max_frozen_steps,
            "small_share": self.small_share,
            "sizes": self.sizes,
            "scores": self.scores.tolist(),
            "scored": self.scored.tolist(),
            "last_trained": self.last_trained.tolist(),
            "warmup_order": self.warmup_order.tolist(),
            "step": self.step_count,
            "trainable": list(self._trainable),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the layer count and ``K`` must match this scheduler."""
        # States from before sizes existed judged small layers on their costs.
        state = {"sizes": state.get("costs"), **state}
        for key in ("num_layers", "num_trainable", "costs", "max_frozen_steps", "small_share", "sizes"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"scheduler state has {key}={state.get(key)!r}, this scheduler has {getattr(self, key)}"
                )
        order = torch.as_tensor(state["warmup_order"], dtype=torch.long)
        if sorted(order.tolist()) != list(range(self.num_layers)):
            raise ValueError("scheduler state has a warmup_order that is not a permutation of the layers")
        self.scores = torch.as_tensor(state["scores"], dtype=torch.float32).clone().reshape(self.num_layers)
        self.scored = torch.as_tensor(state["scored"], dtype=torch.bool).clone().reshape(self.num_layers)
        # States written before the bound existed carry no last_trained (and no bound): never trained is exact
        # enough, as nothing reads it without a bound.
        last = state.get("last_trained", [-1] * self.num_layers)
        self.last_trained = torch.as_tensor(last, dtype=torch.long).clone().reshape(self.num_layers)
        self.warmup_order = order.clone()
        self.step_count = int(state["step"])
        self._trainable = sorted(int(i) for i in state["trainable"])
        taken = sum(1 if self.costs is None else self.costs[i] for i in self._trainable)
        if (taken != self.num_trainable) if self.costs is None else (taken > self.num_trainable):
            raise ValueError(
                f"scheduler state lists trainable layers that take {taken} of a budget of {self.num_trainable}"
            )


def _positive_ints(values: list, count: int) -> bool:
    return len(values) == count and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
