"""The tasks of `slimfit finetune` / `slimfit bench`: :func:`infer_task` and :func:`prepare`.

One module per task family, each with ``prepare(config) -> Task`` (:mod:`slimfit.tasks.base`): text
classification and regression (:mod:`.text`, single texts or sentence pairs), extractive question answering
(:mod:`.question_answering`), image classification (:mod:`.image_classification`) and causal language modelling
(:mod:`.causal_lm`). Task modules import transformers, so this package is imported only by the subcommands that
train.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
from pathlib import Path

from slimfit.data import is_regression, read_labels
from slimfit.finetune.options import FinetuneConfig
from slimfit.tasks.base import Task, quiet_transformers

__all__ = ["Task", "infer_task", "prepare"]

_MODULES = {
    "classification": "slimfit.tasks.text",
    "regression": "slimfit.tasks.text",
    "question-answering": "slimfit.tasks.question_answering",
    "image-classification": "slimfit.tasks.image_classification",
    "causal-lm": "slimfit.tasks.causal_lm",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def infer_task(config: FinetuneConfig) -> str:
    """``--task``, or what ``--data`` looks like: a folder of class folders holding images is image
    classification, SQuAD-format JSON (or JSONL with question and context) question answering, CSV or JSONL with
    prompt and response columns (``--prompt-column``, ``--response-column``) and no label column causal language
    modelling, labels that are numbers but not all integers regression, anything else classification. Plain-text
    language modelling is never guessed (a text column alone is as likely classification data missing its labels):
    it needs ``--task causal-lm``."""
    if config.task is not None:
        return config.task
    if config.data is None:
        return "classification"
    path = Path(config.data)
    if path.is_dir():
        files = (f for folder in path.iterdir() if folder.is_dir() for f in folder.iterdir())
        return "image-classification" if any(f.suffix.lower() in IMAGE_SUFFIXES for f in files) else "classification"
    if path.suffix.lower() == ".json":
        return "question-answering"
    columns = _columns(path)
    if path.suffix.lower() in (".jsonl", ".ndjson") and columns >= {"question", "context"}:
        return "question-answering"
    if columns >= {config.prompt_column, config.response_column} and config.label_column not in columns:
        return "causal-lm"
    return "regression" if is_regression(read_labels(path, config.label_column)) else "classification"


def prepare(config: FinetuneConfig) -> tuple[FinetuneConfig, Task]:
    """The prepared task, and the config with what was chosen for it filled in: the task (inferred when not
    given) and the tokens per example (the task's default, capped at what the model takes, when not given)."""
    config = dataclasses.replace(config, task=infer_task(config))
    with quiet_transformers():
        task = importlib.import_module(_MODULES[config.task]).prepare(config)
    return dataclasses.replace(config, max_length=task.max_length), task


def _columns(path: Path) -> set[str]:
    """The header of a CSV file, or the keys of the first object of a JSONL file (empty if unreadable)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if path.suffix.lower() == ".csv":
                return set(next(csv.reader(handle), []))
            line = next((line for line in handle if line.strip()), "")
        record = json.loads(line) if line else {}
    except (OSError, csv.Error, json.JSONDecodeError, UnicodeDecodeError):
        return set()
    return set(record) if isinstance(record, dict) else set()
