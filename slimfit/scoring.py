"""Update scores of the trained layers, without a copy of their weights: :class:`UpdateScorer`.

SlimFit ranks layers by how far their weights moved in the last optimizer step (``metric``: ``rel_l2`` or
``rel_l1_mean``, defined in :func:`slimfit.ops.update_norms`). That needs each trained layer's weights from
before the step. Three ways to get them (``mode``):

* ``"auto"`` (the default): from the optimizer's own update, exactly and without a copy, for every layer that a
  ``torch.optim.Adam`` or ``AdamW`` steps (float32/float64 weights; Trainer's default optimizers are these), a
  sample (below) for any other.
* ``"exact"``: from the optimizer's update where ``"auto"`` can, a whole copy taken before the step elsewhere
  (MiniLM's word embedding alone: 45 MiB).
* ``"sampled"``: a sample of each layer's elements, compared with the same elements after the step.

From the optimizer's update: after an Adam step, its state holds the step count ``t`` and the moments ``m``, ``v``
(``max_exp_avg_sq`` under ``amsgrad``) the step used, so with the group's ``lr``, ``betas``, ``eps`` and
``weight_decay`` read before the step the update is ``u = lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) +
eps)`` and the weights before it ``W0 = (W1 + u) / (1 - lr * weight_decay)`` (decoupled decay, AdamW) or ``W0 = W1
+ u`` (Adam, whose decay is inside ``m``). Both are rebuilt in blocks whose two temporaries take at most 1% of the
bytes of the layers scored that way at that step (at least :data:`MIN_SAMPLE` elements), and reduced to the score
in float64. It equals the copy's score to float32 rounding (``tests/test_scoring.py`` compares them under every
Adam option). A layer whose step count did not advance while others' did (no gradient) did not move and scores 0;
when no layer's advanced, the step updated nothing (a fused Adam that a GradScaler told of an inf runs and undoes
its count) and nothing is scored. If the optimizer stepped twice between scorings (SlimFit warns), only the last
step's update counts, rebuilt with the first step's hyperparameters.

The sample of a layer of ``n`` elements of ``e`` bytes:

* Size: ``m = floor(0.01 n e / (2e + 8))`` elements, at least :data:`MIN_SAMPLE`: the before values, the after
  values gathered for scoring and the int64 positions of ``m`` elements together take at most 1% of the layer's
  bytes (for layers of at least 102,400 float32 or 153,600 16-bit elements). Smaller layers get
  :data:`MIN_SAMPLE` elements (at most 4 KiB in float32), and a layer whose whole copy is no larger than that
  (``n e <= 256 (2e + 8)``: up to 1,024 float32 elements, e.g. LayerNorm weights) is copied whole and scored
  exactly.
* Which: ``rel_l2`` (a ratio of sums of squares) uses ``m`` uniform pseudo-random positions. ``rel_l1_mean`` is
  the mean of ``|ΔW| / |W|``, dominated by the few weights nearest zero (``1/|W|`` is heavy-tailed), which a
  uniform sample misses: on MiniLM a uniform sample of 1,024 elements was off by 41% on average and found 6 of
  the 10 highest-scoring layers. So half its sample is the ``m/2`` elements with the smallest ``|W|`` before
  the step, counted exactly, and half uniform positions outside them, standing for the rest:
  ``score = (sum over the smallest of |ΔW|/|W| + (n - m/2) * mean over the uniform ones) / n``.
* Determinism: uniform positions are drawn independently over the whole flattened layer (no stride, so no
  column pattern) from a generator seeded by the scorer's seed and the layer's position: the same every step,
  on every rank, and after :meth:`slimfit.SlimFit.load_state_dict` (the seed is saved). The smallest-``|W|`` half
  depends only on the weights, which ranks and a resumed run share. It is found in blocks of about 65,536
  elements, so no full-size temporary is made.

Estimator error of the sample, measured with ``benchmarks/bench_scoring.py`` (pretrained MiniLM-L6 on BBC News,
AdamW lr 2e-4, batches of 16 x 64 tokens, freeze ratio 0.9, K = 5 of 54 layers; sampled and exact scores of the
same layers at every step of one epoch; ``benchmarks/results/scoring-2026-11-30-cpu.md``): relative error
``|sampled - exact| / exact`` per layer, mean 0.085 for ``rel_l1_mean`` (worst layer of a step: median 0.17, worst
0.79) and 0.020 for ``rel_l2`` (0.040, 0.19). The next trainable set chosen from sampled scores equalled the exact
one at 65% (``rel_l1_mean``) and 78% (``rel_l2``) of the steps after the warm-up, otherwise differing by one layer
(two, at worst, for ``rel_l1_mean``): mean overlap 0.92 and 0.96. Scoring memory: 0.47 MiB vs 47.0 MiB for full
copies (1.0%), when the word embedding trains.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass

import torch

from slimfit import ops

SCORING_MODES = ("auto", "exact", "sampled")
"""How UpdateScorer reads a layer's update (see the module docstring): first the default."""
MIN_SAMPLE = 256
"""Fewest elements sampled from a layer that is not copied whole (and fewest rebuilt at a time from Adam's moments)."""
BUDGET = 0.01
"""Share of a layer's bytes its sample may take (before and after values and positions); share of the bytes of
the layers scored from Adam's moments at a step that the temporaries of rebuilding them may take."""
_POSITION_BYTES = 8  # int64: what torch.take indexes with
_BLOCK = 1 << 16  # elements read at a time when looking for a layer's smallest weights
_ADAMS = (torch.optim.Adam, torch.optim.AdamW)  # exact types: a subclass may step differently
_REBUILT_DTYPES = (torch.float32, torch.float64)  # 16-bit weights round away much of an update: copy or sample


def _sampled_element_bytes(element_size: int) -> int:
    """What one sampled element costs: its value before the step, after it, and its position."""
    return 2 * element_size + _POSITION_BYTES


def sample_size(numel: int, element_size: int) -> int:
    """Elements sampled from a layer of ``numel`` elements of ``element_size`` bytes; ``numel``: copied whole."""
    per_element = _sampled_element_bytes(element_size)
    if numel * element_size <= MIN_SAMPLE * per_element:
        return numel
    return max(MIN_SAMPLE, int(numel * element_size * BUDGET) // per_element)


def sample_bytes(numel: int, element_size: int) -> int:
    """Bytes the scorer holds to score one sampled layer's update: a whole copy of a layer too small to sample,
    else the before and after values and the positions of its sample (with ``rel_l1_mean`` at most this: uniform
    draws that repeat a smallest weight are dropped)."""
    size = sample_size(numel, element_size)
    return numel * element_size if size == numel else size * _sampled_element_bytes(element_size)


@dataclass(frozen=True)
class _AdamStep:
    """The hyperparameters an Adam step of one layer ran with, read before it ran."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool
    steps_before: float  # the layer's step count before the step (0: no state yet)


@dataclass
class _Taken:
    """One layer's part of a snapshot."""

    layer: int
    rate: float | None
    before: torch.Tensor | None  # the whole weight, or the values at ``positions``; None: rebuilt from ``adam``
    positions: torch.Tensor | None  # flat row-major positions (int64) of ``before``; None: copied whole
    smallest: int  # the first ``smallest`` positions are the layer's smallest weights (rel_l1_mean), counted exactly
    adam: _AdamStep | None = None


class UpdateScorer:
    """Snapshot the trained layers before an optimizer step, score their update after it.

    Args:
        params: the ``N`` schedulable layers' weights, by layer position.
        metric: ``"rel_l2"`` or ``"rel_l1_mean"`` (see :func:`slimfit.ops.update_norms`).
        mode: ``"auto"``, ``"exact"`` or ``"sampled"`` (see the module docstring).
        seed: seed of the sampled positions (every rank must pass the same).
        optimizer: the optimizer that steps ``params``; without one (or for optimizers other than Adam/AdamW)
            ``"auto"`` samples and ``"exact"`` copies.

    Attributes:
        peak_bytes: the most bytes the scorer has held at once (snapshot, plus the after values it gathers to
            score or the blocks it rebuilds from the optimizer's moments), since construction.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        metric: str,
        mode: str = "auto",
        seed: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if mode not in SCORING_MODES:
            raise ValueError(f"scoring must be one of {list(SCORING_MODES)}, got {mode!r}")
        self.params = params
        self.metric = metric
        self.mode = mode
        self.seed = seed
        self.optimizer = optimizer
        self.peak_bytes = 0
        self.skipped = False  # whether the last score() found that the step updated nothing (see _step_skipped)
        self._snapshot: list[_Taken] | None = None

    @property
    def holding(self) -> bool:
        """Whether a snapshot waits to be scored."""
        return self._snapshot is not None

    @property
    def held_bytes(self) -> int:
        """Bytes the snapshot holds now (0 when there is none)."""
        return sum(_nbytes(t.before) + _nbytes(t.positions) for t in self._snapshot or ())

    def snapshot(self, layers: list[int], rates: list[float | None]) -> None:
        """Copy what scoring ``layers`` will need; ``rates`` are their learning rates at this step."""
        groups = {} if self.optimizer is None else {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        self._snapshot = [
            self._take(layer, rate, groups.get(id(self.params[layer])))
            for layer, rate in zip(layers, rates, strict=True)
        ]
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def clear(self) -> None:
        """Drop the snapshot unscored (a loaded checkpoint or :meth:`slimfit.SlimFit.remove`)."""
        self._snapshot = None

    def score(self) -> tuple[list[int], torch.Tensor]:
        """Score the snapshot's layers against their weights now, and drop the snapshot.

        Returns the layers that could move (learning rate None or above 0; a zero rate moved nothing and tells
        nothing) and their scores divided by their rates (None: the raw score), float32. A layer moves in
        proportion to its rate: dividing it out keeps scores taken under warm-up or decay comparable.
        """
        held = self.held_bytes
        snapshot, self._snapshot = self._snapshot or [], None
        moved = [t for t in snapshot if t.rate is None or t.rate > 0.0]
        self.skipped = self._step_skipped(moved)
        if not moved or self.skipped:
            return [], torch.empty(0)
        copied = [t for t in moved if t.adam is None]
        before: list[torch.Tensor] = []
        after: list[torch.Tensor] = []
        gathered = 0
        for t in copied:
            weight = self.params[t.layer].detach()
            now = weight if t.positions is None else torch.take(weight, t.positions)
            gathered += 0 if t.positions is None else _nbytes(now)
            cut = [t.smallest] if t.smallest else []
            before += t.before.tensor_split(cut)
            after += now.tensor_split(cut)
        self.peak_bytes = max(self.peak_bytes, held + gathered)
        values = iter(_update_norms(before, after, self.metric).tolist() if before else [])
        # Rebuilt blocks are sized so that their two temporaries take at most 1% of the rebuilt layers' bytes.
        rebuild_bytes = int(BUDGET * sum(_nbytes(self.params[t.layer]) for t in moved if t.adam is not None))
        scores = []
        for t in moved:
            if t.adam is not None:
                scores.append(self._rebuilt_score(t.layer, t.adam, rebuild_bytes))
            elif t.smallest:  # the smallest weights counted exactly, the uniform part standing for the rest
                n = self.params[t.layer].numel()
                smallest, rest = next(values), next(values)
                scores.append((t.smallest * smallest + (n - t.smallest) * rest) / n)
            else:
                scores.append(next(values))
        rates = [1.0 if t.rate is None else t.rate for t in moved]
        result = torch.tensor(scores, dtype=torch.float64) / torch.tensor(rates, dtype=torch.float64)
        return [t.layer for t in moved], result.to(torch.float32).to(self.params[moved[0].layer].device)

    def _step_skipped(self, taken: list[_Taken]) -> bool:
        """Whether the optimizer's step ran without updating anything: no rebuilt layer's step count moved. A fused
        Adam under a GradScaler that found an inf runs its step (so the snapshot was taken) and undoes the count;
        scoring its layers 0 would keep them frozen for good."""
        rebuilt = [t for t in taken if t.adam is not None]
        return bool(rebuilt) and all(
            _step_count(self.optimizer, self.params[t.layer]) == t.adam.steps_before for t in rebuilt
        )

    def _rebuilt_score(self, layer: int, adam: _AdamStep, budget: int) -> float:
        """The layer's score from its weights now and the Adam step that moved them (module docstring)."""
        param = self.params[layer]
        state = self.optimizer.state.get(param, {})
        steps = _step_count(self.optimizer, param)
        if steps == adam.steps_before:  # the step passed it by (no gradient) while others moved: it did not move
            return 0.0
        now = param.detach().reshape(-1)
        first = state["exp_avg"].detach().reshape(-1)
        second = state["max_exp_avg_sq" if adam.amsgrad else "exp_avg_sq"].detach().reshape(-1)
        step_size = adam.lr / (1.0 - adam.beta1**steps)
        root_correction = math.sqrt(1.0 - adam.beta2**steps)
        shrink = 1.0 - adam.lr * adam.weight_decay if adam.decoupled else 1.0
        eps = ops.NORM_EPS[self.metric]
        moved = torch.zeros((), dtype=torch.float64, device=now.device)
        size = torch.zeros((), dtype=torch.float64, device=now.device)
        block = max(MIN_SAMPLE, budget // (2 * now.element_size()))
        for start in range(0, now.numel(), block):
            end = start + block
            before = second[start:end].sqrt().div_(root_correction).add_(adam.eps)  # Adam's denominator
            torch.div(first[start:end], before, out=before)
            before.mul_(step_size).add_(now[start:end])  # W0 * shrink = W1 + u
            if shrink != 1.0:
                before.div_(shrink)
            change = torch.sub(now[start:end], before)
            if self.metric == "rel_l2":
                moved += change.square_().sum(dtype=torch.float64)
                size += before.square_().sum(dtype=torch.float64)
            else:
                moved += change.abs_().div_(before.abs_().clamp_min_(eps)).sum(dtype=torch.float64)
            self.peak_bytes = max(self.peak_bytes, _nbytes(before) + _nbytes(change))
            del before, change  # before the next block's are made
        if self.metric == "rel_l2":
            return (moved.sqrt() / size.sqrt().clamp_min(eps)).item()
        return (moved / max(now.numel(), 1)).item()

    def _take(self, layer: int, rate: float | None, group: dict | None) -> _Taken:
        adam = None if self.mode == "sampled" or group is None else self._adam_step(self.params[layer], group)
        if adam is not None:
            return _Taken(layer, rate, None, None, 0, adam)
        weight = self.params[layer].detach()
        size = sample_size(weight.numel(), weight.element_size())
        if self.mode == "exact" or size == weight.numel():
            return _Taken(layer, rate, weight.clone(), None, 0)
        smallest = torch.empty(0, dtype=torch.long, device=weight.device)
        if self.metric == "rel_l1_mean":
            smallest = _smallest_magnitudes(weight, size // 2)
        generator = torch.Generator().manual_seed(self._layer_seed(layer))
        uniform = torch.randint(weight.numel(), (size - smallest.numel(),), generator=generator).to(weight.device)
        positions = torch.cat([smallest, uniform[~torch.isin(uniform, smallest)].sort().values])
        return _Taken(layer, rate, torch.take(weight, positions), positions, smallest.numel())

    def _adam_step(self, param: torch.Tensor, group: dict) -> _AdamStep | None:
        """How the coming Adam step will update ``param``, or None where it cannot be rebuilt afterwards."""
        if type(self.optimizer) not in _ADAMS or param.dtype not in _REBUILT_DTYPES or not param.is_contiguous():
            return None
        lr = as_number(group["lr"])
        beta1, beta2 = (as_number(b) for b in group["betas"])
        if lr is None or beta1 is None or beta2 is None:
            return None
        return _AdamStep(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled=bool(group.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW))),
            amsgrad=bool(group["amsgrad"]),
            steps_before=_step_count(self.optimizer, param),
        )

    def _layer_seed(self, layer: int) -> int:
        # A stable hash (Python's hash() of a str changes between processes) of the seed and the layer.
        digest = hashlib.blake2b(f"{self.seed}:{layer}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1


def _smallest_magnitudes(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Flat row-major positions (int64, ascending) of ``count`` entries of ``weight`` nearest zero.

    Read in blocks of whole rows of about :data:`_BLOCK` elements, so temporaries stay block-sized.
    """
    rows = weight.reshape(-1) if weight.dim() < 2 else weight
    row_numel = rows[0].numel() if rows.dim() > 1 else 1
    step = max(1, _BLOCK // row_numel)
    best_values = weight.new_empty(0)
    best_positions = torch.empty(0, dtype=torch.long, device=weight.device)
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].reshape(-1).abs()
        values, positions = block.topk(min(count, block.numel()), largest=False, sorted=False)
        best_values = torch.cat([best_values, values])
        best_positions = torch.cat([best_positions, positions + start * row_numel])
        if best_values.numel() > count:
            best_values, keep = best_values.topk(count, largest=False, sorted=False)
            best_positions = best_positions[keep]
    return best_positions.sort().values


def _step_count(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> float:
    """Adam's step count of ``param`` (0 before its first step)."""
    state = optimizer.state.get(param, {})
    return float(state["step"]) if "step" in state else 0.0


def as_number(value: object) -> float | None:
    """An optimizer hyperparameter as a float (torch optimizers accept one-element tensors); None where it is not
    a number (Adafactor's ``lr=None``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _update_norms(before: list[torch.Tensor], after: list[torch.Tensor], metric: str) -> torch.Tensor:
    """:func:`slimfit.ops.update_norms` with one launch per device (one for a usual model)."""
    by_device: dict[torch.device, list[int]] = {}
    for position, tensor in enumerate(after):
        by_device.setdefault(tensor.device, []).append(position)
    if len(by_device) == 1:
        return ops.update_norms(before, after, metric)
    scores = torch.empty(len(after), dtype=torch.float32, device=after[0].device)
    for positions in by_device.values():
        part = ops.update_norms([before[j] for j in positions], [after[j] for j in positions], metric)
        scores[positions] = part.to(scores.device)
    return scores


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()
