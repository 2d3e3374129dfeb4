"""Faults: non-finite steps never poison the schedule; `slimfit finetune` killed while writing leaves no torn output.

Covered elsewhere, not repeated here: a NaN gradient on one layer of a small MLP and all-zero Linear weights
(tests/test_scheduler.py), ``load_state_dict`` with another model or freeze_ratio (tests/test_core.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from tiny_bert import SEQ, VOCAB, tiny_classifier

from slimfit.core import SlimFit

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(seed: int, batch_size: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": (ids[:, 1] >= VOCAB // 2).long()}


def warm_up(model, opt, sf: SlimFit) -> None:
    """Train until every layer has a score (the round-robin warm-up is over)."""
    step = 0
    while not bool(sf.scheduler.scored.all()):
        model(**batch(step)).loss.backward()
        opt.step()
        sf.step()
        opt.zero_grad()
        step += 1


def check_schedule_valid(sf: SlimFit) -> None:
    names = sf.trainable_layers()
    assert len(names) == len(set(names)) == sf.num_trainable
    assert set(names) <= set(sf.layer_names)
    assert sum(layer.param.requires_grad for layer in sf.layers) == sf.num_trainable
    assert torch.isfinite(sf.scheduler.scores).all()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_loss_step_is_rejected_scores_and_schedule_kept(bad):
    """An Inf/NaN loss makes every trainable layer's gradient (and, after the step, weight) non-finite; all K
    scores are rejected with one warning, the previous scores stay, and the next set is a valid top-K."""
    model = tiny_classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sf = SlimFit(
        model, opt, freeze_ratio=0.5, freeze_unit="layers"
    )  # default compression: codecs of non-finite values too
    warm_up(model, opt, sf)
    scores = sf.scheduler.scores.clone()
    poisoned = sf.trainable_layers()
    before = sf.stats.nonfinite_scores

    (model(**batch(100)).loss * bad).backward()
    assert any(not torch.isfinite(model.get_parameter(n).grad).all() for n in poisoned)
    opt.step()
    with pytest.warns(RuntimeWarning, match=rf"non-finite update score for {sf.num_trainable} layer"):
        sf.step()
    opt.zero_grad()

    assert sf.stats.nonfinite_scores - before == sf.num_trainable
    assert torch.equal(sf.scheduler.scores, scores)  # nothing overwritten, frozen layers untouched
    check_schedule_valid(sf)
    # The schedule ranks by the kept (pre-fault) scores, so it picks exactly what it would have picked.
    ranked = sorted(range(len(sf.layers)), key=lambda i: (-float(scores[i]), i))[: sf.num_trainable]
    assert sf.trainable_layers() == [sf.layers[i].name for i in sorted(ranked)]


def test_skipping_the_optimizer_step_on_a_nonfinite_loss_is_counted_as_skipped():
    """The usual guard (``if not torch.isfinite(loss): skip optimizer.step()``) costs no score and no warning."""
    model = tiny_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sf = SlimFit(model, opt, freeze_ratio=0.5, freeze_unit="layers")
    warm_up(model, opt, sf)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = sf.trainable_layers()
    loss = model(**batch(100)).loss * float("inf")
    loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        if torch.isfinite(loss):
            opt.step()
        sf.step()
    opt.zero_grad()
    assert sf.stats.skipped_steps == 1 and sf.stats.nonfinite_scores == 0
    assert sf.trainable_layers() == trainable
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    check_schedule_valid(sf)


@pytest.mark.parametrize("metric", ["rel_l2", "rel_l1_mean"])
def test_zero_valued_weights_in_a_compressed_bert_score_finite(metric):
    """All-zero LayerNorm gamma and Linear weights, and a zeroed embedding table, through compressed modules."""
    model = tiny_classifier()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.LayerNorm.weight.zero_()
        model.bert.encoder.layer[1].intermediate.dense.weight.zero_()
        model.bert.embeddings.token_type_embeddings.weight.zero_()
        model.classifier.weight[:, :16] = 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sf = SlimFit(model, opt, freeze_ratio=0.5, freeze_unit="layers", metric=metric)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warm_up(model, opt, sf)
    assert sf.stats.nonfinite_scores == 0
    check_schedule_valid(sf)


# ---------------------------------------------------------------------------------------------- atomic writes

# Files `slimfit finetune` writes into its output folder, in this order (metrics and the step log at once; each plot
# takes ~0.1-0.7 s to draw, so the whole write spans about a second; then the model folder).
OUTPUT_FILES = ("metrics.json", "steps.csv", "loss.png", "memory.png", "layers.png", "model")


@pytest.fixture(scope="module")
def finetune_assets(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from tiny_bert import save_tiny_bert, texts, write_csv

    root = tmp_path_factory.mktemp("finetune")
    return save_tiny_bert(root / "model"), write_csv(root / "news.csv", texts(40))


def start_finetune(assets, output: Path, log: Path) -> subprocess.Popen:
    """The installed `slimfit` command (a 3-step run on the tiny BERT), started outside the repo root."""
    model, data = assets
    command = Path(sys.executable).with_name("slimfit")
    argv = [str(command)] if command.exists() else [sys.executable, "-m", "slimfit"]
    argv += ["finetune", "--model", str(model), "--data", str(data), "--text-column", "body", "--label-column", "topic"]
    argv += ["--batch-size", "8", "--max-steps", "3", "--max-length", "16", "--quiet", "--output", str(output)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    with log.open("w") as handle:  # a file, not a pipe nobody reads while the child runs
        return subprocess.Popen(argv, cwd=log.parent, env=env, stdout=handle, stderr=subprocess.STDOUT)


def written(folder: Path) -> dict[str, list[str]]:
    """Every entry of ``folder`` and, for sub-folders, the files in them."""
    entries = {}
    for entry in folder.iterdir():
        try:
            entries[entry.name] = sorted(p.name for p in entry.iterdir()) if entry.is_dir() else []
        except FileNotFoundError:  # renamed between listing and reading
            continue
    return entries


def kill_once_writing(child: subprocess.Popen, outputs: Path, files_begun: int, log: Path) -> dict[str, list[str]]:
    """SIGKILL ``child`` once a new entry has appeared in ``outputs`` holding at least ``files_begun`` files; returns
    the new entries. The child is stopped (SIGSTOP) the moment that is seen, so what is returned is exactly what
    the kill leaves behind."""
    before = set(written(outputs))
    try:
        deadline = time.monotonic() + 300
        while True:
            new = {name: files for name, files in written(outputs).items() if name not in before}
            if new and sum(len(files) for files in new.values()) >= files_begun:
                os.kill(child.pid, signal.SIGSTOP)
                new = {name: files for name, files in written(outputs).items() if name not in before}
                break
            assert child.poll() is None, f"finetune ended (rc {child.returncode}) before the kill: {log.read_text()}"
            assert time.monotonic() < deadline, "finetune never started writing its output"
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    return new


def test_sigkill_while_finetune_writes_its_output_leaves_no_output_folder(finetune_assets, tmp_path):
    """SIGKILL `slimfit finetune` twice while it writes its output -- as soon as anything appears next to --output
    (usually before any plot), and once the memory plot has begun (4 files) -- then run it again with the same --output.
    After each kill the --output folder does not exist; the one thing left is a hidden ``.run.<random>.partial``
    folder holding the files begun so far (the last possibly torn), which nothing removes. The rerun writes the
    complete folder under the real name."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    target, log = outputs / "run", tmp_path / "finetune.log"
    leftovers = {}
    for files_begun in (0, 4):  # each run costs seconds of start-up: two points
        new = kill_once_writing(start_finetune(finetune_assets, target, log), outputs, files_begun, log)
        where = f"killed with >= {files_begun} files begun: {new}"
        assert not target.exists(), where
        [(name, files)] = new.items()
        assert name.startswith(".run.") and name.endswith(".partial"), where
        # Inside the write: the files begun so far, never all of them (they are only complete once renamed).
        assert len(files) >= files_begun and set(files) < set(OUTPUT_FILES), where
        leftovers[name] = files
    assert written(outputs) == leftovers  # only the hidden folders, as the kills left them

    rerun = start_finetune(finetune_assets, target, log)
    assert rerun.wait(timeout=300) == 0, log.read_text()
    assert sorted(p.name for p in target.iterdir()) == sorted(OUTPUT_FILES)
    assert json.loads((target / "metrics.json").read_text())["steps"] == 3
    assert written(outputs).keys() == {"run", *leftovers}
