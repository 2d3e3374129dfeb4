"""PNG plots for `slimfit finetune` and `slimfit bench` (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    # Agg renders to files without a display; the CLI runs on servers and in CI.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def loss_curve(step_log: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Training loss per step, with a moving average when there are enough steps to smooth."""
    plt = _pyplot()
    steps = np.array([row["step"] for row in step_log])
    losses = np.array([row["loss"] for row in step_log], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="per step")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=2, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


STACKED = ("weights", "gradients", "optimizer_state", "activations", "temporaries", "scoring")
"""Memory categories that add up to the device total (the others are host memory, sums or allocator peaks)."""


def memory_bars(memory: Mapping[str, Mapping[str, int]], path: Path, title: str) -> None:
    """Stacked bars of peak memory by category (MiB, the :data:`STACKED` ones), one bar per run label."""
    plt = _pyplot()
    labels = list(memory)
    categories = [category for category in STACKED if any(category in report for report in memory.values())]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(labels) + 2), 4.5))
    bottom = np.zeros(len(labels))
    for category in categories:
        values = np.array([memory[label].get(category, 0) for label in labels], dtype=float) / 2**20
        ax.bar(labels, values, bottom=bottom, label=category)
        bottom += values
    ax.set(ylabel="MiB", title=title)
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def layer_heatmap(layers: Sequence[str], schedule: Sequence[Sequence[bool]], path: Path, title: str) -> None:
    """Which layers (rows) trained at which step (columns): dark cells trained."""
    plt = _pyplot()
    grid = np.array(schedule, dtype=float).T if schedule else np.zeros((len(layers), 0))
    fig, ax = plt.subplots(figsize=(9, max(3, 0.12 * len(layers) + 1.5)))
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1)
    ax.set(xlabel="step", ylabel="layer", title=f"{title} (dark: trained)")
    # Label every k-th row so that the names stay readable for models with hundreds of layers.
    every = max(1, len(layers) // 40)
    ax.set_yticks(range(0, len(layers), every))
    ax.set_yticklabels([layers[i] for i in range(0, len(layers), every)], fontsize=5)
    _save(fig, path)


def bench_ratios(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    title: str,
    metric: str = "accuracy",
    fraction: bool = True,
    lower_is_better: bool = False,
) -> None:
    """Three panels over benchmark runs: the headline ``metric`` (x100 when it is a ``fraction``), memory by
    category and time per step, the last two relative to full fine-tuning (``rows``: one per run label, with
    ``label``, ``<metric>``, ``<metric>_std``, ``time_ratio`` and ``memory_ratio_<category>`` keys)."""
    plt = _pyplot()
    labels = [row["label"] for row in rows]
    x = np.arange(len(labels))
    categories = [key.removeprefix("memory_ratio_") for key in rows[0] if key.startswith("memory_ratio_")]
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 1.6 * len(labels) * 3), 4.8))
    scale = 100 if fraction else 1
    values = np.array([row[metric] for row in rows]) * scale
    spread = np.array([row.get(f"{metric}_std", 0.0) for row in rows]) * scale
    axes[0].bar(x, values, yerr=spread, capsize=3, color="tab:blue")
    better = ", lower is better" if lower_is_better else ""
    axes[0].set(ylabel=metric + (" (x100)" if fraction else ""), title=f"eval {metric} (mean ± std over seeds{better})")
    if fraction:  # a fraction's axis ends at 100; the bars start near the lowest value to show small differences
        axes[0].set_ylim(max(0.0, float((values - spread).min()) - 5), 100)
    width = 0.8 / max(1, len(categories))
    for i, category in enumerate(categories):
        values = [row[f"memory_ratio_{category}"] for row in rows]
        axes[1].bar(x + (i - (len(categories) - 1) / 2) * width, values, width, label=category)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set(ylabel="peak bytes / full fine-tuning", title="memory relative to full fine-tuning")
    axes[1].legend(fontsize=8)
    axes[2].bar(x, [row["time_ratio"] for row in rows], color="tab:green")
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[2].set(ylabel="time per step / full fine-tuning", title="time per step relative to full fine-tuning")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)
