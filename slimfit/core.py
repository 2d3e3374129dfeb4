"""The :class:`SlimFit` facade: inter-layer scheduling, optimizer-state policy and activation compression.

One iteration of the user's loop (the only two lines SlimFit adds are the constructor and ``sf.step()``)::

    loss.backward()
    optimizer.step()   # pre-hook: snapshot (a sample of) the K trainable layers ("before"), see slimfit.scoring
    sf.step()          # score them against "after", choose the next K, flip requires_grad
    optimizer.zero_grad()
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from slimfit import ops
from slimfit.distributed import broadcast_indices, check_process_group, is_distributed, source_rank
from slimfit.layers import Layer, reject_sharded_parameters, split_parameters, unwrap_model
from slimfit.memory import DecodeMeter, SavedTensorMeter
from slimfit.models import PatchHandle, patch
from slimfit.nn.column_blocks import whole_sizes
from slimfit.optim_state import OPTIMIZER_STATE_POLICIES, OptimizerStateManager
from slimfit.policy import DEFAULT_POLICY, CompressionPolicy
from slimfit.scheduler import (
    DEFAULT_FREEZE_RATIO,
    DEFAULT_REVISIT_ROUNDS,
    DEFAULT_SMALL_SHARE,
    FREEZE_UNITS,
    InterLayerScheduler,
)
from slimfit.scoring import SCORING_MODES, UpdateScorer, as_number

METRICS = tuple(ops.NORM_EPS)
"""How a layer's update is scored (slimfit.ops.update_norms): first the default."""
_STATE_FORMAT = 1


@dataclass
class SlimFitStats:
    """Telemetry counters, saved with :meth:`SlimFit.state_dict`.

    Attributes:
        steps: calls to :meth:`SlimFit.step`.
        scored_steps: steps in which the trainable layers were scored.
        skipped_steps: steps with no ``optimizer.step()`` since the previous one (e.g. GradScaler skipped it), or
            whose step updated nothing (a fused Adam that GradScaler told of an inf); the trainable set is kept.
        nonfinite_scores: layer scores rejected because they were NaN or infinite.
        thaws: layers that changed from frozen to trainable.
    """

    steps: int = 0
    scored_steps: int = 0
    skipped_steps: int = 0
    nonfinite_scores: int = 0
    thaws: int = 0


class SlimFit:
    """Memory-efficient full fine-tuning: train only the ``K`` layers that are still moving.

    Args:
        model: the model to fine-tune; a ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``
            wrapper is accepted and its inner module is used. Patched in place.
        optimizer: a ``torch.optim.Optimizer`` (or a wrapper with an ``.optimizer`` attribute, as accelerate
            uses) holding every parameter of ``model`` that requires grad.
        freeze_ratio: fraction of the layers' parameters (with ``freeze_unit="layers"``, of the layers) frozen at
            each step, in ``[0, 1)``; with layers, ``K = max(1, round((1 - freeze_ratio) * N))`` of the ``N``
            layers train.
        freeze_unit: what ``freeze_ratio`` counts. ``"parameters"`` (default): the trained layers hold at most
            ``(1 - freeze_ratio)`` of all layers' elements; layers are taken by score while they fit, so
            one large layer gives way to several small ones (LayerNorm weights cost almost nothing), and gradient
            memory is bounded by the budget. A layer larger than the whole budget is not scheduled (it stays
            frozen; a warning names it). ``"layers"`` (the original SlimFit): ``K`` layers, whatever their size,
            so a 23M-element embedding and a 384-element LayerNorm weight take one slot each. ``"parameters"``
            was chosen on validation splits of three tasks at 0.9 (README, "Accuracy at high freeze ratios").
        metric: how a layer's update is scored: ``"rel_l1_mean"`` (default; the original SlimFit's
            ``mean |(W1 - W0) / W0|`` with ``|W0|`` floored at 1e-8) or ``"rel_l2"`` (``||W1 - W0||_2 /
            ||W0||_2``). ``rel_l1_mean`` is dominated by a layer's smallest weights, so a weight initialised to
            exactly zero keeps a huge score and trains every step; prefer ``rel_l2`` for such models. Measured on
            MiniLM-L6 / BBC News (freeze-only, 0.9, 2 epochs, seed 0): ``rel_l1_mean`` 93.7 vs 91.0 accuracy at
            lr 5e-5 and 96.9 vs 94.6 at lr 2e-4; under Adam ``rel_l2`` ranks layers by ``1 / rms(W)`` and keeps
            training the same few (e.g. the token-type embedding).
        optimizer_state: ``"offload"`` (default), ``"keep"`` or ``"drop"``; see :mod:`slimfit.optim_state`.
            ``"offload"`` keeps the original algorithm's numerics (Adam moments survive a freeze) while only
            the trainable layers' state occupies accelerator memory.
        compression: what patched modules save for backward (:class:`slimfit.policy.CompressionPolicy`;
            ``"default"`` is an alias of :data:`slimfit.policy.DEFAULT_POLICY`), or ``None`` to leave the
            model's modules untouched (results then equal plain freezing exactly).
        train_biases: whether biases and other 1-D parameters that are not normalisation weights train
            (always) or stay frozen (always).
        seed: seed of the warm-up order; ``None`` uses ``torch.initial_seed()``, so runs are reproducible
            under ``torch.manual_seed``.
        process_group: the ``torch.distributed`` group whose ranks train this model together (the group given
            to DDP); ``None`` is the whole job. Its first rank's seed and scores decide for all its members.
        scoring: ``"auto"`` (default) scores the update of each layer a ``torch.optim.Adam``/``AdamW`` steps
            exactly from the optimizer's moments, with no copy of the weights (float32/float64 layers), and other
            layers on a sample of their elements which, with the values gathered to score them, takes at most 1%
            of the layer's bytes (tiny layers such as LayerNorm weights are copied whole); ``"exact"`` copies the
            layers ``"auto"`` would sample whole before the step; ``"sampled"`` samples every layer. See
            :mod:`slimfit.scoring` for both ways and the sample's measured error.
        always_train: names of modules (as in ``model.named_modules()``) whose parameters train at every step and
            are not scheduled, e.g. a freshly initialised classification head: scheduled with the rest, a new head
            trains in one step of ``N / K`` and the pretrained body learns against a head that barely moves.
            ``N`` and ``K`` count the scheduled layers only.
        revisit_rounds: a bound on how long a layer stays frozen once scored, in rounds of ``ceil(N / K)`` steps
            (the warm-up's length; with ``freeze_unit="parameters"``, the scheduled elements over the budget): a
            layer frozen for ``revisit_rounds`` rounds trains at the next step, ahead of the score ranking (longest
            frozen first, within the budget). A frozen layer keeps the score of its last visit while the rest of
            the model moves; the bound re-measures it. ``3`` (default) was chosen on a validation split of BBC News
            (see README); ``None``: no bound, as the original SlimFit. The freeze ratio is unchanged.
        small_layer_share: with ``freeze_unit="parameters"`` (counting layers it has no effect and is recorded as
            ``None``), every scheduled layer holding at most this share of
            the largest scheduled layer's elements (a float in ``(0, 1]``) trains at every step, its elements taken
            from the budget (smallest first, while the rest of the budget still holds the largest layer); the
            others are packed by score. Packed by score too, such layers train only when the large layers ranked
            above them leave room, which can starve them (:mod:`slimfit.scheduler`). ``0.125`` (default; on BERT
            and ViT: normalisation weights, small embeddings and heads, not attention matrices) was chosen on
            validation splits (see README); ``None``: every layer packed by score.

    Under ``torch.distributed`` (world size > 1) every rank of ``process_group`` must construct SlimFit and call
    :meth:`step` together: the group's first rank's seed and scores decide, so all ranks train the same layers
    even when their RNGs differ. Wrap the model in DDP before constructing SlimFit, with
    ``find_unused_parameters=True`` (see :mod:`slimfit.distributed`).

    Layers are parameters with more than one dimension plus normalisation weights (:mod:`slimfit.layers`).
    After construction and after every :meth:`step`, exactly ``K`` of them (``freeze_unit="layers"``), or layers holding
    at most ``num_trainable`` elements (``"parameters"``), have ``requires_grad=True``.

    Learning rates: each update score is divided by the rate the layer's parameter group had at that step, so
    scores taken during warm-up or decay stay comparable; where the group's ``lr`` is not a number (``None``:
    transformers' ``Adafactor(relative_step=True, lr=None)``) the score is the raw update. A layer whose group has
    a learning rate of 0 at construction (its ``initial_lr`` when an LR scheduler has set one, so a warm-up that
    starts at 0 does not count) would never move: it is not scheduled, stays frozen (with the group's biases)
    until :meth:`remove`, and is not among the ``N`` layers, so ``K`` is a share of the layers that can train.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        freeze_ratio: float = DEFAULT_FREEZE_RATIO,
        metric: str = METRICS[0],
        optimizer_state: str = OPTIMIZER_STATE_POLICIES[0],
        compression: CompressionPolicy | str | None = DEFAULT_POLICY,
        train_biases: bool = True,
        seed: int | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        scoring: str = SCORING_MODES[0],
        always_train: Sequence[str] = (),
        freeze_unit: str = FREEZE_UNITS[0],
        revisit_rounds: int | None = DEFAULT_REVISIT_ROUNDS,
        small_layer_share: float | None = DEFAULT_SMALL_SHARE,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizer = _unwrap_optimizer(optimizer)
        _check_freeze_ratio(freeze_ratio)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
        if optimizer_state not in OPTIMIZER_STATE_POLICIES:
            raise ValueError(
                f"optimizer_state must be one of {list(OPTIMIZER_STATE_POLICIES)}, got {optimizer_state!r}"
            )
        if freeze_unit not in FREEZE_UNITS:
            raise ValueError(f"freeze_unit must be one of {list(FREEZE_UNITS)}, got {freeze_unit!r}")
        if revisit_rounds is not None and (
            not isinstance(revisit_rounds, int) or isinstance(revisit_rounds, bool) or revisit_rounds < 1
        ):
            raise ValueError(f"revisit_rounds must be a positive int or None, got {revisit_rounds!r}")
        if small_layer_share is not None and (
            not isinstance(small_layer_share, float | int)
            or isinstance(small_layer_share, bool)
            or not 0 < small_layer_share <= 1
        ):
            raise ValueError(f"small_layer_share must be a number in (0, 1] or None, got {small_layer_share!r}")
        if not isinstance(train_biases, bool):
            raise ValueError(f"train_biases must be a bool, got {train_biases!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        check_process_group(process_group)
        if isinstance(compression, str) and compression == "default":
            compression = DEFAULT_POLICY
        if compression is not None and not isinstance(compression, CompressionPolicy):
            raise ValueError(f"compression must be a CompressionPolicy, 'default' or None, got {compression!r}")

        self.model = unwrap_model(model)
        reject_sharded_parameters(self.model)
        self.optimizer = optimizer
        self.freeze_ratio = float(freeze_ratio)
        self.metric = metric
        self.train_biases = train_biases
        self.stats = SlimFitStats()

        split = split_parameters(self.model)
        always = _always_trained(self.model, always_train)
        # Layer names (as in layer_names) of what always trains, for reports of which layers trained when.
        self.always_trained: list[str] = [layer.name for layer in split.layers if layer.name in always]
        split = dataclasses.replace(
            split,
            layers=tuple(layer for layer in split.layers if layer.name not in always),
            auxiliary=tuple((name, p) for name, p in split.auxiliary if name not in always),
        )
        if not split.layers:
            raise ValueError(
                f"model ({type(self.model).__name__}) has no candidate layers: SlimFit schedules parameters that "
                "require grad and have more than one dimension or are normalisation weights"
            )
        trained = [(layer.name, layer.param) for layer in split.layers] + (
            list(split.auxiliary) if train_biases else []
        )
        trained += [(name, p) for name, p in self.model.named_parameters() if name in always]
        _check_optimizer_holds(optimizer, trained)
        # A layer whose group never moves (base rate 0) would keep one of the K slots forever: not scheduled.
        base_rate = {
            id(p): as_number(group.get("initial_lr", group.get("lr")))
            for group in optimizer.param_groups
            for p in group["params"]
        }
        self.layers: tuple[Layer, ...] = tuple(layer for layer in split.layers if base_rate[id(layer.param)] != 0.0)
        if not self.layers:
            raise ValueError(
                f"all {len(split.layers)} candidate layers are in optimizer parameter groups with learning rate 0; "
                "SlimFit schedules only layers whose group has a non-zero (or unknown) rate"
            )
        # Nothing in such a group can move, so its biases need no gradient either.
        candidates = [layer.param for layer in split.layers] + [p for _, p in split.auxiliary]
        unscheduled = [p for p in candidates if base_rate.get(id(p)) == 0.0]
        self.freeze_unit = freeze_unit
        costs = None
        if freeze_unit == "layers":
            self.num_trainable = max(1, round((1.0 - self.freeze_ratio) * len(self.layers)))
        else:
            total = sum(layer.param.numel() for layer in self.layers)
            smallest = min(layer.param.numel() for layer in self.layers)
            self.num_trainable = max(smallest, round((1.0 - self.freeze_ratio) * total))
            too_large = [layer for layer in self.layers if layer.param.numel() > self.num_trainable]
            if too_large:
                warnings.warn(
                    f"slimfit: {', '.join(f'{x.name} ({x.param.numel():,})' for x in too_large)} "
                    f"{'is' if len(too_large) == 1 else 'are'} larger than the per-step budget of "
                    f"{self.num_trainable:,} parameters (freeze_ratio={self.freeze_ratio}) and "
                    f"{'stays' if len(too_large) == 1 else 'stay'} frozen",
                    RuntimeWarning,
                    stacklevel=2,
                )
                unscheduled += [layer.param for layer in too_large]
                self.layers = tuple(layer for layer in self.layers if layer.param.numel() <= self.num_trainable)
            costs = [layer.param.numel() for layer in self.layers]

        # Every rank of a distributed job must warm up in the same order: the group's first rank's seed rules.
        self._process_group = process_group
        (seed,) = broadcast_indices([torch.initial_seed() if seed is None else seed], process_group)
        generator = torch.Generator().manual_seed(seed)
        # A round: the steps the whole budget needs to hold every scheduled element once (with small layers taking
        # part of the budget at every step, the warm-up itself can be a step or so longer).
        round_steps = math.ceil((len(self.layers) if costs is None else sum(costs)) / self.num_trainable)
        self.revisit_rounds = revisit_rounds
        max_frozen_steps = None if revisit_rounds is None else revisit_rounds * round_steps
        # Counting layers every layer costs the same: none is small, and the setting is recorded as None so that
        # states of either kind load alike.
        self.small_layer_share = None if costs is None or small_layer_share is None else float(small_layer_share)
        # A column block (slimfit.nn.column_blocks) is judged small or not by its whole matrix; None where no
        # layer is a block, so that states of models without blocks stay as they were.
        whole = whole_sizes(self.model)
        sizes = None
        if costs is not None and whole:
            sizes = [whole.get(id(x.param), c) for x, c in zip(self.layers, costs, strict=True)]
        self.scheduler = InterLayerScheduler(
            len(self.layers), self.num_trainable, generator, costs, max_frozen_steps, self.small_layer_share, sizes
        )
        params = [layer.param for layer in self.layers]
        self._scorer = UpdateScorer(params, metric, scoring, seed, optimizer)  # checks scoring
        self._state = OptimizerStateManager(optimizer, optimizer_state)

        # Everything above only checks; from here on the model changes (patching first: it may refuse).
        self._patch: PatchHandle = patch(self.model, compression)
        self._original_requires_grad = {name: p.requires_grad for name, p in self.model.named_parameters()}
        for _, p in split.auxiliary:
            p.requires_grad_(train_biases)
        for name, p in self.model.named_parameters():
            if name in always:
                p.requires_grad_(True)
        for p in unscheduled:
            p.requires_grad_(False)
        self._trainable: list[int] = []
        self._apply_trainable(self.scheduler.trainable)

        self._stepped = False
        self._warned_missing_step = False
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_optimizer_step),
            optimizer.register_state_dict_pre_hook(lambda _opt: self._state.synchronize()),
            optimizer.register_load_state_dict_post_hook(lambda _opt: self._state.reload(self._frozen_params())),
        ]
        self._removed = False

    # ------------------------------------------------------------------ schedule

    @property
    def max_frozen_steps(self) -> int | None:
        """The bound ``revisit_rounds`` sets, in steps (``None``: no bound)."""
        return self.scheduler.max_frozen_steps

    @property
    def layer_names(self) -> list[str]:
        """Names of all ``N`` schedulable layers, in ``model.named_parameters()`` order."""
        return [layer.name for layer in self.layers]

    def trainable_layers(self) -> list[str]:
        """Names of the ``K`` layers that train at the next step."""
        return [self.layers[i].name for i in self._trainable]

    def step(self) -> None:
        """Score the layers that just trained and choose the next trainable set.

        Call once per ``optimizer.step()``, after it and before the next forward pass.
        """
        self._check_active()
        self.stats.steps += 1
        stepped, self._stepped = self._stepped, False
        if not stepped:
            self.stats.skipped_steps += 1
        indices: list[int] = []
        scores = torch.empty(0)
        if self._scorer.holding:
            indices, scores = self._scorer.score()
            if self._scorer.skipped:  # the step ran but updated nothing (fused Adam, GradScaler found an inf)
                self.stats.skipped_steps += 1
            else:
                if is_distributed(self._process_group):
                    # Ranks hold identical weights, but a one-ulp difference in a score could still flip a tie
                    # and split the trainable sets; the group's first rank's scores decide for everyone.
                    group = self._process_group
                    torch.distributed.broadcast(scores, src=source_rank(group), group=group)
                self.stats.scored_steps += 1
        rejected = self.scheduler.step(indices, scores)
        if rejected:
            self.stats.nonfinite_scores += len(rejected)
            names = ", ".join(self.layers[i].name for i in rejected[:5]) + (", ..." if len(rejected) > 5 else "")
            warnings.warn(
                f"slimfit: non-finite update score for {len(rejected)} layer(s) ({names}) at step "
                f"{self.scheduler.step_count}; keeping their previous scores",
                RuntimeWarning,
                stacklevel=2,
            )
        self._apply_trainable(self.scheduler.trainable)

    def _before_optimizer_step(self, _optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        if self._stepped and not self._warned_missing_step:
            self._warned_missing_step = True
            warnings.warn(
                "slimfit: optimizer.step() ran twice without SlimFit.step() in between; the same layers keep "
                "training until sf.step() is called (call it after every optimizer.step())",
                RuntimeWarning,
                stacklevel=3,
            )
        self._stepped = True
        # Keep the first snapshot if the optimizer steps twice between sf.step() calls: a copied or sampled
        # layer's score then covers the whole change. When every layer trains there is nothing to choose, so nothing
        # to copy.
        if not self._scorer.holding and self.scheduler.chooses:
            rate_of = {
                id(p): as_number(group.get("lr")) for group in self.optimizer.param_groups for p in group["params"]
            }
            self._scorer.snapshot(self._trainable, [rate_of[id(self.layers[i].param)] for i in self._trainable])

    def _apply_trainable(self, trainable: list[int]) -> None:
        old, new = set(self._trainable), set(trainable)
        frozen = [self.layers[i].param for i in sorted(old - new)]
        thawed = [self.layers[i].param for i in sorted(new - old)]
        if not old:  # construction: every layer not chosen starts frozen
            frozen = [layer.param for i, layer in enumerate(self.layers) if i not in new]
        for p in frozen:
            p.requires_grad_(False)
            p.grad = None  # a stale gradient would let the optimizer keep moving a frozen layer
        for p in thawed:
            p.requires_grad_(True)
        self._state.freeze(frozen)
        self._state.thaw(thawed)
        self.stats.thaws += len(thawed) if old else 0
        self._trainable = sorted(new)

    def _frozen_params(self) -> list[torch.Tensor]:
        trainable = set(self._trainable)
        return [layer.param for i, layer in enumerate(self.layers) if i not in trainable]

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Scheduler state (scores, warm-up order, step, trainable set), the seed of the scoring sample and
        telemetry, as JSON-safe Python values.

        Take it between ``sf.step()`` and the next ``optimizer.step()`` (where checkpoints are normally
        written); together with the model's and optimizer's state dicts and the RNG state it continues the
        run exactly.
        """
        return {
            "format": _STATE_FORMAT,
            "layer_names": self.layer_names,
            "layer_shapes": [list(layer.param.shape) for layer in self.layers],
            "freeze_ratio": self.freeze_ratio,
            "freeze_unit": self.freeze_unit,
            "revisit_rounds": self.revisit_rounds,
            "small_layer_share": self.small_layer_share,
            "metric": self.metric,
            "scheduler": self.scheduler.state_dict(),
            "scoring_seed": self._scorer.seed,
            "stats": asdict(self.stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, including every layer's ``requires_grad`` flag.

        Raises ValueError if the state was saved for different layers or a different ``freeze_ratio``.
        Loading the optimizer's state before or after this call both work.
        """
        self._check_active()
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"state must be a SlimFit state_dict (format {_STATE_FORMAT}), got {type(state).__name__}")
        saved_unit = state.get("freeze_unit", "layers")  # states from before freeze units existed counted layers
        if saved_unit != self.freeze_unit:
            raise ValueError(f"state was saved with freeze_unit={saved_unit!r}, this SlimFit has {self.freeze_unit!r}")
        saved_rounds = state.get("revisit_rounds")  # states from before the bound existed had none
        if saved_rounds != self.revisit_rounds:
            raise ValueError(
                f"state was saved with revisit_rounds={saved_rounds!r}, this SlimFit has {self.revisit_rounds!r}"
            )
        saved_share = state.get("small_layer_share")  # states from before the rule existed packed every layer
        if saved_share != self.small_layer_share:
            raise ValueError(
                f"state was saved with small_layer_share={saved_share!r}, this SlimFit has {self.small_layer_share!r} "
                "(pass the saved value, CLI --small-layer-share 0 for None)"
            )
        names = list(state["layer_names"])
        if names != self.layer_names:
            diff = next((f"{a!r} vs {b!r}" for a, b in zip(names, self.layer_names, strict=False) if a != b), "")
            raise ValueError(
                f"state was saved for a different model: {len(names)} layers vs {len(self.layer_names)} here"
                + (f", first difference {diff}" if diff else "")
            )
        for name, saved, layer in zip(names, state["layer_shapes"], self.layers, strict=True):
            if list(saved) != list(layer.param.shape):
                raise ValueError(
                    f"state was saved for a different model: layer {name!r} has shape {tuple(saved)} there "
                    f"and {tuple(layer.param.shape)} here"
                )
        if not math.isclose(float(state["freeze_ratio"]), self.freeze_ratio, rel_tol=0.0, abs_tol=1e-12):
            raise ValueError(
                f"state was saved with freeze_ratio={state['freeze_ratio']}, this SlimFit has {self.freeze_ratio}"
            )
        if state["metric"] != self.metric:
            raise ValueError(f"state was saved with metric={state['metric']!r}, this SlimFit has {self.metric!r}")
        self.scheduler.load_state_dict(state["scheduler"])
        # The sample's seed, so that the resumed run scores the same elements (older states have none).
        self._scorer.seed = int(state.get("scoring_seed", self._scorer.seed))
        self._scorer.clear()
        self._stepped = False
        self._apply_trainable(self.scheduler.trainable)
        self.stats = SlimFitStats(**state["stats"])  # after the switch above, which counts thaws

    # ------------------------------------------------------------------ accounting and teardown

    @property
    def uncompressed_modules(self) -> list[str]:
        """``"name (ClassName...)"`` of the modules that keep what backward needs uncompressed: modules of kinds
        slimfit does not handle, and attention modules found at their first forward not to run compressed."""
        return self._patch.unsupported

    @property
    def scoring_bytes(self) -> int:
        """The most bytes scoring has held at once since construction: the snapshot taken before an optimizer
        step (sampled values and their int64 positions, or whole copies) plus the values gathered after it to
        score them, or the blocks rebuilt from Adam's moments after it. It lives from ``optimizer.step()`` to
        :meth:`step`, hence a peak rather than a current value."""
        return self._scorer.peak_bytes

    def memory_report(self, inputs: Any = None) -> dict[str, int]:
        """Bytes currently held, by category.

        Keys: ``weights`` (all parameters), ``trainable_weights`` (those with ``requires_grad``), ``gradients``,
        ``optimizer_state`` (on the parameters' device), ``optimizer_state_offloaded`` (in host memory for
        accelerator parameters), ``scoring`` (:attr:`scoring_bytes`: a peak, the snapshot only lives across the
        optimizer step), and ``cuda_max_memory_allocated`` when the model is on CUDA.
        ``uncompressed_modules`` is the number of modules named in :attr:`uncompressed_modules` (a count, not
        bytes), so a report never hides that part of the model saved its activations in full.

        With ``inputs`` (a dict of keyword arguments, a tuple of positional ones, or a single tensor for the
        model), also ``saved_activations``: the bytes the autograd graph holds for backward after one forward
        pass on them with the current trainable set, measured by :class:`slimfit.memory.SavedTensorMeter`, and
        ``temporaries``: the most bytes of compressed activations decoded and alive at once while that graph
        is differentiated (:class:`slimfit.memory.DecodeMeter`; 0 without compression). The
        backward differentiates the output's ``loss`` where it has one, else the sum of its first floating
        tensor; every ``.grad`` is put back as it was. The pass runs in train mode on a forked RNG,
        so it leaves the training run's random stream alone.
        """
        self._state.synchronize()
        params = list(self.model.parameters())
        on_device, offloaded = self._state.nbytes(params)
        report = {
            "weights": sum(_nbytes(p) for p in params),
            "trainable_weights": sum(_nbytes(p) for p in params if p.requires_grad),
            "gradients": sum(_nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer_state": on_device,
            "optimizer_state_offloaded": offloaded,
            "scoring": self.scoring_bytes,
        }
        if inputs is not None:
            report["saved_activations"], report["temporaries"] = self._measure_forward_backward(inputs)
        report["uncompressed_modules"] = len(self.uncompressed_modules)
        devices = {p.device for p in params if p.device.type == "cuda"}
        if devices:
            report["cuda_max_memory_allocated"] = sum(torch.cuda.max_memory_allocated(d) for d in devices)
        return report

    def _measure_forward_backward(self, inputs: Any) -> tuple[int, int]:
        """Saved activation bytes after a forward on ``inputs``, and the backward's compression temporaries."""

        def forward() -> Any:
            if isinstance(inputs, dict):
                return self.model(**inputs)
            return self.model(*inputs) if isinstance(inputs, tuple) else self.model(inputs)

        # Fork the generators of whatever accelerator holds the model (CUDA, XPU, MPS, ...), not only CUDA's.
        accelerated = {p.device for p in self.model.parameters() if p.device.type not in ("cpu", "meta")}
        device_type = next(iter(accelerated)).type if accelerated else "cuda"
        was_training = self.model.training
        try:
            with torch.random.fork_rng(devices=sorted({d.index or 0 for d in accelerated}), device_type=device_type):
                self.model.train()
                with SavedTensorMeter(exclude=self.model) as saved:
                    output = forward()
                saved_bytes = saved.live_bytes
                target = _differentiable_scalar(output)
                # A real backward (reentrant checkpointing refuses autograd.grad), then every .grad put back.
                grads = {p: p.grad for p in self.model.parameters()}
                for p in grads:
                    p.grad = None  # backward would add into an existing .grad in place
                try:
                    with DecodeMeter() as decoded:
                        if target is not None:
                            target.backward()
                finally:
                    for p, grad in grads.items():
                        p.grad = grad
                return saved_bytes, decoded.peak_bytes
        finally:
            self.model.train(was_training)

    def remove(self) -> None:
        """Undo SlimFit: original modules, original ``requires_grad`` flags, optimizer state back on device.

        Optimizer state dropped under ``optimizer_state="drop"`` is not recreated (the optimizer starts it
        afresh). Calling it twice is harmless.
        """
        if self._removed:
            return
        self._patch.remove()
        for hook in self._hooks:
            hook.remove()
        self._state.restore_all()
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._original_requires_grad.get(name, p.requires_grad))
        self._scorer.clear()
        self._removed = True

    def _check_active(self) -> None:
        if self._removed:
            raise RuntimeError("this SlimFit was removed; create a new one to continue scheduling")

    def __repr__(self) -> str:
        return (
            f"SlimFit(layers={len(self.layers)}, freeze_unit={self.freeze_unit!r}, trainable={self.num_trainable}, "
            f"freeze_ratio={self.freeze_ratio}, revisit_rounds={self.revisit_rounds}, "
            f"small_layer_share={self.small_layer_share}, "
            f"metric={self.metric!r}, scoring={self._scorer.mode!r}, optimizer_state={self._state.policy!r}, "
            f"step={self.scheduler.step_count})"
        )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _differentiable_scalar(output: Any) -> torch.Tensor | None:
    """What to differentiate in a model's output: its ``loss`` if set, else the sum of its first floating tensor
    that requires grad (tuples, lists, dicts and ``ModelOutput`` searched in order); None if there is none."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        return loss.sum()
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else [output]
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.requires_grad:
                return value.float().sum()
        elif isinstance(value, (tuple, list, dict)):
            found = _differentiable_scalar(value)
            if found is not None:
                return found
    return None


def unknown_modules(model: nn.Module, modules: Sequence[str]) -> list[str]:
    """The names in ``modules`` that name no submodule of ``model`` (the empty name, the model itself, included)."""
    found = dict(model.named_modules())
    return [name for name in modules if name not in found or not name]


def _always_trained(model: nn.Module, modules: Sequence[str]) -> set[str]:
    """Names of the parameters of ``modules`` (module names of ``model``); an unknown name is a ValueError."""
    if isinstance(modules, str):
        raise ValueError(f"always_train must be a sequence of module names, got the string {modules!r}")
    unknown = unknown_modules(model, modules)
    if unknown:
        raise ValueError(f"always_train: {unknown[0]!r} is not a module of {type(model).__name__}")
    found = dict(model.named_modules())
    return {f"{name}.{p}" for name in modules for p, _ in found[name].named_parameters()}


def _check_freeze_ratio(freeze_ratio: Any) -> None:
    ok = isinstance(freeze_ratio, numbers.Real) and not isinstance(freeze_ratio, bool)  # numpy floats too
    if not ok or not 0.0 <= freeze_ratio < 1.0:  # NaN fails the comparison too
        raise ValueError(f"freeze_ratio must be a number in [0, 1), got {freeze_ratio!r}")


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer whose ``step`` actually runs (accelerate's AcceleratedOptimizer wraps one)."""
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def _check_optimizer_holds(optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.Tensor]]) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in named if id(p) not in held]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(
            f"optimizer does not hold {len(missing)} of the model's {len(named)} trainable parameters ({shown}); "
            "build it from model.parameters() (after any wrapping that replaces parameters)"
        )
