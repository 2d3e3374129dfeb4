"""Extractive question answering (SQuAD) for ``slimfit finetune --task question-answering``.

Data: the official SQuAD v1.1 / v2.0 JSON (``data -> paragraphs -> qas``; v2 marks unanswerable questions with
``is_impossible``) or JSONL with one question per line: ``id``, ``question``, ``context`` and
``answers = {"text": [...], "answer_start": [...]}`` (empty lists: unanswerable). Every answer must appear in its
context at ``answer_start``.

Contexts longer than ``--max-length`` are cut into windows that overlap by ``--doc-stride`` tokens, the question
first in each window; only the context is truncated. A training window points at its answer's first and last token,
or at token 0 (CLS) when it does not hold the whole (first) answer or the question has none.

Unanswerable questions ("SQuAD 2.0 mode") are detected from the data, not from a version field: when the training
or the evaluation set holds any, post-processing may answer "no answer" (the null score, start + end logit of token
0, beats the best span), and when the evaluation set holds any, the metrics add ``has_answer_f1`` and
``no_answer_accuracy``.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from slimfit.data import DataError
from slimfit.finetune.options import BUNDLED_MODEL, FinetuneConfig
from slimfit.tasks.base import (
    Task,
    default_model_path,
    first_line,
    require_model_folder,
    resolve_max_length,
    validation_instead,
)

#: Start and end candidates per window considered by post-processing (as in the SQuAD reference scripts).
N_BEST = 20
#: Examples tokenised at once: the tokenizer's Python lists are turned into compact arrays chunk by chunk.
_CHUNK = 1000
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ACCEPTED = "SQuAD .json (data -> paragraphs -> qas) or .jsonl (id, question, context, answers)"


@dataclass(frozen=True)
class QAExample:
    """One question on one context; ``answers`` empty: unanswerable."""

    id: str
    question: str
    context: str
    answers: tuple[str, ...] = ()
    answer_starts: tuple[int, ...] = ()  # character offsets into ``context``


# --------------------------------------------------------------------------------------------------- loading


def load_examples(path: str | Path, option: str = "--data") -> list[QAExample]:
    """Read a SQuAD JSON or JSONL file and check that every answer is where its ``answer_start`` says."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{option}: no such file: {path} (accepted: {_ACCEPTED})")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".ndjson"):
        raise DataError(f"{option}: unsupported format {suffix or path.name!r} of {path}; accepted: {_ACCEPTED}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{option}: {path} is empty")
    examples = _read_squad(text, path) if suffix == ".json" else _read_jsonl(text, path)
    if not examples:
        raise DataError(f"{option}: {path} holds no questions")
    for example in examples:
        if not example.context.strip():
            raise DataError(f"{path}: question {example.id!r} has an empty context")
        for answer, start in zip(example.answers, example.answer_starts, strict=True):
            if not answer.strip():
                raise DataError(f"{path}: question {example.id!r} has an empty answer text (at {start})")
            found = example.context[start : start + len(answer)]
            if found != answer:
                raise DataError(
                    f"{path}: question {example.id!r}: answer {answer!r} is not at answer_start {start} of its "
                    f"context (found {found!r})"
                )
    return examples


def _get(record: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    """``record[key]``, which must exist and be of ``kind`` (one-line DataError naming file, place and key)."""
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{path}: {where} has no {key!r} key")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{path}: {where}: {key!r} must be {names}, not {type(value).__name__}")
    return value


def _read_squad(text: str, path: Path) -> list[QAExample]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from error
    examples = []
    for a, article in enumerate(_get(document, "data", list, path, "the top level")):
        for p, paragraph in enumerate(_get(article, "paragraphs", list, path, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = _get(paragraph, "context", str, path, where)
            for q, qa in enumerate(_get(paragraph, "qas", list, path, where)):
                place = f"{where}.qas[{q}]"
                qid = str(_get(qa, "id", (str, int), path, place))
                question = _get(qa, "question", str, path, place)
                answers = [] if qa.get("is_impossible") else _get(qa, "answers", list, path, place)
                texts = [
                    _get(answer, "text", str, path, f"question {qid!r} answer {i}") for i, answer in enumerate(answers)
                ]
                starts = [
                    _get(answer, "answer_start", int, path, f"question {qid!r} answer {i}")
                    for i, answer in enumerate(answers)
                ]
                examples.append(QAExample(qid, question, context, tuple(texts), tuple(starts)))
    return examples


def _read_jsonl(text: str, path: Path) -> list[QAExample]:
    # The json module rather than datasets' JSON builder: that one raises StopIteration on an empty file, hides
    # parse errors behind "An error occurred while generating the dataset" and turns a missing key into None.
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: {where} is not valid JSON ({error.msg})") from error
        qid = str(_get(record, "id", (str, int), path, where))
        question = _get(record, "question", str, path, where)
        context = _get(record, "context", str, path, where)
        answers = _get(record, "answers", dict, path, where)
        texts = _get(answers, "text", list, path, f"{where} answers")
        starts = _get(answers, "answer_start", list, path, f"{where} answers")
        if len(texts) != len(starts) or not all(isinstance(t, str) for t in texts):
            raise DataError(
                f"{path}: question {qid!r}: answers needs as many strings in 'text' as integers in 'answer_start' "
                f"(got {len(texts)} and {len(starts)})"
            )
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in starts):
            raise DataError(f"{path}: question {qid!r}: 'answer_start' must hold integers, got {starts!r}")
        examples.append(QAExample(qid, question, context, tuple(texts), tuple(starts)))
    return examples


def split_examples(examples: list[QAExample], fraction: float, seed: int) -> tuple[list[QAExample], list[QAExample]]:
    """A seeded random split into (train, eval) by context: questions on one paragraph stay on one side, so the
    evaluation never asks about a passage the model was trained on (SQuAD has about five questions per paragraph).
    ``fraction`` is the share of contexts held out; each part keeps the file's order."""
    from sklearn.model_selection import GroupShuffleSplit

    contexts = {context: i for i, context in enumerate(dict.fromkeys(e.context for e in examples))}
    groups = [contexts[e.context] for e in examples]
    try:
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        train, evaluation = next(splitter.split(np.arange(len(examples)), groups=groups))
    except ValueError as error:
        raise DataError(
            f"--eval-fraction: {fraction} cannot split the {len(contexts)} contexts of {len(examples)} questions "
            f"({first_line(error)})"
        ) from error
    return [examples[i] for i in sorted(train)], [examples[i] for i in sorted(evaluation)]


# ------------------------------------------------------------------------------------------------- windowing


@dataclass
class Windows:
    """Tokenised windows of a list of examples.

    ``features[w]`` holds the model inputs (int32 arrays) and ``start_positions`` / ``end_positions``;
    ``example[w]`` is the index of the window's example; ``offsets[w]`` ([length, 2]) the character span of each
    context token, -1 for question, special and padding tokens (they can never be part of an answer).
    """

    features: list[dict[str, Any]]
    example: np.ndarray
    offsets: list[np.ndarray]


def tokenize_windows(
    tokenizer: Any, examples: Sequence[QAExample], max_length: int, doc_stride: int, source: str = "--data"
) -> Windows:
    """Cut each (question, context) into overlapping windows and label each with its answer's tokens (or 0)."""
    _check_room(tokenizer, examples, max_length, doc_stride, source)
    inputs = [name for name in tokenizer.model_input_names if name in ("input_ids", "attention_mask", "token_type_ids")]
    features: list[dict[str, Any]] = []
    window_example: list[int] = []
    offsets: list[np.ndarray] = []
    for lo in range(0, len(examples), _CHUNK):
        chunk = examples[lo : lo + _CHUNK]
        encoded = tokenizer(
            [example.question.lstrip() for example in chunk],  # leading blanks would only waste context room
            [example.context for example in chunk],
            truncation="only_second",
            max_length=max_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        for w, index in enumerate(encoded["overflow_to_sample_mapping"]):
            sequence_ids = encoded.sequence_ids(w)
            first = sequence_ids.index(1)
            last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
            span = np.full((len(sequence_ids), 2), -1, dtype=np.int32)
            span[first : last + 1] = encoded["offset_mapping"][w][first : last + 1]
            start, end = _answer_tokens(chunk[index], span, first, last)
            feature = {name: np.asarray(encoded[name][w], dtype=np.int32) for name in inputs}
            features.append({**feature, "start_positions": start, "end_positions": end})
            window_example.append(lo + index)
            offsets.append(span)
    return Windows(features, np.asarray(window_example, dtype=np.int64), offsets)


def _check_room(tokenizer: Any, examples: Sequence[QAExample], max_length: int, doc_stride: int, source: str) -> None:
    """Each window must keep more context tokens than the overlap, or windows could not advance."""
    questions = tokenizer([e.question.lstrip() for e in examples], add_special_tokens=False)["input_ids"]
    lengths = np.array([len(ids) for ids in questions])
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - lengths
    worst = int(np.argmin(room))
    if room[worst] <= doc_stride:
        raise DataError(
            f"--doc-stride: question {examples[worst].id!r} of {source} takes {lengths[worst]} tokens, which leaves "
            f"{room[worst]} of --max-length {max_length} for its context, not more than --doc-stride {doc_stride}; "
            "raise --max-length or lower --doc-stride"
        )


def _answer_tokens(example: QAExample, span: np.ndarray, first: int, last: int) -> tuple[int, int]:
    """Token positions of the example's first answer inside a window (``span``: context tokens ``first..last``),
    or (0, 0) when the window does not hold all of it or there is none."""
    if not example.answers:
        return 0, 0
    text = example.answers[0]
    # Blanks around the answer belong to no token; leave them out so the span ends on real characters.
    begin = example.answer_starts[0] + len(text) - len(text.lstrip())
    end = example.answer_starts[0] + len(text.rstrip())
    starts, ends = span[first : last + 1, 0], span[first : last + 1, 1]
    if starts[0] > begin or ends[-1] < end:
        return 0, 0
    # Context offsets ascend: the last token starting at or before the answer, the first ending at or after it.
    return first + int(np.searchsorted(starts, begin, side="right")) - 1, first + int(np.searchsorted(ends, end))


# --------------------------------------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = text.lower().translate(_NO_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 when both normalise to the same text."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised texts; when either is empty (no answer), 1.0 only if both are."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD scores as fractions; ``""`` is "no answer", an empty gold list an unanswerable question.

    ``f1`` / ``exact_match`` take the best over the gold answers and average over all questions. When some
    questions are unanswerable, ``has_answer_f1`` averages F1 over the answerable ones and ``no_answer_accuracy``
    is the share of unanswerable ones predicted as no answer.
    """
    f1s, exact = [], []
    for prediction, answers in zip(predictions, gold_answers, strict=True):
        # As the official v2 script: gold answers that normalise to nothing do not count; none left: no answer.
        golds = [answer for answer in answers if normalize_answer(answer)] or [""]
        f1s.append(max(f1_score(prediction, gold) for gold in golds))
        exact.append(max(exact_match_score(prediction, gold) for gold in golds))
    metrics = {"f1": float(np.mean(f1s)), "exact_match": float(np.mean(exact))}
    answerable = np.array([bool(answers) for answers in gold_answers])
    if not answerable.all():
        metrics["has_answer_f1"] = float(np.mean(np.array(f1s)[answerable])) if answerable.any() else 0.0
        no_answer = [prediction == "" for prediction, ok in zip(predictions, answerable, strict=True) if not ok]
        metrics["no_answer_accuracy"] = float(np.mean(no_answer))
    return metrics


def best_answers(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    windows: Windows,
    contexts: Sequence[str],
    allow_null: bool,
    max_answer_length: int,
    n_best: int = N_BEST,
) -> list[str]:
    """Predicted answer text per example from the logits of all its windows (``""``: no answer).

    Per window, the ``n_best`` highest start and end logits over context tokens form the candidate spans (end at or
    after start, at most ``max_answer_length`` tokens); the best span over all windows of an example wins unless
    ``allow_null`` and the null score (start + end logit of token 0, the lowest over the example's windows, as in
    the SQuAD 2.0 reference post-processing) is higher. Logit rows may be longer than their window (the Trainer pads
    batches with -100); only the window's own tokens (token 0 and its context) are indexed.
    """
    best_score = np.full(len(contexts), -np.inf)
    null_score = np.full(len(contexts), np.inf)
    answers = [""] * len(contexts)
    for w, (index, span) in enumerate(zip(windows.example, windows.offsets, strict=True)):
        starts, ends = start_logits[w], end_logits[w]
        null_score[index] = min(null_score[index], starts[0] + ends[0])
        context = np.flatnonzero(span[:, 0] >= 0)
        first = context[np.argsort(-starts[context], kind="stable")[:n_best]]
        last = context[np.argsort(-ends[context], kind="stable")[:n_best]]
        scores = starts[first][:, None] + ends[last][None, :]
        length = last[None, :] - first[:, None] + 1
        scores[(length < 1) | (length > max_answer_length)] = -np.inf
        i, j = np.unravel_index(np.argmax(scores), scores.shape)
        if scores[i, j] > best_score[index]:
            best_score[index] = scores[i, j]
            answers[index] = contexts[index][span[first[i], 0] : span[last[j], 1]]
    if allow_null:
        answers = [
            "" if null > best else answer for answer, null, best in zip(answers, null_score, best_score, strict=True)
        ]
    return answers


# ------------------------------------------------------------------------------------------------------- task


@dataclass
class QuestionAnsweringTask(Task):
    """SQuAD-style extractive question answering.

    ``train_dataset`` and ``eval_dataset`` hold one feature per window: model inputs plus ``start_positions`` /
    ``end_positions`` (in the evaluation set too, so that the Trainer computes an eval loss and calls
    ``compute_metrics``, which it skips without labels). ``eval_windows`` maps the windows back to
    ``eval_examples`` for post-processing.
    """

    name = "question-answering"
    metric_names = ("f1", "exact_match", "has_answer_f1", "no_answer_accuracy")
    lora_task_type = "QUESTION_ANS"
    head_modules = ("qa_outputs",)
    new_head = ("qa_outputs",)

    eval_examples: list[QAExample] = field(default_factory=list)
    eval_windows: Windows | None = None
    allow_null: bool = False  # any unanswerable question in train or eval data (SQuAD 2.0 mode)
    max_answer_length: int = 30
    windows: dict[str, int] = field(default_factory=dict)  # window counts, like ``examples``

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering.from_pretrained(self.model_path)

    def compute_metrics(self, predictions: np.ndarray | tuple[np.ndarray, ...], label_ids: Any) -> dict[str, float]:
        start_logits, end_logits = (np.asarray(p, dtype=np.float32) for p in predictions[:2])
        if len(start_logits) != len(self.eval_windows.features):
            raise ValueError(
                f"compute_metrics: {len(start_logits)} rows of logits for {len(self.eval_windows.features)} "
                "evaluation windows (predict on the whole eval_dataset, in order)"
            )
        answers = best_answers(
            start_logits,
            end_logits,
            self.eval_windows,
            [example.context for example in self.eval_examples],
            self.allow_null,
            self.max_answer_length,
        )
        return squad_metrics(answers, [example.answers for example in self.eval_examples])

    def describe(self) -> str:
        text = (
            f"{self.examples['train']:,} train / {self.examples['eval']:,} eval questions "
            f"({self.windows['train']:,} / {self.windows['eval']:,} windows)"
        )
        return text + (", with unanswerable questions" if self.allow_null else "")


def prepare(config: FinetuneConfig) -> QuestionAnsweringTask:
    """Load, split and check the SQuAD data, check the model, and cut both splits into labelled windows."""
    if config.data is None:
        raise DataError("--data: question answering needs a SQuAD-format JSON or JSONL file")
    model_path = Path(config.model) if config.model else default_model_path()
    require_model_folder(model_path)

    examples = load_examples(config.data)
    if config.eval_data:
        train, evaluation = examples, load_examples(config.eval_data, option="--eval-data")
    else:
        train, evaluation = split_examples(examples, config.eval_fraction, config.seed)
    train, evaluation = validation_instead(train, evaluation, split_examples, config)

    from transformers import AutoConfig, AutoTokenizer, DataCollatorWithPadding
    from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING

    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        raise DataError(f"--model: cannot read {model_path}/config.json: {first_line(error)}") from error
    if type(model_config) not in MODEL_FOR_QUESTION_ANSWERING_MAPPING:
        raise DataError(
            f"--model: {model_path} is a {model_config.model_type!r} model, which transformers has no "
            "question-answering head for (AutoModelForQuestionAnswering)"
        )
    try:
        # Right padding: windows' answer positions and the Trainer's padding of logits both count from the left.
        tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="right")
    except (OSError, ValueError) as error:
        raise DataError(f"--model: cannot load a tokenizer from {model_path}: {first_line(error)}") from error
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"--model: {model_path} has a slow (Python) tokenizer, {type(tokenizer).__name__}; question answering "
            "needs a fast one (tokenizer.json) for the character offsets of tokens"
        )
    tokens = resolve_max_length(config, model_config, tokenizer, model_path)

    train_windows = tokenize_windows(tokenizer, train, tokens, config.doc_stride, str(config.data))
    eval_windows = tokenize_windows(
        tokenizer, evaluation, tokens, config.doc_stride, str(config.eval_data or config.data)
    )
    return QuestionAnsweringTask(
        model_path=model_path,
        model_name=config.model or BUNDLED_MODEL,
        train_dataset=train_windows.features,
        eval_dataset=eval_windows.features,
        # Dynamic padding: most SQuAD windows are far shorter than --max-length, and post-processing reads only
        # each window's own tokens, so padding to the batch's longest window saves compute and changes nothing.
        collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
        processor=tokenizer,
        examples={"train": len(train), "eval": len(evaluation)},
        max_length=tokens,
        eval_examples=evaluation,
        eval_windows=eval_windows,
        allow_null=any(not example.answers for example in (*train, *evaluation)),
        max_answer_length=config.max_answer_length,
        windows={"train": len(train_windows.features), "eval": len(eval_windows.features)},
    )
