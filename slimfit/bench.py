"""`slimfit bench`: the same task trained with several methods, compared with full fine-tuning of the same run.

Every method uses the same train/eval split (fixed by ``--seed``), the same steps and, per repetition, the same
training seed (head initialisation, shuffling, dropout). Ratios divide each run's numbers by those of full
fine-tuning with the same seed, measured in the same process, so that machine noise and load mostly cancel.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimfit import plots
from slimfit.data import DataError
from slimfit.finetune.loop import check_always_train, run
from slimfit.finetune.options import METHODS, SCHEDULED_METHODS, FinetuneConfig
from slimfit.finetune.report import RunResult, describe_data, human_bytes
from slimfit.tasks.base import Task

UNSCALED_METRICS = frozenset({"perplexity", "eval_loss"})
"""Metrics that are not fractions (language modelling's): shown as they are and compared with full fine-tuning in
their own unit (``<metric>_delta``), where fractions are shown x100 and compared in points (``_delta_points``)."""
LOWER_IS_BETTER = frozenset({"perplexity", "eval_loss", "mse"})
"""Metrics where less is better (the others: accuracy, F1, correlations); the table and plot mark them."""


def delta_key(metric: str) -> str:
    """The summary column of ``metric``'s difference to full fine-tuning (see :data:`UNSCALED_METRICS`)."""
    return f"{metric}_delta" if metric in UNSCALED_METRICS else f"{metric}_delta_points"


def _scale(metric: str) -> float:
    return 1.0 if metric in UNSCALED_METRICS else 100.0


def parse_methods(text: str) -> list[str]:
    """``"slimfit,lora"`` -> ``["full", "slimfit", "lora"]``: full fine-tuning always runs first, as the reference."""
    methods = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise DataError(f"--methods: unknown {', '.join(unknown)}; accepted: {', '.join(METHODS)}")
    return ["full"] + [name for name in dict.fromkeys(methods) if name != "full"]


def run_label(method: str, freeze_ratio: float | None) -> str:
    """``slimfit@0.9`` for scheduled methods, the method name otherwise."""
    return f"{method}@{freeze_ratio:g}" if freeze_ratio is not None else method


def run_bench(
    config: FinetuneConfig,
    task: Task,
    methods: Sequence[str],
    freeze_ratios: Sequence[float] | None = None,
    seeds: Sequence[int] = (0,),
    progress: bool = True,
) -> list[RunResult]:
    """Run every method (scheduled ones at every freeze ratio) for every seed; full fine-tuning first per seed."""
    ratios = list(freeze_ratios or [config.freeze_ratio])
    for ratio in ratios:
        if not 0.0 <= ratio < 1.0:
            raise DataError(f"--freeze-ratios: {ratio} is outside [0, 1)")
    if any(method in SCHEDULED_METHODS for method in methods):
        check_always_train(config, task)  # before full fine-tuning runs, not after
    results = []
    for seed in seeds:
        for method in parse_methods(",".join(methods)):
            for ratio in ratios if method in SCHEDULED_METHODS else [config.freeze_ratio]:
                run_config = dataclasses.replace(config, method=method, freeze_ratio=ratio, seed=seed)
                results.append(run(run_config, task, progress=progress))
    return results


def environment() -> dict[str, Any]:
    """Where and with what the benchmark ran (no paths, no host names)."""
    import peft
    import transformers

    from slimfit import __version__

    cuda = torch.cuda.is_available()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "slimfit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One flat row per run with its ratios to full fine-tuning of the same seed."""
    reference = {result.seed: result for result in results if result.method == "full"}
    rows = []
    for result in results:
        full = reference[result.seed]
        row: dict[str, Any] = {
            "label": run_label(result.method, result.freeze_ratio),
            "method": result.method,
            "freeze_ratio": "" if result.freeze_ratio is None else result.freeze_ratio,
            "seed": result.seed,
            "lr": result.lr,
            **result.metrics,
            "steps": result.steps,
            "seconds_per_step": result.seconds_per_step,
            "time_ratio": result.seconds_per_step / full.seconds_per_step,
        }
        for category, value in result.memory.items():
            row[f"memory_{category}"] = value
        for category, value in result.memory.items():
            baseline = full.memory.get(category, 0)
            row[f"memory_ratio_{category}"] = value / baseline if baseline else float("nan")
        rows.append(row)
    return rows


def summarise(rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> list[dict[str, Any]]:
    """Mean (and standard deviation over seeds) of every numeric column, per run label, in first-seen order;
    :func:`delta_key` of the first metric: its mean minus full fine-tuning's (times 100 for fractions)."""
    summary = []
    headline = metric_names[0]
    for label in dict.fromkeys(row["label"] for row in rows):
        group = [row for row in rows if row["label"] == label]
        entry: dict[str, Any] = {"label": label, "method": group[0]["method"], "seeds": len(group)}
        entry["freeze_ratio"] = group[0]["freeze_ratio"]
        entry["lr"] = group[0]["lr"]
        for key in metric_names:
            values = np.array([row[key] for row in group], dtype=float)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        full = np.array([row[headline] for row in rows if row["method"] == "full"], dtype=float).mean()
        entry[delta_key(headline)] = _scale(headline) * (entry[headline] - float(full))
        low, high = paired_interval(group, [row for row in rows if row["method"] == "full"], headline)
        entry[f"{delta_key(headline)}_ci95_low"], entry[f"{delta_key(headline)}_ci95_high"] = low, high
        numeric = [key for key in group[0] if key.startswith(("memory_", "time_ratio", "seconds_per_step"))]
        for key in numeric:
            entry[key] = float(np.mean([row[key] for row in group]))
        summary.append(entry)
    return summary


def paired_interval(
    runs: Sequence[Mapping[str, Any]], full: Sequence[Mapping[str, Any]], metric: str, level: float = 0.95
) -> tuple[float, float]:
    """Confidence interval of the mean difference to full fine-tuning of the same seed (same split, data order and
    head initialisation), in the units of :func:`delta_key`: Student's t over the seeds' paired differences, which
    removes the seed-to-seed variation both methods share. NaN with fewer than two seeds."""
    from scipy import stats

    reference = {row["seed"]: float(row[metric]) for row in full}
    differences = np.array([_scale(metric) * (float(row[metric]) - reference[row["seed"]]) for row in runs])
    if len(differences) < 2:
        return float("nan"), float("nan")
    low, high = (
        stats.t.interval(level, len(differences) - 1, loc=differences.mean(), scale=stats.sem(differences))
        if differences.std() > 0
        else (differences.mean(), differences.mean())
    )
    return float(low), float(high)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_bench(results: Sequence[RunResult], config: FinetuneConfig, task: Task, folder: Path) -> list[dict]:
    """runs.csv (one row per run), summary.csv (per method and ratio), bench.json and bench.png into ``folder``."""
    rows = run_rows(results)
    summary = summarise(rows, [name for name in task.metric_names if name in results[0].metrics])
    _write_csv(folder / "runs.csv", rows)
    _write_csv(folder / "summary.csv", summary)
    settings = dataclasses.asdict(config)
    settings.pop("method")
    settings["model"] = task.model_name
    settings["data"] = describe_data(config)
    report = {
        "environment": environment(),
        "config": settings,
        "examples": task.examples,
        "summary": summary,
        "runs": rows,
    }
    (folder / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    device = results[0].device
    plots.bench_ratios(
        summary,
        folder / "bench.png",
        title=f"{settings['model']} on {settings['data']} ({task.name}): {results[0].steps} steps, batch "
        f"{config.batch_size}, {device}, seeds {sorted({r.seed for r in results})}",
        metric=task.metric_names[0],
        fraction=task.metric_names[0] not in UNSCALED_METRICS,
        lower_is_better=task.metric_names[0] in LOWER_IS_BETTER,
    )
    return summary


def _interval(entry: Mapping[str, Any], metric: str) -> str:
    low, high = entry[f"{delta_key(metric)}_ci95_low"], entry[f"{delta_key(metric)}_ci95_high"]
    return "-" if np.isnan(low) else f"[{low:+.2f}, {high:+.2f}]"


def render_summary(summary: Sequence[Mapping[str, Any]], task: Task) -> str:
    """Terminal table: the task's metrics (mean ± std, fractions x100; ↓: lower is better), saved-activation and
    total memory, time per step."""
    metrics = [name for name in task.metric_names if name in summary[0]]
    headline = metrics[0]
    names = [name + (" ↓" if name in LOWER_IS_BETTER else "") for name in metrics]
    header = (
        "run",
        "seeds",
        *names,
        "Δ vs full",
        "95% CI (paired)",
        "activations",
        "x less",
        "total",
        "x less",
        "s/step",
    )
    lines = []
    for entry in summary:
        activations = entry.get("memory_activations", float("nan"))
        total = entry.get("memory_total", float("nan"))
        lines.append(
            (
                entry["label"],
                str(entry["seeds"]),
                *(f"{_scale(name) * entry[name]:.2f} ± {_scale(name) * entry[f'{name}_std']:.2f}" for name in metrics),
                f"{entry[delta_key(headline)]:+.2f}",
                _interval(entry, headline),
                human_bytes(activations),
                f"{1 / entry['memory_ratio_activations']:.1f}" if entry.get("memory_ratio_activations") else "-",
                human_bytes(total),
                f"{1 / entry['memory_ratio_total']:.2f}" if entry.get("memory_ratio_total") else "-",
                f"{entry['seconds_per_step']:.3f}",
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)) for row in [header, *lines])
