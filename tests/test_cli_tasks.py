"""`slimfit finetune` / `slimfit bench` on every task: a few-step run each, task inference, and bad input per task
(one line on stderr, exit status 2, nothing written)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from checks import expect_cli_error  # noqa: E402
from tiny_bert import SPORT, TECH, save_tiny_bert  # noqa: E402
from tiny_vit import save_vit, write_classes  # noqa: E402

from slimfit import cli  # noqa: E402
from slimfit.finetune.options import FinetuneConfig  # noqa: E402
from slimfit.finetune.report import RESULT_FILES  # noqa: E402
from slimfit.tasks import infer_task  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHORT = ["--max-steps", "3", "--batch-size", "8", "--quiet"]


def write_rows(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def squad(n: int, mismatch: bool = False) -> dict:
    """SQuAD v2.0 JSON over the tiny vocabulary: the answer is the first word; every fourth question has none."""
    paragraphs = []
    for i in range(n):
        words = [(SPORT + TECH)[(i * 7 + j) % 20] for j in range(12)]
        context = " ".join(words)
        answers = [] if i % 4 == 3 else [{"text": words[0], "answer_start": 0}]
        if mismatch and i == 2:
            answers = [{"text": words[0], "answer_start": 3}]
        qa = {"id": f"q{i}", "question": "team goal", "answers": answers, "is_impossible": not answers}
        paragraphs.append({"context": context, "qas": [qa]})
    return {"version": "v2.0", "data": [{"title": "tiny", "paragraphs": paragraphs}]}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    pairs = [
        {"first": " ".join(SPORT[i % 5 : i % 5 + 4]), "second": " ".join((SPORT if i % 2 else TECH)[:4]), "y": i % 2}
        for i in range(32)
    ]
    scores = [{"text": " ".join(SPORT[: 1 + i % 4] + TECH[: 4 - i % 4]), "score": (1 + i % 4) / 4} for i in range(32)]
    (root / "qa.json").write_text(json.dumps(squad(32)))
    (root / "bad-qa.json").write_text(json.dumps(squad(8, mismatch=True)))
    bert = save_tiny_bert(root / "bert")
    # Regression needs a model without the saved 2-label head: the encoder alone, with the tokenizer.
    encoder = root / "encoder"
    transformers.AutoModel.from_pretrained(bert).save_pretrained(encoder)
    transformers.AutoTokenizer.from_pretrained(bert).save_pretrained(encoder)
    return {
        "bert": bert,
        "encoder": encoder,
        "vit": save_vit(root / "vit"),
        "pairs": write_rows(root / "pairs.csv", pairs),
        "regression": write_rows(root / "scores.csv", scores),
        "qa": root / "qa.json",
        "bad-qa": root / "bad-qa.json",
        "images": write_classes(root / "images", {"cat": 8, "dog": 8, "owl": 8}),
    }


def run(argv: list[str], output: Path) -> dict:
    assert cli.main([*argv, *SHORT, "--output", str(output)]) == 0
    assert sorted(p.name for p in output.iterdir()) == sorted(RESULT_FILES)
    return json.loads((output / "metrics.json").read_text())


def test_sentence_pairs(assets, tmp_path, capsys):
    data = ["--data", str(assets["pairs"]), "--text-column", "first", "--text-pair-column", "second"]
    metrics = run(["finetune", "--model", str(assets["bert"]), *data, "--label-column", "y"], tmp_path / "run")
    assert metrics["task"] == "classification" and metrics["config"]["text_pair_column"] == "second"
    assert {"accuracy", "f1"} <= metrics.keys()
    assert capsys.readouterr().out.startswith("task classification, model")


def test_regression_is_inferred_from_fractional_labels(assets, tmp_path, capsys):
    data = ["--data", str(assets["regression"]), "--label-column", "score"]
    metrics = run(["finetune", "--model", str(assets["encoder"]), *data], tmp_path / "run")
    assert metrics["task"] == "regression" and metrics["config"]["task"] == "regression"
    assert {"pearson", "spearman", "mse"} <= metrics.keys() and metrics["labels"] is None
    assert "pearson" in capsys.readouterr().out


def test_question_answering(assets, tmp_path):
    argv = ["finetune", "--model", str(assets["bert"]), "--data", str(assets["qa"]), "--max-length", "32"]
    metrics = run([*argv, "--doc-stride", "8"], tmp_path / "run")
    assert metrics["task"] == "question-answering" and metrics["config"]["max_length"] == 32
    assert {"f1", "exact_match"} <= metrics.keys()
    assert all(0.0 <= metrics[key] <= 1.0 for key in ("f1", "exact_match"))


def test_image_classification(assets, tmp_path):
    metrics = run(["finetune", "--model", str(assets["vit"]), "--data", str(assets["images"])], tmp_path / "run")
    assert metrics["task"] == "image-classification" and metrics["labels"] == ["cat", "dog", "owl"]
    assert metrics["memory"]["activations"] > 0


@pytest.mark.parametrize("method", ["slimfit", "lora"])
def test_finetune_saves_the_trained_model(assets, tmp_path, monkeypatch, method):
    """model/ is a plain model folder (SlimFit removed, LoRA merged) with the trained model's logits, and a later
    run takes it as --model."""
    import torch

    from slimfit.finetune import report

    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    trained = {}
    save = report.save_model

    def save_and_remember(model, processor, folder):
        model.eval()
        with torch.no_grad():
            trained["logits"] = model(pixel_values=pixels).logits
        save(model, processor, folder)

    monkeypatch.setattr(report, "save_model", save_and_remember)
    images = ["--data", str(assets["images"])]
    run(["finetune", "--model", str(assets["vit"]), *images, "--method", method], tmp_path / "run")
    folder = tmp_path / "run" / "model"
    saved = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    fresh = transformers.AutoModelForImageClassification.from_pretrained(assets["vit"])
    assert saved.state_dict().keys() == fresh.state_dict().keys()
    assert saved.config.id2label == {0: "cat", 1: "dog", 2: "owl"}
    with torch.no_grad():
        torch.testing.assert_close(saved(pixel_values=pixels).logits, trained["logits"])
    assert type(transformers.AutoImageProcessor.from_pretrained(folder)).__name__.startswith("ViTImageProcessor")
    metrics = run(["finetune", "--model", str(folder), *images, "--method", "full"], tmp_path / "again")
    assert metrics["config"]["model"] == str(folder)


def test_saved_head_is_kept_for_its_classes_only(assets, tmp_path):
    """A model saved by `slimfit finetune` keeps its head on the same classes and gets a new one on others (of the
    same number, which ignore_mismatched_sizes would not re-initialise)."""
    import torch

    from slimfit import tasks

    run(["finetune", "--model", str(assets["vit"]), "--data", str(assets["images"])], tmp_path / "run")
    folder = tmp_path / "run" / "model"
    head = transformers.AutoModelForImageClassification.from_pretrained(folder).classifier.weight
    others = write_classes(tmp_path / "others", {"ant": 4, "bee": 4, "cow": 4})

    def built_head(data: Path) -> torch.Tensor:
        config = dataclasses.replace(FinetuneConfig(), model=str(folder), data=str(data), eval_fraction=0.5)
        return tasks.prepare(config)[1].build_model().classifier.weight

    torch.testing.assert_close(built_head(assets["images"]), head)
    new = built_head(others)
    assert not torch.allclose(new, head) and 0.01 < float(new.detach().std()) < 0.03  # initializer_range 0.02


def test_bench_reports_the_tasks_metrics(assets, tmp_path):
    argv = ["bench", "--model", str(assets["encoder"]), "--data", str(assets["regression"]), "--label-column", "score"]
    assert cli.main([*argv, "--methods", "slimfit", *SHORT, "--output", str(tmp_path / "bench")]) == 0
    with (tmp_path / "bench" / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert [row["label"] for row in summary] == ["full", "slimfit@0.9"]
    assert {"pearson", "pearson_std", "spearman", "mse", "pearson_delta_points"} <= summary[0].keys()


def test_task_inference(assets):
    def inferred(path: Path, **options) -> str:
        return infer_task(dataclasses.replace(FinetuneConfig(), data=str(path), **options))

    assert inferred(assets["images"]) == "image-classification"
    assert inferred(assets["qa"]) == "question-answering"
    assert inferred(assets["regression"], label_column="score") == "regression"
    assert inferred(assets["pairs"], label_column="y") == "classification"
    assert inferred(assets["regression"], label_column="score", task="classification") == "classification"


def expect_error(capsys, tmp_path: Path, argv: list[str], *fragments: str) -> None:
    output = tmp_path / "out"
    expect_cli_error(capsys, [*argv, *SHORT, "--output", str(output)], *fragments, output=output)


def test_missing_pair_column_is_named(assets, tmp_path, capsys):
    argv = ["finetune", "--model", str(assets["bert"]), "--data", str(assets["pairs"]), "--text-column", "first"]
    expect_error(capsys, tmp_path, [*argv, "--label-column", "y", "--text-pair-column", "other"], "no column 'other'")


def test_answer_not_found_names_the_question(assets, tmp_path, capsys):
    argv = ["finetune", "--model", str(assets["bert"]), "--data", str(assets["bad-qa"]), "--max-length", "32"]
    expect_error(capsys, tmp_path, [*argv, "--doc-stride", "8"], "q2")


def test_image_folder_with_one_class(assets, tmp_path, capsys):
    data = write_classes(tmp_path / "one", {"cat": 4})
    argv = ["finetune", "--task", "image-classification", "--model", str(assets["vit"]), "--data", str(data)]
    expect_error(capsys, tmp_path, argv, "class")


def test_unreadable_image_is_named(assets, tmp_path, capsys):
    data = write_classes(tmp_path / "broken", {"cat": 4, "dog": 4})
    (data / "dog" / "img001.jpg").write_bytes(b"not a jpeg")
    argv = ["finetune", "--model", str(assets["vit"]), "--data", str(data)]
    expect_error(capsys, tmp_path, argv, "img001.jpg")


def test_regression_labels_must_be_numbers(assets, tmp_path, capsys):
    rows = [{"text": "goal match", "score": "high" if i == 5 else "0.5"} for i in range(10)]
    data = write_rows(tmp_path / "words.csv", rows)
    argv = ["finetune", "--task", "regression", "--model", str(assets["encoder"]), "--data", str(data)]
    expect_error(capsys, tmp_path, [*argv, "--label-column", "score"], "example 6 has label 'high'")


def test_torchrun_two_processes_report_once(assets, tmp_path):
    """`torchrun` runs `slimfit finetune` data parallel (gloo on CPU); only the first process prints and writes."""
    import shutil
    import subprocess
    import sys

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists() or shutil.which("slimfit", path=str(torchrun.parent)) is None:
        pytest.skip("torchrun and the installed slimfit command are needed")
    data = ["--data", str(assets["pairs"]), "--text-column", "first", "--label-column", "y"]
    argv = ["finetune", "--model", str(assets["bert"]), *data, "--freeze-ratio", "0.5", *SHORT, "--output", "run"]
    process = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--no-python", str(torchrun.parent / "slimfit"), *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repo root, whose slimfit/ would shadow the installed package
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.count("task classification, model") == 1
    assert process.stdout.count("wrote metrics.json") == 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 3
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_decoder_model_classifies_with_eos_as_padding(assets, tmp_path):
    """GPT-2-style models have no pad token: the text task pads with EOS and tells the head (a batch of texts of
    different lengths would otherwise fail in the collator or the head)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast
    from transformers.models.bert import BertTokenizerFast

    folder = tmp_path / "gpt2"
    bert = BertTokenizerFast.from_pretrained(assets["bert"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bert.backend_tokenizer, eos_token="[SEP]", unk_token="[UNK]")
    tokenizer.save_pretrained(folder)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    data = ["--data", str(assets["pairs"]), "--text-column", "first", "--label-column", "y"]
    metrics = run(["finetune", "--model", str(folder), *data, "--max-length", "16"], tmp_path / "run")
    assert metrics["task"] == "classification" and 0.0 <= metrics["accuracy"] <= 1.0
