"""Causal language modelling (decoder LLMs: Llama, Qwen, Mistral, GPT-2, ...) for ``--task causal-lm``.

Data: CSV or JSONL in one of two formats, told apart by the columns of ``--data``.

* Instruction format, when the file has both ``--prompt-column`` and ``--response-column`` (default "prompt" and
  "response"): each example is the prompt's tokens (with the tokenizer's special tokens, e.g. Llama's BOS), then the
  response's tokens and EOS. The loss is on the response and its EOS only (prompt tokens are labelled -100). Put any
  separator or chat template into the prompt: the two are joined as tokens, not as strings, so that the boundary is
  exact. An example longer than ``--max-length`` loses tokens from the prompt's start (a leading BOS stays); the
  response is never cut, and one that does not fit with its EOS is an error. Examples are padded per batch (right).
* Plain text otherwise, from ``--text-column`` (default "text"): every text is tokenised, EOS appended, and all
  texts concatenated and cut into blocks of ``--max-length`` tokens (packing, as transformers' ``run_clm.py``
  ``group_texts``; the last, shorter block is kept, where run_clm drops it, so a small file still trains). Packing
  rather than padding each text: no step is spent on padding, texts longer than a block are not truncated but train
  in full, and every batch has the same shape, so memory and time per step are steady (the benchmark compares
  them). The cost is that a block may span two texts, separated by EOS, as in run_clm and most LLM pre-training.

The train/eval split (``--eval-fraction``, seeded) is by text or example, before packing, so that no text is in
both; ``--eval-data`` must have the training file's columns.

Metrics: ``perplexity`` (the headline) and ``eval_loss``, the mean cross-entropy per predicted token (labels -100
excluded, the label shift of transformers' causal-LM loss) over the whole eval set; perplexity is its exponential.
:meth:`CausalLMTask.evaluate` runs its own no-grad loop that sums token losses batch by batch, so the logits of only
one batch exist at a time (``Trainer.predict`` would gather batch x length x vocabulary logits for the whole set),
and the mean is exact over tokens (the Trainer's ``eval_loss`` is a mean of batch means, which weighs the tokens of
short batches more).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimfit.data import DataError, jsonl_records
from slimfit.finetune.options import FinetuneConfig
from slimfit.tasks.base import Task, first_line, require_model_folder, resolve_max_length, validation_instead

IGNORE_INDEX = -100
"""The label of tokens that are not predicted (prompt, padding): transformers' and torch's ``ignore_index``."""
_ACCEPTED = "CSV or JSONL with a text column, or prompt and response columns"
#: Texts tokenised at once (one batched call of the fast tokenizer each).
_CHUNK = 1000


@dataclass
class CausalLMTask(Task):
    """Language modelling of plain text (packed blocks) or of responses to prompts (``instruction``).

    ``train_dataset`` / ``eval_dataset`` hold ``input_ids`` and ``labels`` (``input_ids`` with -100 for prompt
    tokens; the model shifts them); ``examples`` counts texts or prompt-response pairs, ``blocks`` packed blocks.
    """

    name: ClassVar[str] = "causal-lm"
    metric_names: ClassVar[tuple[str, ...]] = ("perplexity", "eval_loss")
    lora_task_type: ClassVar[str | None] = "CAUSAL_LM"
    # The pretrained head: no adapter on it, and under peft's CAUSAL_LM type it stays frozen.
    head_modules: ClassVar[tuple[str, ...]] = ("lm_head",)
    loss_over_step_tokens = True

    instruction: bool = False
    blocks: dict[str, int] = field(default_factory=dict)

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_path)
        # A key/value cache in training would keep every layer's full keys and values alive until the forward ends,
        # the compressed copies saved for backward notwithstanding.
        model.config.use_cache = False
        return model

    def compute_metrics(self, predictions: np.ndarray | tuple[np.ndarray, ...], label_ids: Any) -> dict[str, float]:
        logits = predictions[0] if isinstance(predictions, tuple) else predictions
        losses, counts = token_losses(torch.as_tensor(logits), torch.as_tensor(label_ids))
        return language_model_metrics(losses.double().sum(), counts.sum())

    def evaluate(self, trainer: Any) -> dict[str, float]:
        """:func:`language_model_metrics` over ``eval_dataset``, batch by batch without gradients.

        The Trainer's eval dataloader places batches on the device and shards them across processes;
        ``gather_for_metrics`` collects every process's per-sequence sums, without the duplicates that even out the
        shards."""
        model = trainer.model
        training = model.training
        model.eval()
        loss = torch.zeros((), dtype=torch.float64)
        tokens = torch.zeros((), dtype=torch.int64)
        try:
            with torch.no_grad():
                for batch in trainer.get_eval_dataloader(self.eval_dataset):
                    labels = batch.pop("labels")
                    with trainer.compute_loss_context_manager():
                        logits = model(**batch).logits
                    sums, counts = trainer.accelerator.gather_for_metrics(token_losses(logits, labels))
                    loss += sums.double().sum().cpu()
                    tokens += counts.sum().cpu()
        finally:
            model.train(training)
        return language_model_metrics(loss, tokens)

    def describe(self) -> str:
        if self.instruction:
            return f"{self.examples['train']} train / {self.examples['eval']} eval prompt-response pairs"
        return (
            f"{self.examples['train']} train / {self.examples['eval']} eval texts in {self.blocks['train']} / "
            f"{self.blocks['eval']} blocks of up to {self.max_length} tokens"
        )


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed cross-entropy of each labelled token given the tokens before it, and the number of
    those tokens (``labels`` -100 excluded; position ``t`` predicts label ``t + 1``, as transformers' causal-LM loss).

    ``logits``: [batch, length, vocabulary]; ``labels``: [batch, length]. In float32 at least, like that loss."""
    targets = labels[:, 1:].long()
    flat = logits[:, :-1].flatten(0, 1)
    losses = F.cross_entropy(
        flat.to(torch.promote_types(flat.dtype, torch.float32)),
        targets.flatten().to(flat.device),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.view(targets.shape).sum(1), (targets != IGNORE_INDEX).sum(1).to(losses.device)


def language_model_metrics(loss: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """``eval_loss``: summed token ``loss`` / ``tokens`` (NaN for none); ``perplexity``: its exponential (inf, not an
    overflow, for a diverged run)."""
    mean = loss.double() / tokens
    return {"perplexity": float(torch.exp(mean)), "eval_loss": float(mean)}


# --------------------------------------------------------------------------------------------------- loading


def read_table(path: Path, option: str) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """The column names of a CSV (its header) or JSONL file (its first object) and its records, each with where it
    is ("row 3", "line 2") for error messages."""
    if not path.is_file():
        raise DataError(f"{option}: no such file: {path} (accepted: {_ACCEPTED})")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = [(f"row {number}", row) for number, row in enumerate(reader, start=2)]
            return list(reader.fieldnames or []), rows
    if suffix not in (".jsonl", ".ndjson"):
        raise DataError(f"{option}: unsupported format {suffix or path.name!r} of {path}; accepted: {_ACCEPTED}")
    records = [(f"line {number}", record) for number, record in jsonl_records(path)]
    return (list(records[0][1]) if records else []), records


def select_columns(
    path: Path, table: tuple[list[str], list[tuple[str, dict[str, Any]]]], columns: Sequence[tuple[str, str]]
) -> list[list[str]]:
    """The values of ``columns`` ((name, option) pairs) of every record of ``table`` (:func:`read_table` of
    ``path``): non-empty strings."""
    available, records = table
    if not records:
        raise DataError(f"{path}: no examples found")
    for column, column_option in columns:
        if column not in available:
            listed = ", ".join(map(str, available)) or "none"
            raise DataError(f"{path}: no column {column!r} (available: {listed}); choose one with {column_option}")
    values: list[list[str]] = [[] for _ in columns]
    for where, record in records:
        for found, (column, column_option) in zip(values, columns, strict=True):
            value = record.get(column)
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"{path}: {where} has no text in {column!r} (found {value!r}); causal-lm needs a non-empty "
                    f"string in every example (remove it, or choose another {column_option})"
                )
            found.append(value)
    return values


def split(values: list[list[str]], fraction: float, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """A seeded random split of the examples (columns ``values``) into (train, eval), each in the file's order."""
    from sklearn.model_selection import train_test_split

    count = len(values[0])
    try:
        train, evaluation = train_test_split(np.arange(count), test_size=fraction, random_state=seed)
    except ValueError as error:
        raise DataError(f"--eval-fraction: {fraction} cannot split {count} examples ({first_line(error)})") from error
    train_values, eval_values = (
        [[column[i] for i in sorted(part)] for column in values] for part in (train, evaluation)
    )
    return train_values, eval_values


# ------------------------------------------------------------------------------------------------- tokenising


def _token_ids(tokenizer: Any, texts: Sequence[str], special_tokens: bool) -> list[list[int]]:
    return [
        ids
        for start in range(0, len(texts), _CHUNK)
        for ids in tokenizer(list(texts[start : start + _CHUNK]), add_special_tokens=special_tokens)["input_ids"]
    ]


def pack_texts(tokenizer: Any, texts: Sequence[str], block: int) -> list[dict[str, list[int]]]:
    """Every text's tokens (with the tokenizer's special tokens) and EOS, concatenated and cut into ``block``-token
    blocks, the last one shorter; labels are the tokens themselves."""
    stream = [token for ids in _token_ids(tokenizer, texts, True) for token in (*ids, tokenizer.eos_token_id)]
    return [
        {"input_ids": stream[start : start + block], "labels": stream[start : start + block]}
        for start in range(0, len(stream), block)
    ]


def encode_pairs(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int, source: str
) -> list[dict[str, list[int]]]:
    """Prompt tokens (labelled -100) then response tokens and EOS; too long: the prompt loses tokens from its start
    (a leading BOS stays). A response that does not fit with its EOS is a DataError naming ``source``."""
    answers = [ids + [tokenizer.eos_token_id] for ids in _token_ids(tokenizer, responses, False)]
    too_long = [i for i, ids in enumerate(answers) if len(ids) > max_length]
    if too_long:
        raise DataError(
            f"{source}: {len(too_long)} of {len(answers)} responses are longer than --max-length {max_length} tokens "
            f"with their EOS (first: example {too_long[0] + 1}, {len(answers[too_long[0]])} tokens); responses are "
            "never truncated: raise --max-length or shorten them"
        )
    features = []
    for prompt, answer in zip(_token_ids(tokenizer, prompts, True), answers, strict=True):
        room = max_length - len(answer)
        if len(prompt) > room:
            head = prompt[:1] if room and prompt[0] == tokenizer.bos_token_id else []
            prompt = head + prompt[len(prompt) - room + len(head) :]
        features.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return features


# ------------------------------------------------------------------------------------------------------- task


def prepare(config: FinetuneConfig) -> CausalLMTask:
    """Check the model, read and split the data (plain text or prompt-response pairs), and tokenise both splits."""
    if config.model is None:
        raise DataError("--model: causal-lm needs a local causal language model folder (e.g. a Llama or Qwen one)")
    if config.data is None:
        raise DataError(f"--data: causal-lm needs a {_ACCEPTED}")
    model_path = Path(config.model)
    require_model_folder(model_path)
    data_path = Path(config.data)
    table = read_table(data_path, "--data")
    instruction = {config.prompt_column, config.response_column} <= set(table[0])
    if instruction:
        columns = [(config.prompt_column, "--prompt-column"), (config.response_column, "--response-column")]
    else:
        columns = [(config.text_column, "--text-column (or --prompt-column and --response-column)")]
    data = select_columns(data_path, table, columns)
    if config.eval_data:
        eval_path = Path(config.eval_data)
        train, evaluation = data, select_columns(eval_path, read_table(eval_path, "--eval-data"), columns)
    else:
        train, evaluation = split(data, config.eval_fraction, config.seed)
    train, evaluation = validation_instead(train, evaluation, split, config)
    model_config, tokenizer = _load_model_files(model_path)
    tokens = resolve_max_length(config, model_config, tokenizer, model_path)

    if instruction:
        train_features = encode_pairs(tokenizer, *train, tokens, str(config.data))
        eval_features = encode_pairs(tokenizer, *evaluation, tokens, str(config.eval_data or config.data))
    else:
        train_features, eval_features = (pack_texts(tokenizer, part[0], tokens) for part in (train, evaluation))

    from transformers import DataCollatorForSeq2Seq

    return CausalLMTask(
        model_path=model_path,
        model_name=config.model,
        train_dataset=train_features,
        eval_dataset=eval_features,
        # Pads input_ids with the pad token and labels with -100 (not the pad id, which may be EOS: EOS is learnt).
        collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8),
        processor=tokenizer,
        examples={"train": len(train[0]), "eval": len(evaluation[0])},
        max_length=tokens,
        instruction=instruction,
        blocks={} if instruction else {"train": len(train_features), "eval": len(eval_features)},
    )


def _load_model_files(model_path: Path) -> tuple[Any, Any]:
    """The config and tokenizer of a causal LM (pad token: EOS when it has none), or a DataError saying why not."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise DataError(f"--model: cannot read {model_path}/config.json: {first_line(error)}") from error
    if type(model_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise DataError(
            f"--model: {model_path} is a {model_config.model_type!r} model, which transformers has no causal "
            "language-model head for (AutoModelForCausalLM)"
        )
    # Encoders (BERT, RoBERTa) have an LM-head class too, but it attends to later tokens unless made a decoder.
    if getattr(model_config, "is_decoder", True) is False:
        raise DataError(
            f"--model: {model_path} is a {model_config.model_type!r} encoder (is_decoder is false in its "
            "config.json); causal-lm needs a decoder language model"
        )
    try:
        # Right padding: positions count from the first token, as in training without padding.
        tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="right")
    except (OSError, ValueError) as error:
        raise DataError(f"--model: cannot load a tokenizer from {model_path}: {first_line(error)}") from error
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"--model: the tokenizer in {model_path} has no EOS token; causal-lm ends every text and response with it"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked and labelled -100 anyway
    vocab_size = getattr(model_config, "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise DataError(
            f"--model: {model_path}: the tokenizer has {len(tokenizer)} tokens but the model embeds only "
            f"vocab_size={vocab_size} ({model_path}/config.json); tokenizer and weights do not belong together"
        )
    return model_config, tokenizer
