"""Inter-layer scheduling: warm-up, top-K choice, score bookkeeping, determinism and fault tolerance."""

import json
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
    sf = SlimFit(model, opt, freeze_ratio=0.5, freeze_unit="layers", metric=metric, compression=None)
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
    sf = SlimFit(model, opt, freeze_ratio=0.5, freeze_unit="layers", compression=None, seed=0)
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
    sf = SlimFit(model, opt, freeze_ratio=freeze_ratio, freeze_unit="layers", optimizer_state="drop", compression=None)
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


# ---------------------------------------------------------------------------------------------- costed budgets


def test_costed_choice_takes_ranked_layers_while_they_fit_and_skips_the_rest():
    costs = [5, 1, 3, 2, 4, 1]
    sched = InterLayerScheduler(6, 6, torch.Generator().manual_seed(0), costs=costs)
    for _ in range(6):  # warm-up: score everything once
        sched.step(sched.trainable, torch.ones(len(sched.trainable)))
    assert bool(sched.scored.all())
    sched.scores[:] = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # ranked 0, 1, 2, 3, 4, 5
    sched.step([], torch.empty(0))
    # 0 (5) fits, 1 (1) fills the budget of 6; nothing else fits.
    assert sched.trainable == [0, 1]
    sched.scores[:] = torch.tensor([1.0, 2.0, 6.0, 5.0, 4.0, 3.0])  # ranked 2, 3, 4, 5, 1, 0
    sched.step([], torch.empty(0))
    # 2 (3) and 3 (2) fit, 4 (4) does not with 1 left, 5 (1) does; then nothing is left.
    assert sched.trainable == [2, 3, 5]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_costed_sets_fit_are_maximal_and_the_warmup_visits_everything(data):
    n = data.draw(st.integers(1, 30))
    costs = data.draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
    budget = data.draw(st.integers(max(costs), sum(costs)))
    share = data.draw(st.none() | st.floats(0.01, 1.0))
    seed = data.draw(st.integers(0, 2**31))
    sched = InterLayerScheduler(n, budget, torch.Generator().manual_seed(seed), costs, small_share=share)
    small = sched.every_step
    assert small == [] if share is None else all(costs[i] <= share * max(costs) for i in small)
    assert sum(costs[i] for i in small) + max(costs) <= budget  # the largest layer can still train
    seen: set[int] = set()
    for _ in range(n):  # at least one pending layer trains per warm-up step, so n steps always suffice
        chosen = sched.trainable
        taken = sum(costs[i] for i in chosen)
        assert chosen and taken <= budget and set(small) <= set(chosen)
        # Maximal: every layer left out is larger than what is left of the budget.
        assert all(costs[i] > budget - taken for i in range(n) if i not in chosen)
        seen |= set(chosen)
        sched.step(chosen, torch.rand(len(chosen)) + 0.1)
    assert seen == set(range(n)) and bool(sched.scored.all())


def test_unit_costs_choose_as_a_layer_count():
    a = InterLayerScheduler(9, 3, torch.Generator().manual_seed(4))
    b = InterLayerScheduler(9, 3, torch.Generator().manual_seed(4), costs=[1] * 9)
    for row in torch.rand(8, 3):
        assert a.trainable == b.trainable
        a.step(a.trainable, row)
        b.step(b.trainable, row)


def test_costed_state_dict_round_trip_and_mismatch():
    costs = [4, 1, 2, 3, 1, 5, 2]
    a = InterLayerScheduler(7, 6, torch.Generator().manual_seed(2), costs)
    for _ in range(5):
        a.step(a.trainable, torch.rand(len(a.trainable)))
    b = InterLayerScheduler(7, 6, torch.Generator().manual_seed(9), costs)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(10):
        row = torch.rand(len(a.trainable))
        a.step(a.trainable, row)
        b.step(b.trainable, row)
        assert a.trainable == b.trainable
    with pytest.raises(ValueError, match="costs"):
        InterLayerScheduler(7, 6, costs=[4, 1, 2, 3, 1, 5, 1]).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="costs"):
        InterLayerScheduler(7, 6).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    ("costs", "budget"), [([1, 2], 1), ([1, 2], 2.5), ([1, 0], 1), ([1, 2, 3], 3), ([1.0, 2], 2), ([True, 2], 2)]
)
def test_costed_bad_input_raises(costs, budget):
    with pytest.raises(ValueError):
        InterLayerScheduler(2, budget, costs=costs)


def test_max_frozen_steps_revisits_the_longest_frozen_layer_ahead_of_the_ranking():
    sched = InterLayerScheduler(4, 1, torch.Generator().manual_seed(0), max_frozen_steps=2)
    for _ in range(4):  # warm-up: one layer per step, in warm-up order
        sched.step(sched.trainable, torch.ones(1))
    order = sched.warmup_order.tolist()
    assert sched.last_trained[order].tolist() == [0, 1, 2, 3]
    top = order[3]
    sched.scores[:] = 0.0
    sched.scores[top] = 1.0  # the last layer of the warm-up always ranks first
    # Step 4: order[0] and order[1] have been frozen 3 and 2 steps; freezing either again would exceed 2, so both
    # are due and the budget of one takes the longer frozen, order[0]. Step 5: order[1] (it waited: a bound below
    # ceil(N / K) cannot always hold); step 6: order[2]; step 7: top, now the longest frozen; step 8: order[0].
    chosen = []
    for _ in range(5):
        chosen.append(sched.trainable)
        sched.step(sched.trainable, torch.tensor([1.0 if sched.trainable == [top] else 0.0]))
    assert chosen == [[order[0]], [order[1]], [order[2]], [top], [order[0]]]


def test_max_frozen_steps_none_ranks_as_before():
    bounded = InterLayerScheduler(6, 2, torch.Generator().manual_seed(1), max_frozen_steps=1000)
    plain = InterLayerScheduler(6, 2, torch.Generator().manual_seed(1))
    for row in torch.rand(12, 2):
        assert bounded.trainable == plain.trainable
        bounded.step(bounded.trainable, row)
        plain.step(plain.trainable, row)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), data=st.data())
def test_no_layer_stays_frozen_longer_than_the_bound(n, data):
    k = data.draw(st.integers(1, n - 1))
    bound = data.draw(st.integers(math.ceil(n / k), 3 * math.ceil(n / k)))
    sched = InterLayerScheduler(n, k, torch.Generator().manual_seed(data.draw(st.integers(0, 2**31))), None, bound)
    frozen_for = [0] * n
    scores = torch.rand(n) ** 4  # a few layers dominate, so the ranking alone would starve the rest
    for step in range(6 * math.ceil(n / k) + bound):
        chosen = sched.trainable
        assert len(chosen) == k
        for i in range(n):
            frozen_for[i] = 0 if i in chosen else frozen_for[i] + 1
            if sched.scored[i]:
                assert frozen_for[i] <= bound, (step, i)
        sched.step(chosen, scores[chosen] * (1 + 0.1 * torch.rand(k)))


def test_max_frozen_steps_state_round_trip_and_mismatch():
    a = InterLayerScheduler(7, 2, torch.Generator().manual_seed(2), max_frozen_steps=4)
    for _ in range(6):
        a.step(a.trainable, torch.rand(2) ** 4)
    b = InterLayerScheduler(7, 2, torch.Generator().manual_seed(9), max_frozen_steps=4)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert torch.equal(a.last_trained, b.last_trained)
    for _ in range(12):
        row = torch.rand(2) ** 4
        a.step(a.trainable, row)
        b.step(b.trainable, row)
        assert a.trainable == b.trainable
    with pytest.raises(ValueError, match="max_frozen_steps=4"):
        InterLayerScheduler(7, 2).load_state_dict(a.state_dict())


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3"])
def test_bad_max_frozen_steps_raises(bad):
    with pytest.raises(ValueError, match="max_frozen_steps must be a positive int or None"):
        InterLayerScheduler(5, 2, max_frozen_steps=bad)


def _embedding_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 8), nn.Linear(8, 3))


def _train_sets(model, opt, sf, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(steps):
        sets.append(sf.trainable_layers())
        tokens = torch.randint(0, 100, (4, 5), generator=g)
        model(tokens).mean(1).square().sum().backward()
        opt.step()
        sf.step()
        opt.zero_grad()
    return sets


def test_freeze_unit_parameters_bounds_trained_elements_and_leaves_too_large_layers_frozen():
    model = _embedding_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # Layers: embedding 1600, Linear 256, LayerNorm 16, Linear 128, Linear 24 (2024 elements): 15% is 304.
    with pytest.warns(RuntimeWarning, match=r"0\.weight \(1,600\) is larger than the per-step budget of 304"):
        sf = SlimFit(model, opt, freeze_ratio=0.85, freeze_unit="parameters", compression=None, seed=0)
    assert sf.freeze_unit == "parameters" and sf.num_trainable == 304
    assert sf.layer_names == ["1.weight", "2.weight", "3.weight", "4.weight"]
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    sets = _train_sets(model, opt, sf, 12)
    assert {name for s in sets for name in s} == set(sf.layer_names)
    for chosen in sets:
        assert sum(sizes[name] for name in chosen) <= 304
    assert len({tuple(s) for s in sets}) > 1
    assert not model[0].weight.requires_grad and model[0].weight.grad is None
    assert "freeze_unit='parameters'" in repr(sf)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"freeze_unit": "layers"}, "freeze_unit='layers'"),
        ({"revisit_rounds": 1}, "revisit_rounds=1"),
        ({"small_layer_share": None}, "small_layer_share=None"),
    ],
)
def test_schedule_options_are_deterministic_and_resume_exactly(options, named):
    def fresh(**kwargs):
        model = _embedding_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sf = SlimFit(model, opt, freeze_ratio=0.8, compression=None, seed=3, **kwargs)
        return model, opt, sf

    model, opt, sf = fresh(**options)
    reference = _train_sets(model, opt, sf, 16)
    model, opt, sf = fresh(**options)
    assert _train_sets(model, opt, sf, 16) == reference
    # The option changes the schedule (else this test could not tell a lost option from a restored one).
    model, opt, sf = fresh()
    assert _train_sets(model, opt, sf, 16) != reference
    model, opt, sf = fresh(**options)
    first = _train_sets(model, opt, sf, 7)
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict(), "sf": json.loads(json.dumps(sf.state_dict()))}
    model, opt, sf = fresh(**options)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    sf.load_state_dict(checkpoint["sf"])
    # The rest of the data stream: replay the generator past the first 7 batches.
    g = torch.Generator().manual_seed(0)
    for _ in range(7):
        torch.randint(0, 100, (4, 5), generator=g)
    rest = []
    for _ in range(9):
        rest.append(sf.trainable_layers())
        model(torch.randint(0, 100, (4, 5), generator=g)).mean(1).square().sum().backward()
        opt.step()
        sf.step()
        opt.zero_grad()
    assert first + rest == reference
    # A state saved with the option does not load without it.
    with pytest.raises(ValueError, match=named):
        fresh()[2].load_state_dict(checkpoint["sf"])


def test_bad_freeze_unit_raises():
    model = _embedding_model()
    with pytest.raises(ValueError, match=r"freeze_unit must be one of \['parameters', 'layers'\], got 'bytes'"):
        SlimFit(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_unit="bytes", compression=None)


@pytest.mark.parametrize(("freeze_unit", "rounds", "bound"), [("layers", 2, 10), ("parameters", 2, 4)])
def test_revisit_rounds_bound_every_layer_in_training(freeze_unit, rounds, bound):
    # Layers: embedding 1600, Linear 256, LayerNorm 16, Linear 128, Linear 24. At 0.8: K = 1 of 5 layers, a round
    # is 5 steps. By parameters: a budget of 405 of the 2024 elements; the embedding does not fit and is not
    # scheduled, and a round of the other four (424 elements) is ceil(424 / 405) = 2 steps.
    model = _embedding_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sf = SlimFit(model, opt, freeze_ratio=0.8, freeze_unit=freeze_unit, revisit_rounds=rounds, compression=None)
    rounds_steps = math.ceil(
        (len(sf.layers) if freeze_unit == "layers" else sum(x.param.numel() for x in sf.layers)) / sf.num_trainable
    )
    assert sf.max_frozen_steps == rounds * rounds_steps == bound
    sets = _train_sets(model, opt, sf, 40)
    for name in sf.layer_names:
        runs, frozen = [], 0
        for chosen in sets[rounds_steps:]:  # after the warm-up
            frozen = 0 if name in chosen else frozen + 1
            runs.append(frozen)
        assert max(runs) <= bound, name
    other = _embedding_model()
    unbounded = SlimFit(other, torch.optim.SGD(other.parameters(), lr=0.1), revisit_rounds=None, compression=None)
    assert unbounded.max_frozen_steps is None and unbounded.scheduler.max_frozen_steps is None


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_bad_revisit_rounds_raises(bad):
    model = _embedding_model()
    with pytest.raises(ValueError, match="revisit_rounds must be a positive int or None"):
        SlimFit(model, torch.optim.SGD(model.parameters(), lr=0.1), revisit_rounds=bad, compression=None)


# ------------------------------------------------------------------------------------------------- small layers


def test_small_layers_train_at_every_step_paid_from_the_budget():
    # Largest 40; at a share of 1/8 (5 elements) layers 1 (2), 4 (3) and 5 (5) are small; they take 10 of the budget
    # of 60, leaving 50 for the largest. Packed by score, the large layers would fill the budget without them.
    costs = [40, 2, 20, 20, 3, 5, 10]
    sched = InterLayerScheduler(7, 60, torch.Generator().manual_seed(0), costs=costs, small_share=0.125)
    assert sched.every_step == [1, 4, 5]
    plain = InterLayerScheduler(7, 60, torch.Generator().manual_seed(0), costs=costs)
    assert plain.every_step == []
    scores = torch.tensor([7.0, 1.0, 6.0, 5.0, 2.0, 0.5, 4.0])
    for s in (sched, plain):
        while not bool(s.scored.all()):
            assert set(sched.every_step) <= set(sched.trainable)
            s.step(s.trainable, scores[s.trainable])
    # Ranked 0 (40), 2 (20), 3, 6, 4, 1, 5: without the rule 0 and 2 fill the budget; with it 0 fits beside the
    # small layers and 6 (10) takes the rest.
    assert plain.trainable == [0, 2]
    assert sched.trainable == [0, 1, 4, 5, 6]
    sched.step(sched.trainable, torch.tensor([0.1, 0.1, 0.1, 0.1, 9.0]))  # the small layers' scores do not matter
    assert set(sched.every_step) <= set(sched.trainable)
    assert sum(costs[i] for i in sched.trainable) <= 60


def test_small_layers_are_taken_smallest_first_while_the_largest_still_fits():
    # Share 1/2 of 40 makes 2, 3, 5, 10, 20 small, but the budget of 50 keeps room for 40 with only 2 + 3 + 5.
    sched = InterLayerScheduler(6, 50, costs=[40, 20, 10, 5, 3, 2], small_share=0.5)
    assert sched.every_step == [3, 4, 5]
    # A budget that holds only the largest layer leaves no room for any.
    assert InterLayerScheduler(3, 40, costs=[40, 1, 1], small_share=1.0).every_step == []
    # Without costs (counting layers) no layer is small, whatever the share.
    assert InterLayerScheduler(4, 2, small_share=1.0).every_step == []


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), True, "0.1"])
def test_bad_small_share_raises(bad):
    with pytest.raises(ValueError, match="small_share must be a number in"):
        InterLayerScheduler(2, 2, costs=[1, 2], small_share=bad)
    model = _embedding_model()
    with pytest.raises(ValueError, match="small_layer_share must be a number in"):
        SlimFit(model, torch.optim.SGD(model.parameters(), lr=0.1), small_layer_share=bad, compression=None)


@pytest.mark.parametrize(
    ("option", "added_keys", "default"),
    [
        ("revisit_rounds", ("max_frozen_steps", "last_trained"), 3),
        ("small_layer_share", ("small_share",), 0.125),
    ],
)
def test_state_from_before_an_option_loads_only_without_it(option, added_keys, default):
    """A state saved before ``option`` existed lacks its keys: it loads into a SlimFit without the option (None)
    and continues the same schedule, and is refused with the option at its default."""

    def slimfit(**kwargs):
        model = _embedding_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return model, opt, SlimFit(model, opt, freeze_ratio=0.6, compression=None, seed=1, **kwargs)

    model, opt, old = slimfit(**{option: None})
    _train_sets(model, opt, old, 4)
    state = old.state_dict()
    del state[option]
    for key in added_keys:
        del state["scheduler"][key]
    with pytest.raises(ValueError, match=f"state was saved with {option}=None, this SlimFit has {default}"):
        slimfit()[2].load_state_dict(state)
    fresh = slimfit(**{option: None})[2]
    fresh.load_state_dict(state)
    assert fresh.trainable_layers() == old.trainable_layers()


def test_counting_layers_records_no_small_layer_share_and_loads_older_states():
    def slimfit(**kwargs):
        model = _embedding_model()
        return SlimFit(model, torch.optim.AdamW(model.parameters()), freeze_unit="layers", compression=None, **kwargs)

    old = slimfit(small_layer_share=None)
    state = old.state_dict()
    del state["small_layer_share"], state["scheduler"]["small_share"]
    new = slimfit()  # the default share: no layer is small when every layer costs the same
    assert new.small_layer_share is None and new.scheduler.every_step == []
    new.load_state_dict(state)
    assert new.trainable_layers() == old.trainable_layers()
    model = _embedding_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        shared = SlimFit(model, torch.optim.AdamW(model.parameters()), small_layer_share=1, compression=None)
    assert shared.small_layer_share == 1.0 and isinstance(shared.small_layer_share, float)
