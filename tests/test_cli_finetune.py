"""`slimfit finetune`: a run on a CSV with custom columns, its files, and one clear error per kind of bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from checks import expect_cli_error  # noqa: E402
from tiny_bert import bypass_attention_registry, save_tiny_bert, texts, write_csv  # noqa: E402

from slimfit import cli, split_columns  # noqa: E402
from slimfit.data import DataError, load_dataset, stratified_split  # noqa: E402
from slimfit.finetune.options import FinetuneConfig  # noqa: E402
from slimfit.tasks.base import classification_metrics, default_model_path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    return {"model": save_tiny_bert(root / "model"), "csv": write_csv(root / "news.csv", texts(40)), "root": root}


def finetune(assets: dict[str, Path], *extra: str, data: Path | None = None) -> list[str]:
    """Arguments of a 3-step run on the tiny model and the CSV with columns body/topic."""
    return [
        "finetune",
        "--model",
        str(assets["model"]),
        "--data",
        str(data or assets["csv"]),
        "--text-column",
        "body",
        "--label-column",
        "topic",
        "--batch-size",
        "8",
        "--max-steps",
        "3",
        "--max-length",
        "16",
        "--quiet",
        *extra,
    ]


@pytest.mark.parametrize("method", ["slimfit", "full"])
def test_finetune_writes_metrics_log_and_plots(assets, tmp_path, capsys, method):
    output = tmp_path / "run"
    args = ("--method", method, "--freeze-ratio", "0.5", "--freeze-unit", "layers", "--output", str(output))
    assert cli.main(finetune(assets, *args)) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "macro-F1" in printed and "memory: activations" in printed
    assert printed.startswith(
        f"task classification, model {assets['model']}, 36 train / 4 eval examples, 2 classes; method {method}"
    )

    metrics = json.loads((output / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["f1"] <= 1.0
    assert metrics["steps"] == 3 and metrics["seconds"] > 0
    memory = metrics["memory"]
    assert {"weights", "gradients", "optimizer_state", "activations", "scoring", "total"} <= memory.keys()
    assert all(isinstance(v, int) and v >= 0 for v in memory.values())
    assert memory["activations"] > 0
    assert (memory["scoring"] > 0) == (method == "slimfit")  # SlimFit's score snapshot; full scores nothing
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert "memory: scoring" in printed
    assert metrics["config"]["text_column"] == "body" and metrics["config"]["method"] == method
    assert metrics["config"]["model"] == str(assets["model"])
    assert metrics["labels"] == ["sport", "tech"]
    # Every module of the tiny BERT compresses under slimfit; full fine-tuning compresses nothing.
    assert metrics["uncompressed_modules"] == ([] if method == "slimfit" else None)
    assert bool(re.search(r"^uncompressed modules +none$", printed, re.MULTILINE)) == (method == "slimfit")

    with (output / "steps.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [1, 2, 3]
    expected_layers = {"full": None, "slimfit": 11}  # the tiny BERT has 22 layers; half train at 0.5
    if expected_layers[method] is not None:
        assert {int(row["trainable_layers"]) for row in rows} == {expected_layers[method]}
    for plot in ("loss.png", "memory.png", "layers.png"):
        assert (output / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The fine-tuned model, without SlimFit's modules: the keys of the model it started from.
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(output / "model")
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(assets["model"])
    assert saved.state_dict().keys() == fresh.state_dict().keys()
    tokenizers = [transformers.AutoTokenizer.from_pretrained(folder) for folder in (output / "model", assets["model"])]
    assert tokenizers[0].get_vocab() == tokenizers[1].get_vocab()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left behind
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o777 & ~umask  # not the private mode of the staging folder


def test_missing_data_file(assets, tmp_path, capsys):
    argv = finetune(assets, "--output", str(tmp_path / "o"), data=tmp_path / "nope.csv")
    expect_cli_error(capsys, argv, "nope.csv", output=tmp_path / "o")


def test_missing_column_is_named(assets, tmp_path, capsys):
    argv = finetune(assets, "--output", str(tmp_path / "o"))
    argv[argv.index("topic")] = "category"
    expect_cli_error(capsys, argv, "'category'", "--label-column", "body, topic")


def test_single_class(assets, tmp_path, capsys):
    data = write_csv(tmp_path / "one.csv", [(text, "sport") for text, _ in texts(10)])
    argv = finetune(assets, "--output", str(tmp_path / "o"), data=data)
    expect_cli_error(capsys, argv, "'sport'", "at least 2 classes")


def test_empty_texts(assets, tmp_path, capsys):
    rows = texts(10)
    rows[3] = ("   ", "tech")
    data = write_csv(tmp_path / "empty.csv", rows)
    expect_cli_error(
        capsys, finetune(assets, "--output", str(tmp_path / "o"), data=data), "1 of 10 texts in 'body' are empty"
    )


def test_unknown_model_path(assets, tmp_path, capsys):
    argv = finetune(assets, "--output", str(tmp_path / "o"))
    argv[argv.index(str(assets["model"]))] = str(tmp_path / "no-model")
    expect_cli_error(capsys, argv, "--model", "no-model")


def test_revisit_rounds_must_not_be_negative(assets, tmp_path, capsys):
    argv = finetune(assets, "--revisit-rounds", "-1", "--output", str(tmp_path / "o"))
    expect_cli_error(capsys, argv, "--revisit-rounds: -1 must be at least 0 (0: no bound)", output=tmp_path / "o")


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_small_layer_share_must_lie_in_0_1(assets, tmp_path, capsys, value):
    argv = finetune(assets, "--small-layer-share", value, "--output", str(tmp_path / "o"))
    message = f"--small-layer-share: {float(value)} is outside [0, 1] (0: every layer by score)"
    expect_cli_error(capsys, argv, message, output=tmp_path / "o")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--column-blocks", "1"), "--column-blocks: 1 must be 0 (whole matrices) or at least 2"),
        (("--column-blocks", "-2"), "--column-blocks: -2 must be 0 (whole matrices) or at least 2"),
        (("--column-blocks", "4", "--method", "full"), "--column-blocks: 4 needs --method freeze-only or slimfit"),
        (("--column-blocks", "65"), "--column-blocks: 65 blocks fit no Linear of the model outside its new head"),
    ],
)
def test_column_blocks_are_checked(assets, tmp_path, capsys, extra, message):
    expect_cli_error(capsys, finetune(assets, *extra, "--output", str(tmp_path / "o")), message, output=tmp_path / "o")


def test_column_blocks_run_writes_a_plain_model(assets, tmp_path, monkeypatch):
    """Trained as column blocks, saved with the unsplit model's keys: it loads with no key missing or left over."""
    from transformers import AutoModelForSequenceClassification

    from slimfit.finetune import loop

    split = []

    def spy(*args, **kwargs):
        split.extend(split_columns(*args, **kwargs))
        return split

    monkeypatch.setattr(loop, "split_columns", spy)
    assert cli.main(finetune(assets, "--column-blocks", "4", "--output", str(tmp_path / "o"))) == 0
    assert "bert.encoder.layer.0.attention.self.query" in split and "classifier" not in split
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["config"]["column_blocks"] == 4
    _, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o" / "model", output_loading_info=True)
    assert not any(info.values()), info


@pytest.mark.parametrize("option", ["--lr", "--slimfit-lr", "--lora-lr", "--slimfit-no-decay-lr"])
@pytest.mark.parametrize("value", ["0", "-0.001", "nan"])
def test_learning_rates_must_be_positive(assets, tmp_path, capsys, option, value):
    argv = finetune(assets, option, value, "--output", str(tmp_path / "o"))
    expect_cli_error(capsys, argv, option, value, output=tmp_path / "o")


@pytest.mark.parametrize(
    ("method", "expected"),
    [("full", 1e-5), ("grad-ckpt", 1e-5), ("slimfit", 3e-4), ("freeze-only", 3e-4), ("lora", 7e-4)],
)
def test_each_method_trains_at_its_learning_rate(method, expected):
    config = FinetuneConfig(method=method, lr=1e-5, slimfit_lr=3e-4, lora_lr=7e-4)
    assert config.method_lr == expected
    assert config.no_decay_lr is None  # every parameter at the method's rate unless asked otherwise
    separate = dataclasses.replace(config, slimfit_no_decay_lr=2e-4)
    assert separate.method_lr == expected
    assert separate.no_decay_lr == (2e-4 if method in ("slimfit", "freeze-only") else None)
    assert dataclasses.replace(config, slimfit_lr=None).method_lr == (7e-4 if method == "lora" else 1e-5)
    # Without rates: 5e-5 for full fine-tuning; the scheduled methods divide it by the share of layers that train.
    default = FinetuneConfig(method=method).method_lr
    assert default == {"full": 5e-5, "grad-ckpt": 5e-5, "lora": 5e-4}.get(method, 5e-4)


@pytest.mark.parametrize("method", ["slimfit", "freeze-only"])
@pytest.mark.parametrize(
    ("freeze_ratio", "expected"), [(0.0, 5e-5), (0.75, 2e-4), (0.8, 2.5e-4), (0.9, 5e-4), (0.95, 5e-4), (0.99, 5e-4)]
)
def test_scheduled_default_rate_follows_the_trained_share(method, freeze_ratio, expected):
    # Full fine-tuning's rate over (1 - freeze ratio), capped at the rate of 0.9; exact values, as metrics.json has.
    config = FinetuneConfig(method=method, freeze_ratio=freeze_ratio)
    assert config.method_lr == expected
    # Given rates win, whatever the ratio.
    assert dataclasses.replace(config, lr=3e-5).method_lr == 3e-5
    assert dataclasses.replace(config, lr=3e-5, slimfit_lr=4e-4).method_lr == 4e-4
    # Other methods ignore the freeze ratio.
    assert dataclasses.replace(config, method="full").method_lr == 5e-5


def test_slimfit_run_logs_the_learning_rate_each_step_used(assets, tmp_path):
    output = tmp_path / "run"
    argv = finetune(assets, "--lr", "1e-5", "--slimfit-lr", "3e-4", "--output", str(output))
    argv[argv.index("--max-steps") + 1] = "20"
    assert cli.main([*argv, "--epochs", "4"]) == 0  # 36 train examples: 5 batches of 8 per epoch
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["config"]["slimfit_lr"] == 3e-4
    with (output / "steps.csv").open() as handle:
        rates = [float(row["lr"]) for row in csv.DictReader(handle)]
    # Linear warm-up over ceil(6% of 20) = 2 steps (the Trainer's rounding), then linear decay towards 0 at step 20.
    warmup, total = 2, 20
    expected = [3e-4 * (s / warmup if s < warmup else (total - s) / (total - warmup)) for s in range(total)]
    assert expected[:3] == [0.0, 1.5e-4, 3e-4] and expected[-1] == pytest.approx(3e-4 / 18)
    assert rates == pytest.approx(expected, rel=1e-12, abs=0.0)


@pytest.mark.parametrize(
    ("method", "extra", "matrices", "no_decay"),
    [
        ("slimfit", ("--slimfit-lr", "3e-4", "--slimfit-no-decay-lr", "1e-4"), 3e-4, 1e-4),
        ("freeze-only", ("--slimfit-no-decay-lr", "2e-5"), 1e-4, 2e-5),  # 5e-5 / (1 - 0.5)
        ("slimfit", ("--slimfit-lr", "3e-4"), 3e-4, 3e-4),
        ("full", ("--lr", "4e-5", "--slimfit-no-decay-lr", "1e-4"), 4e-5, 4e-5),
    ],
)
def test_biases_and_norms_train_at_the_no_decay_rate(assets, tmp_path, monkeypatch, method, extra, matrices, no_decay):
    from slimfit.finetune import loop
    from slimfit.integrations.hf import SlimFitCallback

    built = []
    create = loop.MeteredTrainer.create_optimizer

    def spy(self, *args, **kwargs):
        optimizer = create(self, *args, **kwargs)
        scheduled = any(isinstance(c, SlimFitCallback) for c in self.callback_handler.callbacks)
        built.append((scheduled, optimizer, {id(p): n for n, p in self.model.named_parameters()}))
        return optimizer

    monkeypatch.setattr(loop.MeteredTrainer, "create_optimizer", spy)
    argv = finetune(assets, "--method", method, "--freeze-ratio", "0.5", *extra, "--output", str(tmp_path / "run"))
    assert cli.main(argv) == 0
    # A scheduled run also builds Trainers for full fine-tuning, to report its memory: check the run's own.
    runs = [(optimizer, names) for scheduled, optimizer, names in built if scheduled == (method != "full")]
    assert runs
    for optimizer, names in runs:
        # initial_lr is what the LR scheduler warms up to and decays from, so it shows the scheduler saw the rate.
        rates = {names[id(p)]: group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
        biases_and_norms = {n: r for n, r in rates.items() if n.endswith(".bias") or "LayerNorm" in n}
        others = {n: r for n, r in rates.items() if n not in biases_and_norms}
        assert len(rates) == len(names) and biases_and_norms and others
        assert set(others.values()) == {matrices}, others
        assert set(biases_and_norms.values()) == {no_decay}, biases_and_norms


def test_validate_is_announced_and_recorded(assets, tmp_path, capsys):
    output = tmp_path / "run"
    assert cli.main(finetune(assets, "--validate", "--output", str(output))) == 0
    assert "(eval: a validation split of the training part)" in capsys.readouterr().out
    assert json.loads((output / "metrics.json").read_text())["config"]["validate"] is True


def test_existing_output_is_left_untouched(assets, tmp_path, capsys):
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    expect_cli_error(capsys, finetune(assets, "--output", str(output)), "already exists")
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_exit_status_from_the_console(assets, tmp_path):
    """The real process: status 2 and one line on stderr, no traceback."""
    process = subprocess.run(
        [sys.executable, "-m", "slimfit", *finetune(assets, "--output", str(tmp_path / "o"), data=tmp_path / "x.csv")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,  # not the repo root, whose slimfit/ would shadow the installed package
    )
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [
        f"slimfit: error: --data: no such file or directory: {tmp_path / 'x.csv'}"
    ]


def test_folder_and_jsonl_inputs(tmp_path):
    for label, words in (("b", "beta"), ("a", "alpha")):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "folder" / label / f"{i}.txt").write_text(f"{words} {i}")
    data = load_dataset(tmp_path / "folder")
    assert data.label_names == ["a", "b"] and data.labels == [0, 0, 0, 1, 1, 1] and data.texts[0] == "alpha 0"

    lines = [json.dumps({"t": f"text {i}", "y": y}) for i, y in enumerate([10, 2, 2, 10, 2])]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    data = load_dataset(tmp_path / "d.jsonl", text_column="t", label_column="y")
    assert data.label_names == ["2", "10"]  # integer labels keep numeric order
    assert data.labels == [1, 0, 0, 1, 0]
    with pytest.raises(DataError, match="unsupported format"):
        (tmp_path / "d.txt").write_text("x")
        load_dataset(tmp_path / "d.txt")


def test_stratified_split_is_seeded_and_keeps_proportions():
    data = load_dataset_from_rows([(f"t{i}", "a" if i < 80 else "b") for i in range(100)])
    train, evaluation = stratified_split(data, 0.1, seed=3)
    assert len(evaluation) == 10 and sorted(evaluation.labels) == [0] * 8 + [1] * 2
    assert set(train.texts).isdisjoint(evaluation.texts) and len(train) + len(evaluation) == 100
    assert stratified_split(data, 0.1, seed=3)[1].texts == evaluation.texts
    assert stratified_split(data, 0.1, seed=4)[1].texts != evaluation.texts


def test_validate_evaluates_on_a_split_of_the_training_part(tmp_path):
    """--validate: the evaluation examples are a split of what trains without it, by the same rule, and the
    evaluation split is in neither part."""
    from slimfit.tasks import text

    unique = dict(texts(400))  # distinct texts, so distinct token ids
    data = write_csv(tmp_path / "d.csv", list(unique.items()))
    config = FinetuneConfig(
        task="classification",
        model=str(save_tiny_bert(tmp_path / "model")),
        data=str(data),
        text_column="body",
        label_column="topic",
        eval_fraction=0.2,
        seed=5,
    )
    plain, validated = (text.prepare(dataclasses.replace(config, validate=v)) for v in (False, True))

    def ids(dataset):
        return {tuple(example["input_ids"]) for example in dataset}

    assert ids(validated.train_dataset) | ids(validated.eval_dataset) == ids(plain.train_dataset)
    assert ids(validated.train_dataset).isdisjoint(ids(validated.eval_dataset))
    assert (ids(validated.train_dataset) | ids(validated.eval_dataset)).isdisjoint(ids(plain.eval_dataset))
    n = len(plain.train_dataset)
    assert validated.examples == {"train": n - len(validated.eval_dataset), "eval": len(validated.eval_dataset)}
    assert abs(len(validated.eval_dataset) - 0.2 * n) <= 2  # --eval-fraction of the training part, per class


def load_dataset_from_rows(rows):
    from slimfit.data import TextDataset

    names = sorted({label for _, label in rows})
    return TextDataset([t for t, _ in rows], [names.index(label) for _, label in rows], names)


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0])
    scores = classification_metrics(np.eye(4)[predictions], labels, num_classes=4)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    # F1: class 0 = 2*1/(2+2) = 0.5, class 1 = 2*2/(3+2) = 0.8, class 2 = 0, and class 3 (in neither labels nor
    # predictions) = 0: every class of the task counts, as in the image task.
    assert scores["f1"] == pytest.approx((0.5 + 0.8 + 0.0 + 0.0) / 4)


def slimfit_command(*argv: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The installed `slimfit` console script, run outside the repo root (whose slimfit/ would shadow it)."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "slimfit"), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        cwd=cwd,
    )


def test_bundled_model_is_named_and_too_long_texts_are_refused(assets, tmp_path):
    """The bundled MiniLM is called by its hub name in the header and metrics.json; it takes 512 positions."""
    data = ["--data", str(assets["csv"]), "--text-column", "body", "--label-column", "topic"]
    process = slimfit_command("finetune", *data, "--max-length", "4096", "--output", "long", cwd=tmp_path)
    assert process.returncode == 2 and process.stdout == ""
    assert process.stderr.strip().splitlines() == [
        "slimfit: error: --max-length: 4096 tokens is more than the model takes "
        "(at most 512: max_position_embeddings in "
        f"{default_model_path()}/config.json)"
    ]
    argv = [*data, "--max-length", "16", "--batch-size", "8", "--max-steps", "1", "--quiet", "--output", "run"]
    process = slimfit_command("finetune", *argv, cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith(
        "task classification, model sentence-transformers/all-MiniLM-L6-v2, 36 train / 4 eval examples, 2 classes; "
        "method slimfit"
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_max_length_beyond_the_models_positions(assets, tmp_path, capsys):
    argv = finetune(assets, "--output", str(tmp_path / "o"))
    argv[argv.index("--max-length") + 1] = "65"  # the tiny BERT has 64 positions
    expect_cli_error(capsys, argv, "--max-length: 65 tokens", "(at most 64: max_position_embeddings in")
    assert list(tmp_path.iterdir()) == []


def test_head_for_another_number_of_labels(assets, tmp_path, capsys):
    rows = [(text, ("sport", "tech", "misc")[i % 3]) for i, (text, _) in enumerate(texts(30))]
    data = write_csv(tmp_path / "three.csv", rows)
    expect_cli_error(
        capsys,
        finetune(assets, "--output", str(tmp_path / "o"), data=data),
        f"--model: {assets['model']} has a classification head for 2 labels (LABEL_0, LABEL_1)",
        "the task needs 3 classes (misc, sport, tech)",
    )


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"vocab_size": 10}, "has 25 tokens but the model embeds only vocab_size=10"),
        ({"problem_type": "multi_label_classification"}, "problem_type='multi_label_classification'"),
        ({"model_type": "vit"}, "is a 'vit' model, which transformers has no sequence-classification head for"),
    ],
)
def test_model_config_that_cannot_train_the_task(assets, tmp_path, capsys, change, fragment):
    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    argv = finetune(assets, "--output", str(tmp_path / "o"))
    argv[argv.index(str(assets["model"]))] = str(model)
    expect_cli_error(capsys, argv, f"--model: {model}", fragment, output=tmp_path / "o")


@pytest.fixture
def failing_optimizer(monkeypatch):
    def step(self, closure=None):
        raise RuntimeError("injected failure\nsecond line")

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("command", ["finetune", "bench"])
def test_error_while_training_is_one_line(assets, tmp_path, capsys, failing_optimizer, command):
    argv = finetune(assets, "--output", str(tmp_path / "o"))
    argv[0] = command
    expect_cli_error(
        capsys,
        argv,
        f"slimfit: error: `slimfit {command}` failed: RuntimeError: injected failure (SLIMFIT_DEBUG=1 shows the "
        "traceback)",
    )
    assert list(tmp_path.iterdir()) == []


def test_failure_while_saving_the_model_leaves_nothing(assets, tmp_path, capsys, monkeypatch):
    def save_pretrained(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", save_pretrained)
    expect_cli_error(capsys, finetune(assets, "--output", str(tmp_path / "o")), "OSError: disk full")
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(assets, tmp_path, capsys, failing_optimizer, monkeypatch):
    monkeypatch.setenv("SLIMFIT_DEBUG", "1")
    assert cli.main(finetune(assets, "--output", str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "optimizer.step()" in err and err.rstrip().endswith("RuntimeError: injected failure\nsecond line")
    assert "slimfit: error" not in err and list(tmp_path.iterdir()) == []


def test_attention_left_uncompressed_is_reported(assets, tmp_path, capsys, monkeypatch):
    """A model whose attention bypasses transformers' registry still trains, and the run says so."""
    bypass_attention_registry(monkeypatch)
    output = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="UNCOMPRESSED"):
        assert cli.main(finetune(assets, "--output", str(output))) == 0
    names = [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]
    printed = capsys.readouterr().out
    assert all(name in printed.split("uncompressed modules")[1] for name in names)
    reported = json.loads((output / "metrics.json").read_text())["uncompressed_modules"]
    assert [entry.split(" ")[0] for entry in reported] == names


@pytest.mark.parametrize(
    ("freeze_unit", "revisit_rounds", "rates"),
    [
        ("layers", 0, ()),
        ("parameters", 0, ()),
        ("layers", 1, ()),
        ("parameters", 3, ()),
        ("parameters", 3, ("--slimfit-lr", "1e-3", "--slimfit-no-decay-lr", "2e-4")),
        ("parameters", 3, ("--always-train", "bert.embeddings")),
        ("parameters", 3, ("--small-layer-share", "0")),
        ("parameters", 3, ("--column-blocks", "4")),
    ],
)
def test_resumed_run_reproduces_the_uninterrupted_one(assets, tmp_path, freeze_unit, revisit_rounds, rates):
    """Checkpoints every 3 steps into --output; a run resumed from step 3 logs the same losses and ends with the
    same metrics as the run that went through."""
    whole = tmp_path / "whole"
    argv = finetune(assets, "--freeze-ratio", "0.5", "--gradient-accumulation-steps", "2", "--batch-size", "4")
    argv += ["--freeze-unit", freeze_unit, "--revisit-rounds", str(revisit_rounds), *rates]
    argv[argv.index("--max-steps") + 1] = "6"
    assert cli.main([*argv, "--save-steps", "3", "--output", str(whole)]) == 0
    assert sorted(p.name for p in whole.iterdir() if p.is_dir()) == ["checkpoint-3", "checkpoint-6", "model"]
    moved = tmp_path / "elsewhere" / "checkpoint-3"
    shutil.copytree(whole / "checkpoint-3", moved)  # resuming must not depend on where the checkpoint lies
    resumed = tmp_path / "resumed"
    assert cli.main([*argv, "--resume-from-checkpoint", str(moved), "--output", str(resumed)]) == 0

    def rows(folder):
        with (folder / "steps.csv").open() as handle:
            return list(csv.DictReader(handle))

    uninterrupted, continued = rows(whole), rows(resumed)
    assert [int(r["step"]) for r in continued] == [4, 5, 6]
    for before, after in zip(uninterrupted[3:], continued, strict=True):
        assert float(after["loss"]) == pytest.approx(float(before["loss"]), rel=1e-6), after["step"]
        assert float(after["lr"]) == float(before["lr"])
        assert after["trainable_layers"] == before["trainable_layers"]
    assert len({r["trainable_layers"] for r in uninterrupted}) > 1 or freeze_unit == "layers"  # parameters: sets differ
    first, second = (json.loads((f / "metrics.json").read_text()) for f in (whole, resumed))
    assert first["config"]["freeze_unit"] == second["config"]["freeze_unit"] == freeze_unit
    assert first["config"]["revisit_rounds"] == second["config"]["revisit_rounds"] == revisit_rounds
    assert second["accuracy"] == first["accuracy"] and second["f1"] == pytest.approx(first["f1"], rel=1e-9)
    weights = [load_file(folder / "model" / "model.safetensors") for folder in (whole, resumed)]
    torch.testing.assert_close(weights[1], weights[0])


def test_resume_from_something_that_is_not_a_checkpoint(assets, tmp_path, capsys):
    argv = finetune(assets, "--resume-from-checkpoint", str(tmp_path), "--output", str(tmp_path / "o"))
    expect_cli_error(capsys, argv, f"--resume-from-checkpoint: {tmp_path} is not a Trainer checkpoint folder")


def test_resume_from_the_last_checkpoint_is_refused(assets, tmp_path, capsys):
    whole = tmp_path / "whole"
    argv = finetune(assets, "--freeze-ratio", "0.5", "--save-steps", "3")
    assert cli.main([*argv, "--output", str(whole)]) == 0
    last = whole / "checkpoint-3"
    expect_cli_error(
        capsys,
        [*finetune(assets), "--resume-from-checkpoint", str(last), "--output", str(tmp_path / "o")],
        f"--resume-from-checkpoint: {last} is at step 3 of 3, the end of its run",
    )


def test_logged_loss_is_the_steps_loss_with_gradient_accumulation(assets, tmp_path):
    """Accumulating 2 micro-batches of 4 logs the same step loss as one batch of 8 (dropout off: eval-mode model
    config), within float tolerance."""
    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))

    def first_loss(folder, *extra):
        argv = finetune(assets, "--method", "full", *extra)
        argv[argv.index(str(assets["model"]))] = str(model)
        argv[argv.index("--max-steps") + 1] = "1"
        assert cli.main([*argv, "--output", str(folder)]) == 0
        with (folder / "steps.csv").open() as handle:
            return float(next(csv.DictReader(handle))["loss"])

    whole = first_loss(tmp_path / "a", "--batch-size", "8")
    accumulated = first_loss(tmp_path / "b", "--batch-size", "4", "--gradient-accumulation-steps", "2")
    assert accumulated == pytest.approx(whole, rel=1e-5)


def train_schedule(assets, **options):
    """Trains the tiny BERT on the CSV at freeze ratio 0.8 with ``options``; returns the loop's result (layer names
    and which trained at each step)."""
    from slimfit import tasks
    from slimfit.finetune import loop

    config = FinetuneConfig(
        model=str(assets["model"]),
        data=str(assets["csv"]),
        text_column="body",
        label_column="topic",
        batch_size=8,
        max_length=16,
        freeze_ratio=0.8,
        **options,
    )
    config, task = tasks.prepare(config)
    return loop.run(config, task, progress=False)


@pytest.mark.parametrize("method", ["slimfit", "freeze-only"])
@pytest.mark.parametrize(
    ("modules", "always_trained"),
    [
        ((), 1),  # the new head alone
        # 3 embedding tables, the embeddings' LayerNorm weight, one more LayerNorm weight and the head
        (("bert.embeddings", "bert.encoder.layer.0.attention.output.LayerNorm"), 6),
    ],
)
def test_head_and_always_train_modules_train_at_every_step_the_rest_is_scheduled(
    assets, method, modules, always_trained
):
    # freeze_unit="layers": K scheduled layers per step, countable
    result = train_schedule(assets, max_steps=6, method=method, freeze_unit="layers", always_train=modules)
    prefixes = tuple(f"{name}." for name in modules)
    always = [i for i, name in enumerate(result.layers) if name.startswith(prefixes) or name == "classifier.weight"]
    assert len(always) == always_trained
    assert all(row[i] for row in result.schedule for i in always)
    scheduled = [[trained for i, trained in enumerate(row) if i not in always] for row in result.schedule]
    k = round(0.2 * (len(result.layers) - len(always)))
    assert all(sum(row) == k for row in scheduled) and len({tuple(row) for row in scheduled}) > 1


def test_small_layers_train_at_every_step_unless_the_share_is_0(assets):
    from safetensors.torch import load_file

    def schedule(share):
        result = train_schedule(assets, max_steps=8, small_layer_share=share)
        return result.layers, result.schedule

    layers, shared = schedule(FinetuneConfig.small_layer_share)  # the default, 1/8
    sizes = {name: p.numel() for name, p in load_file(assets["model"] / "model.safetensors").items()}
    scheduled = [name for name in layers if name in sizes and name != "classifier.weight"]
    budget = 0.2 * sum(sizes[name] for name in scheduled)
    largest = max(sizes[name] for name in scheduled if sizes[name] <= budget)
    small = [layers.index(name) for name in scheduled if sizes[name] <= largest / 8]
    assert small and all(row[i] for row in shared for i in small)
    names, packed = schedule(0.0)
    assert names == layers and any(not row[i] for row in packed for i in small)


@pytest.mark.parametrize("name", ["bert.nowhere", ""])
def test_always_train_names_a_module_of_the_model(assets, tmp_path, capsys, name):
    argv = finetune(assets, "--always-train", "bert.embeddings", name, "--output", str(tmp_path / "o"))
    expect_cli_error(
        capsys,
        argv,
        f"--always-train: {name!r} is not a module of BertForSequenceClassification",
        "'bert'",
        output=tmp_path / "o",
    )
