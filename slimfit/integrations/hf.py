"""Hugging Face Trainer integration: ``Trainer(..., callbacks=[SlimFitCallback(freeze_ratio=0.9)])``.

The callback attaches :class:`slimfit.SlimFit` to the Trainer's model and optimizer when training begins, calls
``sf.step()`` after every optimizer step, writes the SlimFit state into each checkpoint folder
(``slimfit_state.pt``, atomically) and restores it when training resumes from a checkpoint, so a resumed run
continues the same layer schedule.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from slimfit.core import SlimFit

STATE_FILE = "slimfit_state.pt"


class SlimFitCallback(TrainerCallback):
    """Train with SlimFit under ``transformers.Trainer``.

    Args:
        freeze_ratio: fraction of layers frozen at each step, in ``[0, 1)``.
        **slimfit_kwargs: further arguments of :class:`slimfit.SlimFit` (``metric``, ``optimizer_state``,
            ``compression``, ``train_biases``, ``seed``).

    Attributes:
        slimfit: the :class:`slimfit.SlimFit` in use while training runs (None before and after).

    Resuming (``trainer.train(resume_from_checkpoint=...)``) reads ``slimfit_state.pt`` from
    ``TrainingArguments.resume_from_checkpoint`` when that names a folder, else from
    ``<output_dir>/checkpoint-<global step>``, the folder the Trainer resumes from with ``resume_from_checkpoint=True``
    and the usual choice when a path is passed. A resumed run without that file is an error: it would silently
    restart the layer schedule. At the end of training the model's original modules and ``requires_grad`` flags
    are restored.
    """

    def __init__(self, freeze_ratio: float = 0.9, **slimfit_kwargs: Any) -> None:
        # Checked here too, so that a bad value fails when the Trainer is built rather than when training starts.
        if not isinstance(freeze_ratio, (int, float)) or not 0.0 <= freeze_ratio < 1.0:
            raise ValueError(f"freeze_ratio must be a number in [0, 1), got {freeze_ratio!r}")
        self.freeze_ratio = freeze_ratio
        self.slimfit_kwargs = slimfit_kwargs
        self.slimfit: SlimFit | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None or optimizer is None:
            raise RuntimeError(
                "SlimFitCallback needs the Trainer's model and optimizer; use it with transformers.Trainer"
            )
        self.slimfit = SlimFit(model, optimizer, freeze_ratio=self.freeze_ratio, **self.slimfit_kwargs)
        if state.global_step > 0:
            self.slimfit.load_state_dict(torch.load(self._resume_file(args, state), weights_only=True))

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._active().step()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            warnings.warn(
                f"SlimFitCallback: checkpoint folder {folder} not found; SlimFit state not saved "
                "(resuming from this checkpoint will fail)",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        save_state(self._active().state_dict(), folder / STATE_FILE)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.slimfit is not None:
            self.slimfit.remove()
            self.slimfit = None

    def _active(self) -> SlimFit:
        if self.slimfit is None:
            raise RuntimeError("SlimFitCallback is not attached: training has not begun (on_train_begin not called)")
        return self.slimfit

    @staticmethod
    def _resume_file(args: TrainingArguments, state: TrainerState) -> Path:
        candidates = []
        if isinstance(args.resume_from_checkpoint, str) and os.path.isdir(args.resume_from_checkpoint):
            candidates.append(Path(args.resume_from_checkpoint) / STATE_FILE)
        candidates.append(Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"SlimFitCallback: resuming at step {state.global_step} but no {STATE_FILE} in "
            f"{' or '.join(str(c.parent) for c in candidates)}; set TrainingArguments.resume_from_checkpoint to the "
            "checkpoint folder written with this callback"
        )


def save_state(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename: a crash never leaves a torn file."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
