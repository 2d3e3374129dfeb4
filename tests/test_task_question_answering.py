"""The question-answering task: SQuAD loading, windows and their labels, post-processing, SQuAD metrics, checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from slimfit.data import DataError
from slimfit.finetune.options import FinetuneConfig
from slimfit.tasks import question_answering as qa
from slimfit.tasks.question_answering import QAExample

WORDS = (
    "what who where color is the a of sky blue grass green cat sat on mat dog ran in park john lives paris "
    "and then it was very nice day sun shone bird sang tree old man walked home red ? . ,"
).split()
FILLER = "and then it was a very nice day the sun shone the bird sang in the old tree".split()


def save_qa_bert(folder: Path, max_positions: int = 64) -> Path:
    """A 2-layer, hidden-32 BERT folder (no QA head yet) with a fast WordPiece tokenizer over ``WORDS``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(str(vocab)).save_pretrained(folder)
    config = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_qa_bert(tmp_path_factory.mktemp("qa_bert"))


def qa_config(data: str | None, **options) -> FinetuneConfig:
    """Options for the tiny model: short windows, an eval split of 1 in 4."""
    defaults = {"eval_fraction": 0.25, "max_length": 32, "doc_stride": 8}
    return FinetuneConfig(task="question-answering", data=data, **{**defaults, **options})


def record(qid: str, question: str, context: str, answers: list[str]) -> dict:
    """A JSONL record; each answer's start is its first occurrence in the context."""
    return {
        "id": qid,
        "question": question,
        "context": context,
        "answers": {"text": answers, "answer_start": [context.index(a) for a in answers]},
    }


RECORDS = [
    record("q1", "what color is the sky?", "the sky is blue and the grass is green.", ["blue"]),
    record("q2", "what color is the grass?", "the sky is blue and the grass is green.", ["green", "green."]),
    record("q3", "who sat on the mat?", "the cat sat on the mat.", ["the cat", "cat"]),
    record("q4", "where does john live?", "john lives in paris.", ["paris"]),
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_squad(path: Path, records: list[dict], version: str = "1.1") -> Path:
    """The official nested format: questions on the same context share a paragraph."""
    paragraphs: dict[str, list[dict]] = {}
    for r in records:
        answers = [
            {"text": t, "answer_start": s}
            for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"], strict=True)
        ]
        question = {"id": r["id"], "question": r["question"], "answers": answers}
        if version == "2.0":
            question["is_impossible"] = not answers
        paragraphs.setdefault(r["context"], []).append(question)
    data = [{"title": "t", "paragraphs": [{"context": c, "qas": q} for c, q in paragraphs.items()]}]
    path.write_text(json.dumps({"version": version, "data": data}))
    return path


def tokenizer_of(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# ---------------------------------------------------------------------------------------------------- loading


def test_squad_json_and_jsonl_load_the_same_examples(tmp_path):
    from_json = qa.load_examples(write_squad(tmp_path / "d.json", RECORDS))
    from_jsonl = qa.load_examples(write_jsonl(tmp_path / "d.jsonl", RECORDS))
    assert from_json == from_jsonl
    assert from_json[1] == QAExample(
        "q2", "what color is the grass?", "the sky is blue and the grass is green.", ("green", "green."), (33, 33)
    )


def test_squad_v2_unanswerable_questions(tmp_path, model_dir):
    negative = record("q5", "who sang?", "the sky is blue and the grass is green.", [])
    path = write_squad(tmp_path / "v2.json", [*RECORDS, negative], version="2.0")
    document = json.loads(path.read_text())  # v2 keeps plausible answers beside is_impossible: ignored
    document["data"][0]["paragraphs"][0]["qas"][-1]["plausible_answers"] = [{"text": "blue", "answer_start": 11}]
    path.write_text(json.dumps(document))
    examples = qa.load_examples(path)
    assert [e.answers for e in examples if e.id == "q5"] == [()]
    from_jsonl = qa.load_examples(write_jsonl(tmp_path / "v2.jsonl", [*RECORDS, negative]))
    assert sorted(from_jsonl, key=lambda e: e.id) == sorted(examples, key=lambda e: e.id)  # JSON groups by context

    task = qa.prepare(qa_config(str(path), model=str(model_dir), eval_data=str(path)))
    assert task.allow_null
    q5 = [w for w, index in enumerate(task.eval_windows.example) if task.eval_examples[index].id == "q5"]
    assert [(task.eval_dataset[w]["start_positions"], task.eval_dataset[w]["end_positions"]) for w in q5] == [(0, 0)]
    assert task.describe() == "5 train / 5 eval questions (5 / 5 windows), with unanswerable questions"


def test_answer_not_at_answer_start_names_the_question_and_file(tmp_path):
    broken = record("q-bad", "who sat?", "the cat sat on the mat.", ["cat"])
    broken["answers"]["answer_start"] = [0]
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], broken])
    with pytest.raises(DataError, match=r"bad\.jsonl: question 'q-bad': answer 'cat' is not at answer_start 0"):
        qa.load_examples(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "\n", r"--data: .*empty\.jsonl is empty"),
        (
            "nokey.jsonl",
            json.dumps({"id": "x", "question": "q", "answers": {"text": [], "answer_start": []}}),
            r"nokey\.jsonl: line 1 has no 'context' key",
        ),
        ("noqas.json", json.dumps({"data": [{"paragraphs": [{"context": "c"}]}]}), r"noqas\.json: .*no 'qas' key"),
        ("data.csv", "id,question\n", r"--data: unsupported format '\.csv'"),
    ],
)
def test_unusable_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message) as error:
        qa.load_examples(tmp_path / name)
    assert "\n" not in str(error.value)


def test_prepare_needs_data():
    with pytest.raises(DataError, match="--data: question answering needs a SQuAD-format JSON or JSONL file"):
        qa.prepare(qa_config(None))


def test_eval_fraction_split_is_seeded_and_by_context(tmp_path, model_dir):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    from slimfit import tasks

    # A JSONL with question and context is question answering for slimfit.tasks.prepare without --task.
    config, first = tasks.prepare(dataclasses.replace(qa_config(str(path), model=str(model_dir), seed=3), task=None))
    assert config.task == "question-answering" and isinstance(first, qa.QuestionAnsweringTask)
    again = qa.prepare(qa_config(str(path), model=str(model_dir), seed=3))
    assert first.examples["train"] + first.examples["eval"] == 4 and first.examples["eval"] >= 1
    assert first.eval_examples == again.eval_examples
    # q1 and q2 ask about the same paragraph: they are never split apart, for any seed.
    for seed in range(8):
        train, evaluation = qa.split_examples(qa.load_examples(path, "--data"), 0.25, seed)
        assert {e.context for e in train}.isdisjoint(e.context for e in evaluation)
    assert not first.allow_null
    assert set(first.eval_dataset[0]) == {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "start_positions",
        "end_positions",
    }


def test_validate_evaluates_on_a_split_of_the_training_questions(tmp_path, model_dir):
    more = [record(f"m{i}", "who sat on the mat?", f"the cat sat on the mat {i} times.", ["the cat"]) for i in range(8)]
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS + more)
    plain, validated = (
        qa.prepare(qa_config(str(path), model=str(model_dir), seed=3, validate=v)) for v in (False, True)
    )
    plain_train = {e.id for e in qa.split_examples(qa.load_examples(path, "--data"), 0.25, 3)[0]}
    validation = {e.id for e in validated.eval_examples}
    assert validation and validation < plain_train
    assert validation.isdisjoint(e.id for e in plain.eval_examples)
    assert validated.examples["train"] + validated.examples["eval"] == plain.examples["train"]


# ---------------------------------------------------------------------------------------------------- windows


def test_long_context_answer_only_in_the_second_window(model_dir):
    tokenizer = tokenizer_of(model_dir)
    context = " ".join(FILLER) + " john lives in paris ."
    example = QAExample("long", "where does john live?", context, ("paris",), (context.index("paris"),))
    windows = qa.tokenize_windows(tokenizer, [example], max_length=24, doc_stride=6)
    assert len(windows.features) == 2 and list(windows.example) == [0, 0]
    first, second = windows.features
    assert (first["start_positions"], first["end_positions"]) == (0, 0)
    start, end = second["start_positions"], second["end_positions"]
    assert 0 < start <= end
    span = windows.offsets[1]
    assert context[span[start, 0] : span[end, 1]] == "paris"
    assert tokenizer.decode(second["input_ids"][start : end + 1]) == "paris"
    # Both windows begin with the question; only context tokens carry offsets.
    question_ids = tokenizer("where does john live?")["input_ids"][:-1]
    assert all(list(f["input_ids"][: len(question_ids)]) == question_ids for f in windows.features)
    assert (windows.offsets[0][: len(question_ids) + 1] == -1).all()


def test_multi_token_answer_in_one_window(model_dir):
    tokenizer = tokenizer_of(model_dir)
    context = "the old man walked home ."
    example = QAExample("m", "who walked home?", context, (" old man ",), (3,))  # blanks around the answer
    [feature] = qa.tokenize_windows(tokenizer, [example], max_length=32, doc_stride=8).features
    ids = feature["input_ids"][feature["start_positions"] : feature["end_positions"] + 1]
    assert tokenizer.decode(ids) == "old man"
    # An answer starting inside a token (here an unknown word) is labelled with the token that holds it.
    context = "john lives in bigparis ."
    example = QAExample("inside", "where does john live?", context, ("paris",), (context.index("paris"),))
    [feature] = qa.tokenize_windows(tokenizer, [example], max_length=32, doc_stride=8).features
    start, end = feature["start_positions"], feature["end_positions"]
    assert start == end and tokenizer.convert_ids_to_tokens(int(feature["input_ids"][start])) == "[UNK]"


def test_question_leaving_no_room_beyond_the_stride_is_refused(model_dir):
    example = QAExample("wordy", "what " * 20 + "?", "the cat sat.", ("cat",), (4,))
    with pytest.raises(DataError, match=r"--doc-stride: question 'wordy' .*raise --max-length or lower --doc-stride"):
        qa.tokenize_windows(tokenizer_of(model_dir), [example], max_length=24, doc_stride=8)


# ---------------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Cat", "cat"),
        ("a cat, an owl and the dog!", "cat owl and dog"),
        ("  Blue\tsky \n", "blue sky"),
        ("theatre", "theatre"),  # articles only as whole words
        ("U.S.A.", "usa"),
    ],
)
def test_normalize_answer(text, normalized):
    assert qa.normalize_answer(text) == normalized


def test_exact_match_and_f1_by_hand():
    assert qa.exact_match_score("The cat.", "cat") == 1.0
    assert qa.exact_match_score("the cat sat", "cat") == 0.0
    # prediction {cat, sat}, gold {cat, sat, on, mat}: precision 1, recall 1/2 -> F1 2/3
    assert qa.f1_score("the cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    # repeated tokens count once per match: {blue, blue, sky} vs {blue, sky}: P 2/3, R 1 -> 0.8
    assert qa.f1_score("blue blue sky", "blue sky") == pytest.approx(0.8)
    assert qa.f1_score("green", "blue") == 0.0
    assert qa.f1_score("", "") == 1.0 and qa.f1_score("", "blue") == 0.0


def test_squad_metrics_max_over_gold_answers_and_mean_over_questions():
    metrics = qa.squad_metrics(["cat sat", "paris"], [["the cat", "cat sat on the mat"], ["paris"]])
    # question 1: best F1 over golds max(2/3, 2/3) = 2/3, EM 0; question 2: 1 and 1.
    assert metrics == pytest.approx({"f1": (2 / 3 + 1) / 2, "exact_match": 0.5})


def test_squad_metrics_with_unanswerable_questions():
    predictions = ["blue", "", "", "green grass"]
    gold = [["blue"], [], ["paris"], []]
    metrics = qa.squad_metrics(predictions, gold)
    # F1 per question: 1, 1 (no answer, right), 0, 0 (answered an unanswerable one)
    assert metrics == pytest.approx({"f1": 0.5, "exact_match": 0.5, "has_answer_f1": 0.5, "no_answer_accuracy": 0.5})


def hand_windows() -> tuple[qa.Windows, list[str]]:
    """Two examples: example 0 in windows 0 and 1 (lengths 6 and 5), example 1 in window 2 (length 4).

    Token layout per window: 0 = CLS, 1 = question, 2 = SEP, then context tokens, then SEP.
    """
    contexts = ["red sky blue sky green", "old man"]
    offsets = [
        np.array([[-1, -1], [-1, -1], [-1, -1], [0, 3], [4, 7], [-1, -1]]),  # "red" "sky"
        np.array([[-1, -1], [-1, -1], [-1, -1], [8, 12], [13, 16]]),  # "blue" "sky", then padding to 6
        np.array([[-1, -1], [-1, -1], [0, 3], [4, 7]]),  # "old" "man"
    ]
    return qa.Windows([{}, {}, {}], np.array([0, 0, 1]), offsets), contexts


def test_best_span_is_chosen_across_windows_and_padding_is_ignored():
    windows, contexts = hand_windows()
    pad = -100.0
    start = np.array(
        [
            [1.0, 9.0, 0.0, 2.0, 1.0, 0.0],  # the question token scores high but is not context
            [1.0, 0.0, 0.0, 4.0, 1.0, pad],  # "blue" starts best
            [0.0, 0.0, 5.0, 1.0, pad, pad],
        ]
    )
    end = np.array(
        [
            [1.0, 9.0, 0.0, 1.0, 2.0, 0.0],  # best here: "red sky", 2 + 2 = 4
            [1.0, 0.0, 0.0, 0.0, 3.0, pad],  # best here: "blue sky", 4 + 3 = 7 -> wins for example 0
            [0.0, 0.0, 1.0, 3.0, pad, pad],  # "old man", 5 + 3
        ]
    )
    answers = qa.best_answers(start, end, windows, contexts, allow_null=False, max_answer_length=30)
    assert answers == ["blue sky", "old man"]
    # At most one token: example 0 takes "blue" (4 + 0) over "sky" (1 + 3) and "red" (2 + 1) ...
    assert qa.best_answers(start, end, windows, contexts, False, max_answer_length=1) == ["blue", "old"]
    # ... and an end before the start never counts: ends favour "red", starts "sky", in window 0 only.
    start[1, 3:5], end[1, 3:5] = -50.0, -50.0
    start[0, 3:5], end[0, 3:5] = [1.0, 6.0], [6.0, 0.0]  # "sky".."red" would score 12; "red" scores 7
    assert qa.best_answers(start, end, windows, contexts, False, 30)[0] == "red"


def test_no_answer_wins_when_the_null_score_is_higher():
    windows, contexts = hand_windows()
    start = np.zeros((3, 6))
    end = np.zeros((3, 6))
    start[:, 0] = end[:, 0] = [5.0, 3.0, 1.0]  # null scores 10 and 6 (min over windows: 6) and 2
    start[1, 3] = end[1, 4] = 2.5  # example 0: best span "blue sky" = 5 < 6 -> no answer
    start[2, 2] = end[2, 3] = 1.5  # example 1: "old man" = 3 > 2 -> answer
    assert qa.best_answers(start, end, windows, contexts, True, 30) == ["", "old man"]
    assert qa.best_answers(start, end, windows, contexts, False, 30) == ["blue sky", "old man"]
    start[1, 3] = 3.5  # 6 = 6: a tie keeps the span
    assert qa.best_answers(start, end, windows, contexts, True, 30)[0] == "blue sky"


# ---------------------------------------------------------------------------------------------------- model checks


def test_a_model_type_without_a_question_answering_head_is_refused(tmp_path):
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"--model: .*'vit' model, which transformers has no question-answering head"):
        qa.prepare(qa_config(str(data), model=str(tmp_path / "vit")))


def test_max_length_beyond_the_positions_is_refused(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"--max-length: 65 tokens .*at most 64: max_position_embeddings"):
        qa.prepare(qa_config(str(data), model=str(model_dir), max_length=65))
    # Without --max-length, the question-answering default (384) is capped at what the model takes.
    assert qa.prepare(qa_config(str(data), model=str(model_dir), max_length=None)).max_length == 64


def test_a_slow_tokenizer_is_refused(tmp_path, model_dir, monkeypatch):
    import transformers
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    slow = BertTokenizerLegacy(str(model_dir / "vocab.txt"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: slow)
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"--model: .* slow \(Python\) tokenizer, BertTokenizerLegacy"):
        qa.prepare(qa_config(str(data), model=str(model_dir)))


# ---------------------------------------------------------------------------------------------------- end to end


def test_trainer_trains_and_predicts_through_compute_metrics(tmp_path, model_dir):
    import torch
    from transformers import Trainer, TrainingArguments

    long = record("long", "where does john live?", " ".join(FILLER) + " john lives in paris .", ["paris"])
    negative = record("none", "who sang?", "the cat sat on the mat.", [])
    data = write_jsonl(tmp_path / "train.jsonl", [*RECORDS, long, negative])
    task = qa.prepare(qa_config(str(data), model=str(model_dir), eval_data=str(data), max_length=24, doc_stride=6))
    assert task.windows["eval"] > task.examples["eval"]  # the long context spans several windows
    torch.manual_seed(0)
    model = task.build_model()
    assert model.qa_outputs.out_features == 2
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=3,  # batches of different lengths: the Trainer pads logits with -100
        report_to=[],
        save_strategy="no",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=task.train_dataset,
        eval_dataset=task.eval_dataset,
        data_collator=task.collator,
        processing_class=task.processor,
        compute_metrics=lambda p: task.compute_metrics(p.predictions, p.label_ids),
    )
    trainer.train()
    output = trainer.predict(task.eval_dataset)
    assert output.predictions[0].shape[0] == task.windows["eval"]
    assert (output.predictions[0] == -100).any()  # the padding case is exercised
    metrics = task.compute_metrics(output.predictions, output.label_ids)
    assert set(metrics) == set(task.metric_names)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    # The eval features carry labels, so the Trainer computes the metrics itself too.
    assert output.metrics["test_f1"] == pytest.approx(metrics["f1"])
