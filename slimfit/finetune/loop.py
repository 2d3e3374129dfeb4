"""One fine-tuning run on the Hugging Face ``Trainer``: :func:`run`.

The Trainer brings gradient accumulation, checkpoints and exact resume, mixed precision and multi-process launch
(``torchrun`` / ``accelerate launch``); SlimFit runs through :class:`slimfit.integrations.hf.SlimFitCallback`.
What the command line reports on top is recorded by :class:`RunRecorder` (a callback: per-step loss, learning
rate, time, trainable layers; evaluation after every epoch) and :class:`MeteredTrainer` (the bytes each training
forward keeps for backward).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from slimfit.core import unknown_modules
from slimfit.data import DataError
from slimfit.finetune.meter import PeakMemory
from slimfit.finetune.options import SCHEDULED_METHODS, FinetuneConfig, resolve_device
from slimfit.finetune.report import RunResult
from slimfit.layers import split_parameters
from slimfit.nn.column_blocks import split_columns, splittable_linears
from slimfit.policy import DEFAULT_POLICY
from slimfit.tasks.base import Task, quiet_transformers


class MeteredTrainer(Trainer):
    """A Trainer whose training forwards are measured by a :class:`PeakMemory` (set by :class:`RunRecorder`) on
    the steps :class:`RunRecorder` marks ``metering``."""

    meter: PeakMemory | None = None
    metering = False
    step_losses: list[float]
    no_decay_lr: float | None = None  # FinetuneConfig.no_decay_lr: the peak rate of the group without weight decay

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.no_decay_lr is not None:
            # The Trainer groups the parameters it exempts from weight decay (biases, normalisation weights) apart
            # from the rest; its LR scheduler, built next, warms up and decays each group from the rate set here.
            names = set(self.get_decay_parameter_names(self.model))
            decay = {id(p) for n, p in self.model.named_parameters() if n in names}
            exempt = [group for group in optimizer.param_groups if not any(id(p) in decay for p in group["params"])]
            if len(exempt) != 1:
                raise RuntimeError(f"expected one optimizer group without weight decay, found {len(exempt)}")
            exempt[0]["lr"] = self.no_decay_lr
        return optimizer

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self.meter is None or not (self.metering and model.training and torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, *args, **kwargs)
        with self.meter.forward():
            return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # What training_step returns is already this micro-batch's share of the step's loss (divided by the
        # accumulation steps, or by the step's token count for models taking num_items_in_batch): the shares of
        # one optimizer step add up to its loss.
        if self.meter is None or not self.metering:
            loss = super().training_step(*args, **kwargs)
        else:
            with self.meter.backward():  # forward and backward: only backward decodes
                loss = super().training_step(*args, **kwargs)
        self.step_losses.append(float(loss))
        return loss


class RunRecorder(TrainerCallback):
    """Per-step log, layer schedule and memory peaks of a run, and the task's metrics after every epoch.

    The meter's saved-tensor hooks cost time on every forward they watch, so steps alternate: odd steps (1, 3, ...)
    measure the bytes kept for backward and are not timed, even steps are timed and not measured (gradients and
    optimizer state, read outside the forward, are measured on every step). A simulation meters every step.
    """

    def __init__(
        self, task: Task, layers: list[str], device: torch.device, progress: bool, simulate: bool = False
    ) -> None:
        self.task = task
        self.simulate = simulate  # no evaluation; stop early (see _simulation_done)
        self._warmup_steps: int | None = None
        self.layers = layers
        self.index = {name: i for i, name in enumerate(layers)}
        self.device = device
        self.progress = progress
        self.trainer: MeteredTrainer | None = None
        self.slimfit_callback: TrainerCallback | None = None
        self.step_log: list[dict[str, Any]] = []
        self.eval_log: list[dict[str, Any]] = []
        self.schedule: list[list[bool]] = []
        self.uncompressed: list[str] | None = None
        self._tick = 0.0
        self._trained: list[str] = []
        self._lr = 0.0
        self._bar = None  # our own progress bar: loss, seconds per step and layers trained, as before the Trainer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.trainer.meter = PeakMemory(model, optimizer, self.device, profile_decodes=self.simulate)
        self.trainer.step_losses = []
        if self.progress and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.close()

    def on_step_begin(self, args, state, control, **kwargs):
        sf = getattr(self.slimfit_callback, "slimfit", None)
        self._trained = sf.always_trained + sf.trainable_layers() if sf is not None else self.layers
        self.trainer.metering = self.simulate or state.global_step % 2 == 0  # global_step counts finished steps
        self._tick = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.meter.after_backward()

    def on_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        # Read before the Trainer steps the scheduler: the rate this step trained with.
        self._lr = float(lr_scheduler.get_last_lr()[0])

    def on_step_end(self, args, state, control, **kwargs):
        meter = self.trainer.meter
        sf = getattr(self.slimfit_callback, "slimfit", None)
        # SlimFit's scoring snapshot is already freed here (sf.step() ran at on_optimizer_step): read its peak.
        meter.after_step(sf.scoring_bytes if sf is not None else 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: time the work, not the launches
        seconds = time.perf_counter() - self._tick
        losses, self.trainer.step_losses = self.trainer.step_losses, []
        row = [False] * len(self.layers)
        for name in self._trained:
            row[self.index[name]] = True
        self.schedule.append(row)
        self.step_log.append(
            {
                "step": state.global_step,
                "epoch": math.ceil(state.epoch - 1e-9),
                "loss": float(np.sum(losses)) if losses else float("nan"),
                "lr": self._lr,
                "seconds": seconds,
                "trainable_layers": len(self._trained),
                "activation_bytes": meter.last_activation_bytes if self.trainer.metering else None,
                "metered": self.trainer.metering,
            }
        )
        if sf is not None:
            self.uncompressed = list(sf.uncompressed_modules)
        if self.simulate:
            control.should_training_stop = self._simulation_done(sf, state.global_step)
        if self._bar is not None:
            last = self.step_log[-1]
            shown = f"{len(self._trained)}/{len(self.layers)}"
            self._bar.set_postfix(loss=f"{last['loss']:.4f}", s_step=f"{seconds:.2f}", layers=shown)
            self._bar.update()

    def _simulation_done(self, sf: Any, step: int) -> bool:
        """Unscheduled methods: two steps. SlimFit: the warm-up (every layer scored once), then as many steps again
        choosing layers by score: the sets a run trains after its warm-up differ from the warm-up's."""
        if sf is None:
            return step >= 2
        if self._warmup_steps is None and bool(sf.scheduler.scored.all()):
            self._warmup_steps = step
        return self._warmup_steps is not None and step >= 2 * self._warmup_steps

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.simulate:
            return
        scores = self.task.evaluate(self.trainer)
        epoch = math.ceil(state.epoch - 1e-9)  # the last epoch may end early (--max-steps)
        self.eval_log.append({"epoch": epoch, "step": state.global_step, **scores})
        if self._bar is not None:
            self._bar.write(f"epoch {epoch}: " + ", ".join(f"{name} {value:.4f}" for name, value in scores.items()))


def check_always_train(config: FinetuneConfig, task: Task, model: nn.Module | None = None) -> None:
    """Refuse ``--always-train`` names that are not modules of the task's model (built here unless given), before
    anything trains: one line naming the option, the name and a real module."""
    if not config.always_train:
        return
    model = build_model(task, config) if model is None else model
    unknown = unknown_modules(model, config.always_train)
    if unknown:
        example = next(name for name, _ in model.named_children())
        raise DataError(
            f"--always-train: {unknown[0]!r} is not a module of {type(model).__name__} (names as in "
            f"model.named_modules(), e.g. {example!r})"
        )


def is_main_process() -> bool:
    """False on every process but the first of a ``torchrun`` / ``accelerate launch`` job (they do not report).

    Before the Trainer has joined the process group, the launcher's ``RANK`` variable tells."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def build_model(task: Task, config: FinetuneConfig) -> nn.Module:
    """The task's fresh model with the method's changes (LoRA adapters; checkpointing is the Trainer's)."""
    with quiet_transformers():
        model = task.build_model()
    if config.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        # Adapters on every Linear but the new head, which trains in full (peft's task types save it themselves;
        # without one it is named in modules_to_save).
        lora = LoraConfig(
            task_type=TaskType[task.lora_task_type] if task.lora_task_type else None,
            modules_to_save=None if task.lora_task_type else list(task.head_modules),
            r=config.lora_rank,
            lora_alpha=2 * config.lora_rank,
            lora_dropout=0.1,
            target_modules="all-linear",
            exclude_modules=list(task.head_modules),
        )
        model = get_peft_model(model, lora)
    if config.column_blocks and config.method in SCHEDULED_METHODS:
        if not split_columns(model, config.column_blocks, exclude=tuple(task.new_head)):
            widths = [m.in_features for _, m in splittable_linears(model, exclude=tuple(task.new_head))]
            raise DataError(
                f"--column-blocks: {config.column_blocks} blocks fit no Linear of the model outside its new head "
                f"(widest input: {max(widths, default=0)} columns; only nn.Linear layers split, not an output "
                "embedding or a tied weight, nor GPT-2's Conv1D)"
            )
    return model


def training_arguments(config: FinetuneConfig, output_dir: Path, device: torch.device) -> TrainingArguments:
    """The Trainer's arguments for ``config`` (AdamW, linear warm-up and decay, evaluation by :class:`RunRecorder`)."""
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.method_lr,
        weight_decay=0.01,  # torch.optim.AdamW's default, which slimfit's runs used before the Trainer
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_fraction,  # below 1: a share of the optimizer steps, counted by the Trainer
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        use_cpu=device.type == "cpu",
        **{_CHECKPOINTING: config.method == "grad-ckpt"},
        # Frozen layers give no gradient: DDP must not wait for them (see slimfit.distributed).
        ddp_find_unused_parameters=config.method in SCHEDULED_METHODS or None,
        eval_strategy="no",
        logging_strategy="no",
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        report_to="none",
        disable_tqdm=True,  # RunRecorder shows its own bar; the Trainer's would also print its final log dict
    )


# transformers 5.x renamed the argument; the old name warns that it goes away in 6.
_CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def run(
    config: FinetuneConfig, task: Task, output: Path | None = None, progress: bool = True, simulate: bool = False
) -> RunResult:
    """Fine-tune a fresh copy of the task's model with ``config.method``; evaluate after every epoch.

    ``simulate`` (for :mod:`slimfit.finetune.estimate`): no evaluation, and training stops once SlimFit has scored
    every layer (other methods: after two steps); the result's metrics are empty.

    Checkpoints (``config.save_steps``) are written into ``output``; ``config.resume_from_checkpoint`` continues
    from one. Without checkpoints the Trainer works in a temporary folder that is removed afterwards.
    """
    return train(config, task, output, progress, simulate)[0]


def train(
    config: FinetuneConfig, task: Task, output: Path | None = None, progress: bool = True, simulate: bool = False
) -> tuple[RunResult, nn.Module]:
    """:func:`run`, and the trained model (SlimFit removed from it; LoRA's adapters still in place)."""
    from transformers import set_seed

    from slimfit.integrations.hf import SlimFitCallback

    device = resolve_device(config.device)
    set_seed(config.seed)
    model = build_model(task, config)
    if config.method in SCHEDULED_METHODS:
        check_always_train(config, task, model)
    layers = [layer.name for layer in split_parameters(model).layers]
    recorder = RunRecorder(task, layers, device, progress, simulate)
    callbacks: list[TrainerCallback] = []
    if config.method in SCHEDULED_METHODS:
        compression = None if config.method == "freeze-only" else DEFAULT_POLICY.with_bits(config.compression_bits)
        recorder.slimfit_callback = SlimFitCallback(
            freeze_ratio=config.freeze_ratio,
            compression=compression,
            optimizer_state=config.optimizer_state,
            scoring=config.scoring,
            freeze_unit=config.freeze_unit,
            revisit_rounds=config.revisit_rounds or None,
            small_layer_share=config.small_layer_share or None,
            always_train=[name for name, _ in model.named_children() if name in task.new_head]
            + list(config.always_train),
        )
        callbacks.append(recorder.slimfit_callback)
    callbacks.append(recorder)  # after SlimFit's: it measures the optimizer state after SlimFit moved it

    scratch = None if config.save_steps else Path(tempfile.mkdtemp(prefix="slimfit-trainer-"))
    args = training_arguments(config, output if scratch is None else scratch, device)
    trainer = MeteredTrainer(
        model=model,
        args=args,
        train_dataset=task.train_dataset,
        data_collator=task.collator,
        processing_class=task.processor,
        callbacks=callbacks,
    )
    trainer.no_decay_lr = config.no_decay_lr
    recorder.trainer = trainer
    if not task.loss_over_step_tokens:
        # Heads whose loss is a per-batch mean accept **kwargs, so the Trainer would take them for losses that
        # normalise over num_items_in_batch and skip dividing by the accumulation steps (gradients too large).
        trainer.model_accepts_loss_kwargs = False
    trainer.remove_callback(PrinterCallback)  # it prints the final log dict; RunRecorder reports instead
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
        if (
            not recorder.eval_log and not simulate
        ):  # resumed after the last epoch ended: nothing trained, still report the metrics
            recorder.on_epoch_end(args, trainer.state, trainer.control)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - start
    # Time steps the meter did not watch (the first is metered: it also pays one-off costs such as allocator
    # warm-up); a run too short to have one falls back to the metered steps.
    timed = [row["seconds"] for row in recorder.step_log if not row["metered"]]
    timed = timed or [row["seconds"] for row in recorder.step_log]
    scheduled = config.method in SCHEDULED_METHODS
    result = RunResult(
        task=task.name,
        method=config.method,
        freeze_ratio=config.freeze_ratio if scheduled else None,
        seed=config.seed,
        lr=config.method_lr,
        metrics={k: v for k, v in (recorder.eval_log or [{}])[-1].items() if k not in ("epoch", "step")},
        memory=trainer.meter.report(),
        steps=trainer.state.global_step,
        seconds=seconds,
        seconds_per_step=float(np.mean(timed)) if timed else float("nan"),
        device=str(device),
        step_log=recorder.step_log,
        eval_log=recorder.eval_log,
        layers=layers,
        schedule=recorder.schedule,
        uncompressed_modules=(recorder.uncompressed or []) if config.method == "slimfit" else None,
        decodes=trainer.meter.decodes,
    )
    return result, trainer.model
