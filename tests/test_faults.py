"""Faults: non-finite steps never poison the schedule; checkpoints survive a SIGKILL in the middle of a write.

Covered elsewhere, not repeated here: a NaN gradient on one layer of a small MLP and all-zero Linear weights
(tests/test_scheduler.py), ``load_state_dict`` with another model or freeze_ratio (tests/test_core.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

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
    sf = SlimFit(model, opt, freeze_ratio=0.5)  # default compression: codecs of non-finite values too
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
    sf = SlimFit(model, opt, freeze_ratio=0.5)
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
    sf = SlimFit(model, opt, freeze_ratio=0.5, metric=metric)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warm_up(model, opt, sf)
    assert sf.stats.nonfinite_scores == 0
    check_schedule_valid(sf)


# ---------------------------------------------------------------------------------------------- atomic writes

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from slimfit.integrations.hf import save_state

    path = Path(sys.argv[1])
    step = 0
    while True:  # the parent kills us; each checkpoint is ~32 MB, so the kill lands inside a write
        save_state({"step": step, "blob": torch.full((8_000_000,), float(step))}, path)
        print(step, flush=True)
        step += 1
    """
)


def test_sigkill_during_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path):
    """SIGKILL a process that keeps rewriting a large checkpoint with the Trainer callback's save_state
    (temporary file + os.replace) while a temporary file is being written; the checkpoint still loads whole."""
    path = tmp_path / "slimfit_state.pt"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    mid_write_kills = 0
    for _ in range(3):
        child = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() != ""  # one full checkpoint exists
            deadline = time.monotonic() + 60
            while not any(p.name.startswith(f".{path.name}.") for p in tmp_path.iterdir()):
                assert time.monotonic() < deadline, "writer never started another checkpoint"
                time.sleep(0.001)
            os.kill(child.pid, signal.SIGKILL)
            mid_write_kills += 1
        finally:
            child.kill()
            child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL
        state = torch.load(path, weights_only=True)
        assert state["blob"].numel() == 8_000_000
        assert bool((state["blob"] == float(state["step"])).all())  # not torn: one step's data throughout
    assert mid_write_kills == 3
    # The killed writes left only hidden temporaries behind, never a half-written checkpoint under the name.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["slimfit_state.pt", "writer.py"]


STAGER = textwrap.dedent(
    """
    import sys
    from slimfit.train import staged_output

    with staged_output(sys.argv[1]) as folder:
        (folder / "metrics.json").write_text("{}")
        with (folder / "steps.csv").open("w") as handle:
            handle.write("step,loss\\n")
            print("writing", flush=True)
            while True:  # killed while still writing
                handle.write("1,0.5\\n" * 1000)
    """
)


def test_sigkill_during_cli_output_write_leaves_no_output_folder(tmp_path):
    """``slimfit finetune`` writes its --output folder through staged_output: killed mid-write, the target
    folder does not appear at all (only a hidden ``.<name>.*.partial`` folder is left)."""
    target = tmp_path / "run"
    script = tmp_path / "stager.py"
    script.write_text(STAGER)
    child = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != script.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".run.") and leftovers[0].endswith(".partial")
