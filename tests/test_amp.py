"""Mixed precision under SlimFit: bf16 autocast (CPU, and CUDA when present) and fp16 with GradScaler.

What holds: a tiny BERT trains to the same quality as fp32; compressed activations are encoded from the
tensors autocast produced (bf16 where autocast computed in bf16, fp32 where it kept fp32, e.g. the residual
stream into LayerNorm) and decode to that dtype; scores are float32 whatever the activations' or weights'
dtype; a step that GradScaler skips is counted as skipped, not scored, and keeps the trainable set.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import pytest
import torch
from tiny_bert import SEQ, VOCAB, tiny_classifier

from slimfit import ops
from slimfit.codecs import QuantizedTensor, SparseTensor
from slimfit.core import SlimFit

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 70
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def batches(n: int, device: str, batch_size: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Learnable synthetic task: is the token at position 1 in the upper half of the vocabulary?"""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)
        out.append({"input_ids": ids.to(device), "labels": (ids[:, 1] >= VOCAB // 2).long().to(device)})
    return out


def autocast(device: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train(
    device: str, dtype: torch.dtype | None, steps: int, scaler: torch.amp.GradScaler | None = None
) -> tuple[list[float], float, SlimFit]:
    """SlimFit (default compression, half the layers frozen) on the task; returns losses, held-out accuracy, facade."""
    model = tiny_classifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sf = SlimFit(model, opt, freeze_ratio=0.5, freeze_unit="layers")  # by layers: the task is learnt in the embedding
    losses = []
    for batch in batches(steps, device):
        with autocast(device, dtype):
            loss = model(**batch).loss
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sf.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    right = total = 0
    with torch.no_grad(), autocast(device, dtype):
        for batch in batches(8, device, seed=2):
            right += (model(input_ids=batch["input_ids"]).logits.argmax(-1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
    return losses, right / total, sf


@pytest.fixture(scope="module")
def fp32_run() -> dict[str, tuple[list[float], float]]:
    """The fp32 reference run per device, shared by the bf16 and fp16 comparisons."""
    return {device: train(device, None, STEPS)[:2] for device in DEVICES}


def check_same_quality(run: tuple[list[float], float, SlimFit], reference: tuple[list[float], float]) -> None:
    (losses, acc, sf), (ref_losses, ref_acc) = run, reference
    assert ref_acc >= 0.9 and acc >= 0.9
    assert abs(acc - ref_acc) <= 0.05
    # Same task and seed: the late-training loss stays within a small margin of fp32's.
    assert sum(losses[-10:]) / 10 <= sum(ref_losses[-10:]) / 10 + 0.2
    assert sf.stats.nonfinite_scores == 0
    assert sf.scheduler.scores.dtype == torch.float32 and torch.isfinite(sf.scheduler.scores).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_matches_fp32_quality(device, fp32_run):
    run = train(device, torch.bfloat16, STEPS)
    check_same_quality(run, fp32_run[device])
    assert run[2].stats.scored_steps == STEPS


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_autocast_with_grad_scaler_matches_fp32_quality(device, fp32_run):
    # fp16 autocast runs on CPU too in torch 2.13, but its fp16 matmuls are several times slower than fp32
    # there: on CPU compare the first steps' losses with fp32's instead of training to convergence.
    steps = STEPS if device == "cuda" else 12
    run = train(device, torch.float16, steps, torch.amp.GradScaler(device, init_scale=2.0**10))
    if device == "cuda":
        check_same_quality(run, fp32_run[device])
    else:
        assert max(abs(a - b) for a, b in zip(run[0], fp32_run[device][0], strict=False)) < 0.02
    assert run[2].stats.scored_steps == steps and run[2].stats.nonfinite_scores == 0


def _record_codecs(monkeypatch) -> list[tuple[str, torch.dtype, object]]:
    """Patch every Function module's ``encode`` to record (module, input dtype, codec) of each encoding."""
    from slimfit.nn import _saving

    records: list[tuple[str, torch.dtype, object]] = []
    for name in ("slimfit.nn.linear", "slimfit.nn.layernorm", "slimfit.nn.attention", "slimfit.nn.activation"):
        module = sys.modules[name]

        def spy(x, setting, _name=name):
            code = _saving.encode(x, setting)
            records.append((_name.rsplit(".", 1)[-1], x.dtype, code))
            return code

        monkeypatch.setattr(module, "encode", spy)
    return records


@pytest.mark.parametrize("device", DEVICES)
def test_compressed_activations_follow_the_autocast_dtype(device, monkeypatch):
    records = _record_codecs(monkeypatch)
    model = tiny_classifier().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    SlimFit(model, opt, freeze_ratio=0.0)  # everything trains: every site saves something
    batch = batches(1, device, batch_size=4)[0]
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()

    codecs = [(site, dtype, c) for site, dtype, c in records if isinstance(c, (QuantizedTensor, SparseTensor))]
    assert codecs
    for _, dtype, code in codecs:
        assert code.dtype == dtype  # the codec keeps the dtype autocast gave the activation
        decoded = ops.dequantize(code) if isinstance(code, QuantizedTensor) else ops.densify(code)
        assert decoded.dtype == dtype
    by_site: dict[str, set[torch.dtype]] = {}
    for site, dtype, _ in codecs:
        by_site.setdefault(site, set()).add(dtype)
    # q, k, v come out of autocast's bf16 matmuls; the residual stream into LayerNorm stays fp32.
    assert by_site["attention"] == {torch.bfloat16}
    assert by_site["layernorm"] == {torch.float32}
    assert torch.bfloat16 in by_site["linear"]  # e.g. the FFN down-projection reads the bf16 GELU output
    # Gradients land in the parameters' dtype (fp32), finite.
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("scoring", ["sampled", "auto"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_scores_are_float32(param_dtype, scoring, monkeypatch):
    """Scores are float32 and finite under autocast, even with bf16 weights: from ops.update_norms where layers
    are sampled (bf16 layers always are), rebuilt from AdamW's moments in float64 otherwise."""
    calls: list[tuple[set[torch.dtype], torch.dtype]] = []
    real = ops.update_norms

    def spy(before, after, metric="rel_l2"):
        out = real(before, after, metric)
        calls.append(({t.dtype for t in [*before, *after]}, out.dtype))
        return out

    monkeypatch.setattr(ops, "update_norms", spy)
    model = tiny_classifier().to(param_dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sf = SlimFit(model, opt, freeze_ratio=0.5, scoring=scoring)
    for batch in batches(3, "cpu", batch_size=8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        sf.step()
        opt.zero_grad()
    rebuilt = scoring == "auto" and param_dtype == torch.float32
    assert len(calls) == (0 if rebuilt else 3)
    assert all(dtypes == {param_dtype} and out == torch.float32 for dtypes, out in calls)
    assert sf.scheduler.scores.dtype == torch.float32
    assert torch.isfinite(sf.scheduler.scores).all() and sf.stats.nonfinite_scores == 0


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_skipped_step_is_not_scored(fused):
    """An overflowing fp16 step is skipped by GradScaler: SlimFit counts it as skipped (not scored), keeps the
    trainable set and warns about nothing; the following steps are scored normally. A fused AdamW runs its step
    (GradScaler passes it the inf flag) and undoes its step count: no layer may score 0 for it."""
    model = tiny_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=fused)
    sf = SlimFit(model, opt, freeze_ratio=0.5)
    # 2**40 overflows the fp16 gradients of the first backward; one back-off lands on 2**10.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-30)
    sets = [sf.trainable_layers()]
    for batch in batches(4, "cpu", batch_size=8):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no non-finite-score warning: nothing bad was scored
            sf.step()
        opt.zero_grad()
        sets.append(sf.trainable_layers())
    assert scaler.get_scale() == 2.0**10
    assert (sf.stats.skipped_steps, sf.stats.scored_steps, sf.stats.nonfinite_scores) == (1, 3, 0)
    assert sets[1] == sets[0]  # the skipped step kept the set
    assert torch.isfinite(sf.scheduler.scores).all()
    assert bool((sf.scheduler.scores[sf.scheduler.scored] > 0).all())  # nothing scored 0 for the skipped step
