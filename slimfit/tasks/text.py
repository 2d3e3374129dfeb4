"""Sequence classification and regression of single texts or sentence pairs (GLUE-style tasks).

Classification: integer or string labels, metrics ``accuracy`` and macro-``f1``. Regression: one output
(``num_labels=1``, ``problem_type="regression"``), float labels, metrics ``pearson``, ``spearman`` and ``mse``.
Sentence pairs (``--text-pair-column``) use the tokenizer's pair encoding and truncate the longer side first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from slimfit.data import (
    DataError,
    TextDataset,
    align_labels,
    default_data_dir,
    load_dataset,
    random_split,
    stratified_split,
)
from slimfit.finetune.options import BUNDLED_MODEL, FinetuneConfig
from slimfit.tasks.base import (
    Task,
    classification_metrics,
    default_model_path,
    first_line,
    require_model_folder,
    resolve_max_length,
    validation_instead,
)

# The heads AutoModelForSequenceClassification adds: `classifier` (BERT family, RoBERTa, DeBERTa, ELECTRA; DistilBERT
# also `pre_classifier`), `score` (decoder models: Llama, GPT-2, Qwen, ...).
SEQUENCE_HEADS = ("pre_classifier", "classifier", "score")


@dataclass
class TextClassificationTask(Task):
    name: ClassVar[str] = "classification"
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy", "f1")
    lora_task_type: ClassVar[str | None] = "SEQ_CLS"
    new_head: ClassVar[tuple[str, ...]] = SEQUENCE_HEADS

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        names = self.label_names or []
        return AutoModelForSequenceClassification.from_pretrained(
            self.model_path,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            pad_token_id=self.processor.pad_token_id,
        )

    def compute_metrics(self, predictions: Any, label_ids: Any) -> dict[str, float]:
        return classification_metrics(predictions, label_ids, len(self.label_names or []))


@dataclass
class TextRegressionTask(Task):
    name: ClassVar[str] = "regression"
    metric_names: ClassVar[tuple[str, ...]] = ("pearson", "spearman", "mse")
    lora_task_type: ClassVar[str | None] = "SEQ_CLS"
    new_head: ClassVar[tuple[str, ...]] = SEQUENCE_HEADS

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            self.model_path, num_labels=1, problem_type="regression", pad_token_id=self.processor.pad_token_id
        )

    def compute_metrics(self, predictions: Any, label_ids: Any) -> dict[str, float]:
        return regression_metrics(_logits(predictions).reshape(-1), np.asarray(label_ids, dtype=np.float64))


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation (0 where a side is constant, e.g. an untrained head) and mean squared error."""
    from scipy.stats import pearsonr, spearmanr

    constant = np.ptp(predictions) == 0 or np.ptp(labels) == 0
    return {
        "pearson": 0.0 if constant else float(pearsonr(predictions, labels).statistic),
        "spearman": 0.0 if constant else float(spearmanr(predictions, labels).statistic),
        "mse": float(np.mean((predictions - labels) ** 2)),
    }


def _logits(predictions: Any) -> np.ndarray:
    # Models that return more than logits (hidden states) give a tuple; the logits come first.
    return np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions, dtype=np.float64)


def prepare(config: FinetuneConfig) -> TextClassificationTask | TextRegressionTask:
    """Load and split the data, check the model against it, and tokenise both splits."""
    regression = config.task == "regression"
    model_path = Path(config.model) if config.model else default_model_path()
    require_model_folder(model_path)
    columns = dict(text_column=config.text_column, label_column=config.label_column)
    columns["text_pair_column"] = config.text_pair_column
    data = load_dataset(config.data or default_data_dir(), regression=regression, **columns)
    split = random_split if regression else stratified_split
    if config.eval_data:
        train = data
        loaded = load_dataset(config.eval_data, option="--eval-data", regression=regression, **columns)
        evaluation = align_labels(loaded, train.label_names, config.eval_data)
    else:
        train, evaluation = split(data, config.eval_fraction, config.seed)
    train, evaluation = validation_instead(train, evaluation, split, config)

    from transformers import AutoConfig, AutoTokenizer, DataCollatorWithPadding

    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise DataError(f"--model: cannot read {model_path}/config.json: {first_line(error)}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise DataError(f"--model: cannot load a tokenizer from {model_path}: {first_line(error)}") from error
    check_model(config, model_config, tokenizer, model_path, train.label_names)
    tokens = resolve_max_length(config, model_config, tokenizer, model_path)
    if tokenizer.pad_token is None:
        # Decoder models (GPT-2, Llama) come without one; batches need padding and their classification heads
        # find each text's last token by the pad id. EOS is the usual stand-in.
        if tokenizer.eos_token is None:
            raise DataError(f"--model: the tokenizer of {model_path} has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token

    def encode(split: TextDataset) -> list[dict[str, Any]]:
        # Pairs: truncate the longer text first, as GLUE fine-tuning does.
        encoded = tokenizer(split.texts, split.pairs, truncation="longest_first", max_length=tokens)
        keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
        return [{**{key: encoded[key][i] for key in keys}, "labels": label} for i, label in enumerate(split.labels)]

    cls = TextRegressionTask if regression else TextClassificationTask
    return cls(
        model_path=model_path,
        model_name=config.model or BUNDLED_MODEL,
        train_dataset=encode(train),
        eval_dataset=encode(evaluation),
        collator=DataCollatorWithPadding(tokenizer),
        processor=tokenizer,
        label_names=train.label_names,
        examples={"train": len(train), "eval": len(evaluation)},
        max_length=tokens,
    )


def check_model(
    config: FinetuneConfig, model_config: Any, tokenizer: Any, model_path: Path, classes: list[str] | None
) -> None:
    """Reject a model the options or the data cannot train, from its config and tokenizer (raises DataError).

    Each of these would otherwise fail in the middle of loading or training: a model type without a
    sequence-classification head, a config meant for another problem type, an existing head sized for another
    number of labels, a tokenizer with ids beyond the embedding table, texts longer than the positions.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    where = f"{model_path}/config.json"
    if type(model_config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise DataError(
            f"--model: {model_path} is a {model_config.model_type!r} model, which transformers has no "
            "sequence-classification head for (AutoModelForSequenceClassification)"
        )
    problem = "regression" if classes is None else "single_label_classification"
    if model_config.problem_type not in (None, problem):
        raise DataError(
            f"--model: {where} sets problem_type={model_config.problem_type!r} but the task is {problem} "
            "(remove problem_type, use another model, or choose --task)"
        )
    heads = [name for name in model_config.architectures or [] if name.endswith("ForSequenceClassification")]
    wanted = 1 if classes is None else len(classes)
    if heads and model_config.num_labels != wanted:
        what = "one output (regression)" if classes is None else f"{wanted} classes ({', '.join(classes)})"
        raise DataError(
            f"--model: {model_path} has a classification head for {model_config.num_labels} labels "
            f"({', '.join(map(str, model_config.id2label.values()))}) but the task needs {what}; use the model "
            "without its head, or matching data"
        )
    vocab_size = getattr(model_config, "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise DataError(
            f"--model: {model_path}: the tokenizer has {len(tokenizer)} tokens but the model embeds only "
            f"vocab_size={vocab_size} ({where}); tokenizer and weights do not belong together"
        )
