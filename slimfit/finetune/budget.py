"""``--memory-budget``: SlimFit settings whose predicted peak fits a memory budget, chosen before training.

Candidates are tried from the most accurate to the least, and within the same accuracy from the fastest: freeze
ratio 0.75, 0.8, ..., 0.95 (more frozen layers: less memory, and below full fine-tuning's accuracy from about 0.9,
README "Accuracy"); for each, 8-bit, then 4-bit, then 2-bit activation codes; then, on an accelerator, the optimizer
state of frozen layers kept on the device before moved to host memory; then the largest micro-batch that divides
``--batch-size``, the rest made up by gradient accumulation, so that the examples per optimizer step stay as asked.
Each prediction is :func:`slimfit.finetune.estimate.simulate`, scaled to the micro-batch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from slimfit.data import DataError
from slimfit.finetune import estimate
from slimfit.finetune.options import COMPRESSION_BITS, FinetuneConfig, resolve_device
from slimfit.finetune.report import human_bytes
from slimfit.tasks.base import Task

FREEZE_RATIOS = (0.75, 0.8, 0.85, 0.9, 0.95)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"12GiB"``, ``"1.5 GB"``, ``"800MiB"`` -> bytes (KiB/MiB/GiB are powers of 1024, KB/MB/GB of 1000)."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: a number and a unit, one of B, KB, MB, GB, KiB, MiB, GiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return size


@dataclass
class Choice:
    """What :func:`choose` picked: the config to train with and its predicted peak bytes by category."""

    config: FinetuneConfig
    predicted: dict[str, int]
    budget: int

    def as_dict(self) -> dict[str, Any]:
        """For metrics.json: the budget, the chosen settings and the prediction."""
        chosen = ("freeze_ratio", "compression_bits", "optimizer_state", "batch_size", "gradient_accumulation_steps")
        return {
            "budget": self.budget,
            **{name: getattr(self.config, name) for name in chosen},
            "predicted": self.predicted,
        }

    def describe(self) -> str:
        c = self.config
        return (
            f"memory budget {human_bytes(self.budget)}: freeze ratio {c.freeze_ratio:g}, {c.compression_bits}-bit "
            f"activations, optimizer state {c.optimizer_state}, micro-batch {c.batch_size} x "
            f"{c.gradient_accumulation_steps} accumulation steps; predicted peak {human_bytes(self.predicted['total'])}"
        )


def choose(config: FinetuneConfig, task: Task, budget: int) -> Choice:
    """The first candidate (module docstring) whose predicted total fits ``budget``; DataError naming the smallest
    achievable peak when none does (checked first, with the least memory-hungry candidate)."""
    if config.method != "slimfit":
        raise DataError(f"--memory-budget: chooses SlimFit's settings; --method is {config.method!r}, not slimfit")
    placements = ("keep", "offload") if resolve_device(config.device).type != "cpu" else ("offload",)
    micro_batches = [m for m in range(config.batch_size, 0, -1) if config.batch_size % m == 0]
    simulated: dict[tuple[float, int, str], estimate.Simulation] = {}

    def peaks(ratio: float, bits: int, placement: str) -> estimate.Simulation:
        key = (ratio, bits, placement)
        if key not in simulated:
            simulated[key] = estimate.simulate(_candidate(config, ratio, bits, placement, 1), task)
        return simulated[key]

    least_total = estimate.scale(peaks(FREEZE_RATIOS[-1], COMPRESSION_BITS[-1], placements[-1]), 1)["total"]
    if least_total > budget:
        raise DataError(
            f"--memory-budget: {human_bytes(budget)} is below the smallest predicted peak for this model, batch and "
            f"length, {human_bytes(least_total)} (freeze ratio {FREEZE_RATIOS[-1]}, {COMPRESSION_BITS[-1]}-bit "
            "activations, micro-batch 1); give at least that, or a shorter --max-length"
        )
    for ratio in FREEZE_RATIOS:
        for bits in COMPRESSION_BITS:
            for placement in placements:
                for micro in micro_batches:
                    predicted = estimate.scale(peaks(ratio, bits, placement), micro)
                    if predicted["total"] <= budget:
                        return Choice(_candidate(config, ratio, bits, placement, micro), predicted, budget)
    raise AssertionError("unreachable: the least memory-hungry candidate fits")


def _candidate(config: FinetuneConfig, ratio: float, bits: int, placement: str, micro: int) -> FinetuneConfig:
    return dataclasses.replace(
        config,
        freeze_ratio=ratio,
        compression_bits=bits,
        optimizer_state=placement,
        batch_size=micro,
        gradient_accumulation_steps=config.gradient_accumulation_steps * config.batch_size // micro,
    )
