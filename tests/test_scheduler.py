"""Inter-layer scheduling: warm-up, top-K choice, score bookkeeping, determinism and fault tolerance."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimfit.core import SlimFit
from slimfit.scheduler import InterLayerScheduler


def _run_warmup(n: int, k: int, seed: int = 0) -> tuple[InterLayerScheduler, list[list[int]]]:
    sched = InterLayerScheduler(n, k, torch.Generator().manual_seed(seed))
    sets = []
    for _ in range(math.ceil(n / k)):
        sets.append(sched.trainable)
        sched.step(sched.trainable, torch.rand(k) + 0.1)
    return sched, sets


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), data=st.data())
def test_warmup_trains_every_layer_once_in_ceil_n_over_k_steps(n, data):
    k = data.draw(st.integers(1, n))
    sched, sets = _run_warmup(n, k, seed=data.draw(st.integers(0, 2**31)))
    assert all(len(s) == k and len(set(s)) == k for s in sets)
    assert set().union(*map(set, sets)) == set(range(n))
    # Full chunks of the warm-up never repeat a layer.
    full = n // k
    assert len({i for s in sets[:full] for i in s}) == full * k
    assert bool(sched.scored.all())


def test_exactly_k_trainable_after_construction_and_every_step():
    sched = InterLayerScheduler(17, 5, torch.Generator().manual_seed(1))
    assert len(sched.trainable) == 5
    for step in range(30):
        sched.step(sched.trainable, torch.rand(5))
        assert len(sched.trainable) == 5, step
        assert sched.trainable == sorted(set(sched.trainable))


def test_after_warmup_next_set_is_top_k_scores():
    n, k = 10, 3
    sched, _ = _run_warmup(n, k)
    sched.scores[:] = torch.arange(n, dtype=torch.float32)  # layer i has score i
    sched.step([], torch.empty(0))
    assert sched.trainable == [7, 8, 9]
    # Ties are broken by layer index, so the choice is deterministic.
    sched.scores[:] = 1.0
    sched.step([], torch.empty(0))
    assert sched.trainable == [0, 1, 2]


def test_only_trained_layers_get_fresh_scores_frozen_keep_theirs():
    n, k = 8, 2
    sched, _ = _run_warmup(n, k)
    before = sched.scores.clone()
    trained = sched.trainable
    sched.step(trained, torch.tensor([0.0, 0.0]))
    changed = (sched.scores != before).nonzero().flatten().tolist()
    assert set(changed) <= set(trained)
    frozen = [i for i in range(n) if i not in trained]
    assert torch.equal(sched.scores[frozen], before[frozen])
    # Layers that just scored zero give way to the best frozen ones.
    best_frozen = sorted(frozen, key=lambda i: (-before[i].item(), i))[:k]
    assert sched.trainable == sorted(best_frozen)


def test_deterministic_under_torch_manual_seed():
    def schedule():
        sched = InterLayerScheduler(30, 4)  # default generator
        out = [sched.trainable]
        for _ in range(12):
            sched.step(sched.trainable, torch.rand(4))
            out.append(sched.trainable)
        return out

    torch.manual_seed(123)
    a = schedule()
    torch.manual_seed(123)
    b = schedule()
    torch.manual_seed(124)
    c = schedule()
    assert a == b
    assert a != c


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_scores_are_rejected_and_previous_kept(bad):
    n, k = 6, 2
    sched, _ = _run_warmup(n, k)
    before = sched.scores.clone()
    first, second = sched.trainable
    rejected = sched.step([first, second], torch.tensor([bad, 0.5]))
    assert rejected == [first]
    assert sched.scores[first] == before[first]
    assert sched.scores[second] == 0.5
    assert torch.isfinite(sched.scores).all()


def test_nonfinite_score_during_warmup_keeps_layer_pending():
    sched = InterLayerScheduler(6, 2, torch.Generator().manual_seed(0))
    first = sched.trainable
    assert sched.step(first, torch.tensor([float("nan"), 1.0])) == [first[0]]
    assert not sched.scored[first[0]]
    assert first[0] in sched.trainable  # still owed its warm-up turn


def test_state_dict_round_trip_continues_identically():
    a = InterLayerScheduler(12, 3, torch.Generator().manual_seed(5))
    for _ in range(6):
        a.step(a.trainable, torch.rand(3))
    b = InterLayerScheduler(12, 3, torch.Generator().manual_seed(99))
    b.load_state_dict(a.state_dict())
    scores = torch.rand(10, 3)
    for row in scores:
        a.step(a.trainable, row)
        b.step(b.trainable, row)
        assert a.trainable == b.trainable
    assert a.step_count == b.step_count


def test_load_state_dict_rejects_other_shape():
    state = InterLayerScheduler(12, 3).state_dict()
    with pytest.raises(ValueError, match="num_trainable"):
        InterLayerScheduler(12, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_layers"):
        InterLayerScheduler(13, 3).load_state_dict(state)


@pytest.mark.parametrize(("n", "k"), [(0, 1), (5, 0), (5, 6), (5.0, 1), (True, 1)])
def test_bad_sizes_raise(n, k):
    with pytest.raises(ValueError):
        InterLayerScheduler(n, k)


def test_step_checks_scores_match_indices():
    sched = InterLayerScheduler(5, 2)
    with pytest.raises(ValueError, match="one value per index"):
        sched.step([0, 1], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="indices"):
        sched.step([7], torch.tensor([1.0]))


@pytest.mark.parametrize("metric", ["rel_l2", "rel_l1_mean"])
def test_zero_valued_weights_score_finite_through_slimfit(metric):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.zero_()  # all-zero weight: relative change divides by a floored norm
        model[2].weight[:, :4] = 0.0  # partly zero
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sf = SlimFit(model, opt, freeze_ratio=0.5, metric=metric, compression=None)
    x = torch.randn(16, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(4):
            model(x).square().mean().backward()
            opt.step()
            sf.step()
            opt.zero_grad()
    assert sf.stats.nonfinite_scores == 0
    assert torch.isfinite(sf.scheduler.scores).all()
    assert bool(sf.scheduler.scored.all())


def test_nan_weights_do_not_poison_slimfit_schedule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sf = SlimFit(model, opt, freeze_ratio=0.5, compression=None, seed=0)
    x = torch.randn(8, 4)
    for _ in range(3):  # warm-up: every layer scored
        model(x).sum().backward()
        opt.step()
        sf.step()
        opt.zero_grad()
    scores = sf.scheduler.scores.clone()
    poisoned = sf.trainable_layers()[0]
    model.get_parameter(poisoned).grad = torch.full_like(model.get_parameter(poisoned), float("nan"))
    opt.step()
    with pytest.warns(RuntimeWarning, match="non-finite update score"):
        sf.step()
    index = sf.layer_names.index(poisoned)
    assert sf.scheduler.scores[index] == scores[index]
    assert sf.stats.nonfinite_scores == 1
    assert torch.isfinite(sf.scheduler.scores).all()
    assert len(sf.trainable_layers()) == sf.num_trainable


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(1, 6), norm=st.booleans(), freeze_ratio=st.floats(0.0, 0.99), seed=st.integers(0, 2**16))
def test_slimfit_keeps_exactly_k_layers_trainable(depth, norm, freeze_ratio, seed):
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4) if norm else nn.Identity()) for _ in range(depth)]
    model = nn.Sequential(*blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sf = SlimFit(model, opt, freeze_ratio=freeze_ratio, optimizer_state="drop", compression=None)
    n = depth * (2 if norm else 1)
    k = max(1, round((1 - freeze_ratio) * n))
    assert (len(sf.layers), sf.num_trainable) == (n, k)
    seen = set(sf.trainable_layers())
    for _ in range(math.ceil(n / k)):
        assert sum(layer.param.requires_grad for layer in sf.layers) == k
        model(torch.randn(3, 4)).square().sum().backward()
        opt.step()
        sf.step()
        opt.zero_grad()
        seen |= set(sf.trainable_layers())
    assert sum(layer.param.requires_grad for layer in sf.layers) == k
    assert seen == set(sf.layer_names)  # the warm-up visited every layer
