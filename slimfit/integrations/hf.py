"""Hugging Face Trainer integration: ``Trainer(..., callbacks=[SlimFitCallback(freeze_ratio=0.9)])``.

The callback attaches :class:`slimfit.SlimFit` to the Trainer's model and optimizer when training begins, calls
``sf.step()`` after every optimizer step and, as a ``transformers`` ``ExportableState``, has the Trainer write the
SlimFit state into each checkpoint's ``trainer_state.json``; a run resumed from any checkpoint folder continues
the same layer schedule.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from slimfit.core import SlimFit
from slimfit.policy import DEFAULT_POLICY, CompressionPolicy
from slimfit.scheduler import DEFAULT_FREEZE_RATIO


class SlimFitCallback(TrainerCallback, ExportableState):
    """Train with SlimFit under ``transformers.Trainer``.

    Args:
        freeze_ratio: fraction of layers frozen at each step, in ``[0, 1)``.
        **slimfit_kwargs: further arguments of :class:`slimfit.SlimFit` (``metric``, ``optimizer_state``,
            ``compression``, ``train_biases``, ``seed``, ``scoring``, ``always_train``, ``freeze_unit``,
            ``revisit_rounds``, ``small_layer_share``).

    Attributes:
        slimfit: the :class:`slimfit.SlimFit` in use while training runs (None before and after).

    Checkpoints: :meth:`state` puts the SlimFit state (:meth:`slimfit.SlimFit.state_dict`) into the
    ``stateful_callbacks`` of every checkpoint's ``trainer_state.json``. When training resumes
    (``trainer.train(resume_from_checkpoint=...)``, from wherever the checkpoint folder now lies), the Trainer loads
    that file before training begins and the callback restores the schedule from it; this does not depend on
    ``TrainingArguments.restore_callback_states_from_checkpoint``. A resumed run whose checkpoint holds no SlimFit
    state is an error: it would silently restart the layer schedule. At the end of training the model's original
    modules and ``requires_grad`` flags are restored.
    """

    def __init__(self, freeze_ratio: float = DEFAULT_FREEZE_RATIO, **slimfit_kwargs: Any) -> None:
        # Checked here too, so that a bad value fails when the Trainer is built rather than when training starts.
        if not isinstance(freeze_ratio, (int, float)) or not 0.0 <= freeze_ratio < 1.0:
            raise ValueError(f"freeze_ratio must be a number in [0, 1), got {freeze_ratio!r}")
        self.freeze_ratio = freeze_ratio
        self.slimfit_kwargs = slimfit_kwargs
        self.slimfit: SlimFit | None = None

    def state(self) -> dict[str, Any]:
        """``args`` rebuild this callback, ``attributes`` hold the SlimFit state (None before training begins).

        Both must be JSON: a :class:`~slimfit.policy.CompressionPolicy` other than the default is written as its
        ``repr``, which ``SlimFit`` rejects should ``restore_callback_states_from_checkpoint=True`` rebuild the
        callback from it (pass that policy to the callback again instead; the default False needs nothing).
        """
        args = {"freeze_ratio": self.freeze_ratio, **self.slimfit_kwargs}
        compression = args.get("compression")
        if isinstance(compression, CompressionPolicy):
            args["compression"] = "default" if compression == DEFAULT_POLICY else repr(compression)
        saved = None if self.slimfit is None else self.slimfit.state_dict()
        return {"args": args, "attributes": {"slimfit_state": saved}}

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
            self.slimfit.load_state_dict(self._saved_state(state))

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._active().step()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.slimfit is not None:
            self.slimfit.remove()
            self.slimfit = None

    def _active(self) -> SlimFit:
        if self.slimfit is None:
            raise RuntimeError("SlimFitCallback is not attached: training has not begun (on_train_begin not called)")
        return self.slimfit

    def _saved_state(self, state: TrainerState) -> dict[str, Any]:
        """The SlimFit state the resumed checkpoint's trainer_state.json holds for this callback."""
        name = type(self).__name__
        saved = (state.stateful_callbacks or {}).get(name)
        if isinstance(saved, dict) and saved.get("attributes", {}).get("slimfit_state") is not None:
            return saved["attributes"]["slimfit_state"]
        raise RuntimeError(
            f"SlimFitCallback: resuming at step {state.global_step}, but the checkpoint's trainer_state.json has no "
            f"SlimFit state (stateful_callbacks[{name!r}]['attributes']['slimfit_state']); resume from a checkpoint "
            "written by a Trainer with this callback, or start a new run"
        )
