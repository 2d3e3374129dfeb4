"""`slimfit bench` on the tiny BERT: every method runs, ratios are relative to full fine-tuning of the same seed."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from checks import expect_cli_error  # noqa: E402
from tiny_bert import save_tiny_bert, texts, write_csv  # noqa: E402

from slimfit import bench, cli  # noqa: E402
from slimfit.data import DataError  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_bench_writes_csv_json_and_plot(tmp_path, capsys):
    model = save_tiny_bert(tmp_path / "model")
    data = write_csv(tmp_path / "d.csv", texts(24))
    output = tmp_path / "bench"
    argv = ["bench", "--model", str(model), "--data", str(data), "--text-column", "body", "--label-column", "topic"]
    argv += ["--batch-size", "4", "--max-steps", "2", "--max-length", "16", "--quiet", "--output", str(output)]
    argv += ["--freeze-ratios", "0.5", "0.75", "--seeds", "0", "1"]
    assert cli.main(argv) == 0
    assert "x less" in capsys.readouterr().out

    with (output / "runs.csv").open() as handle:
        runs = list(csv.DictReader(handle))
    labels = ["full", "freeze-only@0.5", "freeze-only@0.75", "slimfit@0.5", "slimfit@0.75", "grad-ckpt", "lora"]
    assert [row["label"] for row in runs] == labels * 2
    assert [int(row["seed"]) for row in runs] == [0] * 7 + [1] * 7
    for row in runs:
        assert int(row["steps"]) == 2
        if row["method"] in ("slimfit", "freeze-only"):  # full fine-tuning's rate over the trained share
            assert float(row["lr"]) == {"0.5": 1e-4, "0.75": 2e-4}[row["freeze_ratio"]]
        else:
            assert float(row["lr"]) == {"lora": 5e-4}.get(row["method"], 5e-5)
        if row["method"] == "full":
            assert float(row["time_ratio"]) == 1.0 and float(row["memory_ratio_activations"]) == 1.0
    by_label = {row["label"]: row for row in runs if row["seed"] == "0"}
    # Checkpointing and LoRA keep fewer activations / gradients than full fine-tuning on any model.
    assert float(by_label["grad-ckpt"]["memory_ratio_activations"]) < 1.0
    assert float(by_label["lora"]["memory_ratio_gradients"]) < 1.0
    check_activation_saving(runs)

    with (output / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert [row["label"] for row in summary] == labels
    assert all(row["seeds"] == "2" for row in summary)

    report = json.loads((output / "bench.json").read_text())
    assert {"date_utc", "machine", "torch", "transformers", "peft", "slimfit"} <= report["environment"].keys()
    assert report["config"]["max_steps"] == 2 and len(report["runs"]) == 14
    assert (output / "bench.png").read_bytes()[:4] == b"\x89PNG"


# SlimFit's rows must keep at most this fraction of full fine-tuning's saved activations. Measured on this tiny BERT
# (batch 4 x 16 tokens, seeds 0 and 1): slimfit 0.17-0.20 of full at freeze ratios 0.5 and 0.75, freeze-only (the
# same schedule without compression) 0.80-0.92, so freezing alone cannot pass and compression must be doing the work.
MAX_SLIMFIT_ACTIVATION_FRACTION = 0.4


def check_activation_saving(runs: list[dict[str, str]]) -> None:
    """Per seed and freeze ratio: slimfit's peak saved activations against the full row of the same seed (same
    process, same batches), and against freeze-only at the same ratio; the CSV's ratio column must agree."""
    full = {row["seed"]: float(row["memory_activations"]) for row in runs if row["method"] == "full"}
    freeze_only = {
        (r["seed"], r["freeze_ratio"]): float(r["memory_activations"]) for r in runs if r["method"] == "freeze-only"
    }
    slimfit_rows = [row for row in runs if row["method"] == "slimfit"]
    assert slimfit_rows and all(value > 0 for value in full.values())
    for row in slimfit_rows:
        where = f"slimfit@{row['freeze_ratio']} seed {row['seed']}"
        saved = float(row["memory_activations"])
        fraction = saved / full[row["seed"]]
        assert fraction == pytest.approx(float(row["memory_ratio_activations"]), rel=1e-9), where
        assert 0 < fraction <= MAX_SLIMFIT_ACTIVATION_FRACTION, f"{where}: {fraction:.3f} of full's activations"
        # Compression, not freezing, does most of the saving: at least 2x less than the same schedule uncompressed.
        assert saved * 2 <= freeze_only[(row["seed"], row["freeze_ratio"])], where


def test_methods_are_checked_and_full_runs_first():
    assert bench.parse_methods("lora, slimfit") == ["full", "lora", "slimfit"]
    assert bench.parse_methods("full,slimfit,slimfit") == ["full", "slimfit"]
    with pytest.raises(DataError, match="unknown adam"):
        bench.parse_methods("adam,slimfit")


def test_always_train_is_checked_before_any_run(tmp_path, capsys, monkeypatch):
    from slimfit.finetune import loop

    trained = []
    monkeypatch.setattr(loop, "train", lambda config, *args, **kwargs: trained.append(config.method))
    model = save_tiny_bert(tmp_path / "model")
    data = write_csv(tmp_path / "d.csv", texts(24))
    argv = ["bench", "--model", str(model), "--data", str(data), "--text-column", "body", "--label-column", "topic"]
    argv += ["--methods", "slimfit", "--max-steps", "2", "--quiet", "--output", str(tmp_path / "bench")]
    argv += ["--always-train", "bert.nowhere"]
    capsys.readouterr()  # saving the model above printed a progress bar
    expect_cli_error(capsys, argv, "--always-train: 'bert.nowhere' is not a module", output=tmp_path / "bench")
    assert trained == []  # full fine-tuning, which bench runs first, did not start either


def test_paired_interval_against_hand_computed_t_interval():
    """Paired differences 1, 2 and 3 points: mean 2, standard error 1/sqrt(3), t(0.975, 2 d.f.) = 4.3027."""
    full = [{"seed": seed, "accuracy": 0.90 + 0.01 * seed} for seed in range(3)]
    runs = [{"seed": seed, "accuracy": 0.90 + 0.01 * seed + 0.01 * (seed + 1)} for seed in (2, 0, 1)]
    low, high = bench.paired_interval(runs, full, "accuracy")
    half_width = 4.302652729911275 / 3**0.5
    assert low == pytest.approx(2 - half_width) and high == pytest.approx(2 + half_width)
    # One seed gives no interval; identical runs a zero-width one.
    assert all(np.isnan(v) for v in bench.paired_interval(runs[:1], full, "accuracy"))
    same = [{"seed": s, "accuracy": 0.5} for s in range(3)]
    assert bench.paired_interval(same, same, "accuracy") == (0.0, 0.0)
