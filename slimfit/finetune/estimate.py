"""Peak memory of a run, predicted before training: :func:`estimate`.

The prediction is a measurement at a small shape, scaled. The run is simulated on this machine with the method,
model, sequence length and precision asked for, but one example per micro-batch: the task's longest training
example (padding makes every micro-batch as long as its longest example, so a run's peak comes from a batch of long
examples), through the same Trainer, callbacks and :class:`~slimfit.finetune.meter.PeakMemory` as a real run. It
trains until SlimFit has scored every layer once (the warm-up, whose random layer order is drawn from the same seed
as the real run's) or, for unscheduled methods, for two optimizer steps (the optimizer state exists after the
first). Then:

- ``weights``, ``gradients``, ``optimizer_state``, ``optimizer_state_host`` and ``scoring`` do not depend on the
  batch: they are the simulation's peaks;
- ``activations`` (all a forward keeps for backward) are proportional to the examples in a micro-batch: the
  simulation's peak times the micro-batch size;
- ``temporaries`` (codes decoded at once in backward) are too, except chunks of decodes done a chunk at a time
  (derivative codes), which grow only up to their chunk: the simulation's profile of what was decoded at each
  moment (:class:`slimfit.memory.DecodeProfile`), scaled so, at its largest moment;
- ``total`` is their sum, as :class:`PeakMemory` reports it.

Steps after the warm-up choose layers by score, so a long run can train a set whose gradients or saved activations
exceed every warm-up set's; tests and README's "Will it fit?" table compare predictions with measured runs.
"""

from __future__ import annotations

import dataclasses
import math

from slimfit.finetune.options import SCHEDULED_METHODS, FinetuneConfig
from slimfit.memory import DecodeProfile
from slimfit.tasks.base import Task


@dataclasses.dataclass(frozen=True)
class Simulation:
    """What :func:`simulate` measured: peak bytes by category at one example per micro-batch, and what backward
    decoded (for ``temporaries``, which do not all grow with the batch)."""

    peaks: dict[str, int]
    decodes: DecodeProfile


def estimate(config: FinetuneConfig, task: Task) -> dict[str, int]:
    """Predicted peak bytes by category (the keys of a run's ``memory`` report) of training ``config`` on ``task``.

    Runs a short simulation (see the module docstring) on ``config.device``; ``config.batch_size`` is the
    micro-batch a device holds (gradient accumulation keeps each micro-batch's graph alone in memory)."""
    return scale(simulate(config, task), config.batch_size)


def simulate(config: FinetuneConfig, task: Task) -> Simulation:
    """Peak bytes by category of ``config`` trained on ``task`` one example per micro-batch (the module docstring
    says how); :func:`scale` turns them into any micro-batch's."""
    from slimfit.finetune import loop

    steps = _step_cap(config)
    simulated = dataclasses.replace(
        config,
        batch_size=1,
        gradient_accumulation_steps=1,
        max_steps=steps,
        save_steps=None,
        resume_from_checkpoint=None,
    )
    small = dataclasses.replace(task, train_dataset=[task.train_dataset[i] for i in _longest(task, steps)])
    result = loop.run(simulated, small, progress=False, simulate=True)
    peaks = {k: v for k, v in result.memory.items() if k not in ("total", "cuda_max_memory_allocated")}
    return Simulation(peaks, result.decodes)


def scale(simulation: Simulation, micro_batch: int) -> dict[str, int]:
    """:func:`simulate`'s peaks for ``micro_batch`` examples per forward, with their ``total``."""
    memory = dict(simulation.peaks)
    memory["activations"] *= micro_batch
    memory["temporaries"] = simulation.decodes.peak(micro_batch)
    memory["total"] = sum(value for name, value in memory.items() if name != "optimizer_state_host")
    return memory


def _longest(task: Task, count: int) -> list[int]:
    """Positions of the ``count`` longest training examples (by tokens); examples without tokens (images, which
    are decoded when read, so not all of them are) all have one size: the first ``count``."""
    data = task.train_dataset
    if "input_ids" not in data[0]:
        return list(range(min(count, len(data))))
    return sorted(range(len(data)), key=lambda i: -len(data[i]["input_ids"]))[:count]


def _step_cap(config: FinetuneConfig) -> int:
    """Steps the simulation may take: room for SlimFit's warm-up (about 1 / (1 - freeze ratio) steps, plus the first
    step of the learning-rate warm-up, whose zero rate scores nothing) twice over, so rounding of K never cuts it;
    the simulation itself stops earlier (RunRecorder)."""
    if config.method not in SCHEDULED_METHODS:
        return 2
    return 4 * math.ceil(1.0 / (1.0 - config.freeze_ratio)) + 8
