"""What a fine-tuning run measured (:class:`RunResult`) and the files and table it becomes.

Output folders are written whole or not at all: :func:`staged_output` writes into a hidden folder and moves the
results into place only when everything was written. ``--output`` may already hold the Trainer checkpoints of the
run (``--save-steps``), which a failed run keeps so that it can be resumed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimfit.data import DataError
from slimfit.finetune.options import BUNDLED_DATA, FinetuneConfig
from slimfit.memory import DecodeProfile

# activation_bytes is empty on the steps the memory meter did not watch (metered False: the timed ones).
STEP_LOG_FIELDS = ("step", "epoch", "loss", "lr", "seconds", "trainable_layers", "activation_bytes", "metered")
MODEL_FOLDER = "model"  # the fine-tuned model, a plain Hugging Face model folder (see save_model)
RUN_FILES = ("metrics.json", "steps.csv", "loss.png", "memory.png", "layers.png")  # write_run's
RESULT_FILES = (*RUN_FILES, MODEL_FOLDER)  # what `slimfit finetune` leaves in --output
_CHECKPOINT = re.compile(r"checkpoint-\d+")


@dataclass
class RunResult:
    """What one run measured. Memory is in bytes; ``schedule[s][i]`` is True when layer ``i`` trained at step ``s``.

    ``metrics`` are the task's metrics after the last epoch (fractions), ``eval_log`` those after every epoch.
    """

    task: str
    method: str
    freeze_ratio: float | None
    seed: int
    lr: float
    metrics: dict[str, float]
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
    # Predicted peak bytes of full fine-tuning with the same model, batch and length (slimfit.finetune.estimate).
    full_estimate: dict[str, int] | None = None
    # What backward decoded, profiled in simulations for slimfit.finetune.estimate (None in real runs).
    decodes: DecodeProfile | None = None
    # What --memory-budget chose (slimfit.finetune.budget.Choice.as_dict), None without a budget.
    memory_budget: dict[str, Any] | None = None


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def render_table(result: RunResult) -> str:
    """The end-of-run summary printed in the terminal."""
    method = result.method + (f" (freeze ratio {result.freeze_ratio})" if result.freeze_ratio is not None else "")
    rows = [("task", result.task), ("method", method)]
    labels = _METRIC_LABELS if result.task in ("classification", "image-classification") else {}
    rows += [(labels.get(name, name.replace("_", " ")), f"{value:.4f}") for name, value in result.metrics.items()]
    rows += [
        ("steps", str(result.steps)),
        ("time per step", f"{result.seconds_per_step:.3f} s ({result.device})"),
        ("total time", f"{result.seconds:.1f} s"),
    ]
    if result.memory_budget is not None:
        budget = result.memory_budget
        rows.append(
            (
                "memory budget",
                f"{human_bytes(budget['budget'])} (predicted {human_bytes(budget['predicted']['total'])})",
            )
        )
    rows += _memory_rows(result.memory, result.full_estimate)
    if result.uncompressed_modules is not None:
        rows.append(("uncompressed modules", ", ".join(result.uncompressed_modules) or "none"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _memory_rows(memory: dict[str, int], full: dict[str, int] | None) -> list[tuple[str, str]]:
    """One row per category; with ``full``, full fine-tuning's predicted bytes next to each."""
    if full is None:
        return [(f"memory: {category}", human_bytes(value)) for category, value in memory.items()]
    rows = [("memory", f"{'this run':>10}  full fine-tuning (predicted)")]
    for category, value in memory.items():
        other = human_bytes(full[category]) if category in full else "-"
        rows.append((f"memory: {category}", f"{human_bytes(value):>10}  {other}"))
    return rows


def render_memory(memory: dict[str, int]) -> str:
    """Bytes by category, one per line (`slimfit estimate`)."""
    rows = [(category, human_bytes(value)) for category, value in memory.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in rows)


def config_record(config: FinetuneConfig, task: Any) -> dict[str, Any]:
    """The run's options as metrics.json and `slimfit estimate --json` record them (model and data by name)."""
    return {**asdict(config), "model": task.model_name, "data": describe_data(config)}


_METRIC_LABELS = {"f1": "macro-F1"}  # classification's F1 is the macro average over classes


def describe_data(config: FinetuneConfig) -> str:
    return config.data or BUNDLED_DATA


def write_run(result: RunResult, config: FinetuneConfig, folder: Path, task: Any) -> None:
    """metrics.json, steps.csv, and the plots (loss.png, memory.png, layers.png) of one run, into ``folder``."""
    from slimfit import plots

    metrics = {
        **result.metrics,
        "task": result.task,
        "lr": result.lr,
        "memory": result.memory,
        "memory_full_estimate": result.full_estimate,
        "memory_budget": result.memory_budget,
        "uncompressed_modules": result.uncompressed_modules,
        "steps": result.steps,
        "seconds": result.seconds,
        "seconds_per_step": result.seconds_per_step,
        "device": result.device,
        "evaluations": result.eval_log,
        "labels": task.label_names,
        "examples": task.examples,
        "config": config_record(config, task),
    }
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (folder / "steps.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=STEP_LOG_FIELDS)
        writer.writeheader()
        writer.writerows(result.step_log)
    plots.loss_curve(result.step_log, folder / "loss.png", title=f"{result.method}: training loss")
    bars = {result.method: result.memory}
    if result.full_estimate is not None:
        bars["full fine-tuning (predicted)"] = result.full_estimate
    plots.memory_bars(bars, folder / "memory.png", title="Peak memory by category")
    plots.layer_heatmap(result.layers, result.schedule, folder / "layers.png", title=f"{result.method}: layers trained")


def save_model(model: nn.Module, processor: Any, folder: Path) -> None:
    """The trained model as a Hugging Face model folder that ``--model`` takes: ``save_pretrained`` weights and
    config, and the tokenizer or image processor. LoRA's adapters are merged into the weights (peft's
    ``merge_and_unload``, which changes ``model`` in place), so the folder holds the plain model."""
    if hasattr(model, "merge_and_unload"):  # a peft model
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def refuse_existing_output(target: Path, checkpoints_allowed: bool = False) -> None:
    """--output must be a new or empty folder (results of different runs are never mixed); when resuming it may
    hold the Trainer checkpoints of the run being resumed, and nothing else."""
    if not target.exists():
        return
    entries = list(target.iterdir()) if target.is_dir() else None
    if entries is None or any(not (checkpoints_allowed and _CHECKPOINT.fullmatch(e.name)) for e in entries):
        allowed = " or holds only checkpoint-* folders" if checkpoints_allowed else ""
        raise DataError(f"--output: {target} already exists and is not an empty folder{allowed}; choose a new one")


@contextlib.contextmanager
def staged_output(path: str | os.PathLike[str], checkpoints_allowed: bool = False) -> Iterator[Path]:
    """Write into a hidden temporary folder next to ``path`` and move the results into ``path`` only on success.

    ``path`` must not exist or be an empty folder, or (``checkpoints_allowed``) hold only Trainer checkpoints;
    checked again at the end, so a folder filled meanwhile is not overwritten. On failure the temporary folder is
    removed, so no half-written result is ever left behind.
    """
    target = Path(path)
    refuse_existing_output(target, checkpoints_allowed)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    # mkdtemp makes the folder private (0700); the result should get the permissions of any new folder.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        refuse_existing_output(target, checkpoints_allowed)
        if target.exists() and any(target.iterdir()):
            for entry in staging.iterdir():  # next to the checkpoints, one rename per file
                entry.rename(target / entry.name)
            staging.rmdir()
        else:
            if target.exists():
                target.rmdir()
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
