"""Column blocks (slimfit.nn.column_blocks): gradients against nn.Linear, what backward keeps, state dicts, and the
schedule of a split model (small layers, determinism, resume)."""

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_bert import batches, tiny_classifier
from torch import nn

from slimfit import SlimFit, merge_columns, split_columns
from slimfit.memory import SavedTensorMeter
from slimfit.nn._saving import decode, encode
from slimfit.nn.column_blocks import ColumnBlockLinear, column_block_linear, column_bounds
from slimfit.policy import Quantize
from slimfit.scheduler import InterLayerScheduler


def test_bounds_cover_the_input_in_near_equal_widths():
    assert column_bounds(10, 3) == ((0, 3), (3, 7), (7, 10))
    assert column_bounds(384, 8) == tuple((48 * g, 48 * (g + 1)) for g in range(8))
    for bad in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match=r"blocks must be an int in \[1, 10\]"):
            column_bounds(10, bad)


def _split(linear: nn.Linear, blocks: int, trained: list[int]) -> ColumnBlockLinear:
    module = ColumnBlockLinear(linear, blocks)
    for g, p in enumerate(module.weight_blocks):
        p.requires_grad_(g in trained)
    return module


@pytest.mark.parametrize("trained", [[], [1], [0, 2], [0, 1, 2]])
@pytest.mark.parametrize("bias", [True, False])
def test_exact_gradients_are_the_linear_ones_column_by_column(trained, bias):
    torch.manual_seed(0)
    linear = nn.Linear(10, 6, bias=bias)
    module = _split(linear, 3, trained)
    x = torch.randn(2, 5, 10, requires_grad=True)
    y = module(x)
    torch.testing.assert_close(y, linear(x), rtol=0, atol=0)
    grad = torch.randn_like(y)
    wanted = [x, *(p for p in module.weight_blocks if p.requires_grad), *([module.bias] if bias else [])]
    got = torch.autograd.grad(y, wanted, grad)
    dx, dw, *db = torch.autograd.grad(linear(x), [x, linear.weight, *([linear.bias] if bias else [])], grad)
    torch.testing.assert_close(got[0], dx)
    for got_block, g in zip(got[1 : 1 + len(trained)], trained, strict=True):
        s, e = module.bounds[g]
        torch.testing.assert_close(got_block, dw[:, s:e])
    if bias:
        torch.testing.assert_close(got[-1], db[0])
    # A frozen block gets no gradient at all.
    module(x).sum().backward()
    assert [p.grad is not None for p in module.weight_blocks] == [g in trained for g in range(3)]


def test_gradcheck_in_double_precision():
    torch.manual_seed(0)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    blocks = [torch.randn(4, w, dtype=torch.float64, requires_grad=g != 1) for g, w in enumerate((2, 3, 2))]
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    bounds = column_bounds(7, 3)
    assert bounds == ((0, 2), (2, 5), (5, 7))
    assert torch.autograd.gradcheck(lambda x, b, *w: column_block_linear(x, w, bounds, b, None), (x, bias, *blocks))


def test_quantized_gradient_uses_the_code_of_the_blocks_own_columns():
    torch.manual_seed(0)
    setting = Quantize(8)
    linear = nn.Linear(64, 8)
    module = _split(linear, 4, [2])
    x = torch.randn(4, 6, 64)
    grad = torch.randn(4, 6, 8)
    (dw,) = torch.autograd.grad(
        column_block_linear(x, tuple(module.weight_blocks), module.bounds, module.bias, setting),
        [module.weight_blocks[2]],
        grad,
    )
    columns = decode(encode(x[..., 32:48].contiguous(), setting))
    torch.testing.assert_close(dw, grad.reshape(-1, 8).t() @ columns.reshape(-1, 16), rtol=0, atol=0)
    exact = grad.reshape(-1, 8).t() @ x[..., 32:48].reshape(-1, 16)
    assert not torch.equal(dw, exact)  # the code is lossy: this really is the quantized path
    torch.testing.assert_close(dw, exact, rtol=0.05, atol=0.05)


def _saved_bytes(fn, exclude) -> int:
    with SavedTensorMeter(exclude) as meter:
        out = fn()
        held = meter.live_bytes
    del out
    return held


def test_backward_keeps_only_the_trained_blocks_columns_shared_between_readers():
    """Three Linears reading one input (query, key, value): a trained block keeps its columns' code, once for all
    three; frozen blocks keep nothing but the parameters themselves."""
    torch.manual_seed(0)
    setting = Quantize(8)
    x = torch.randn(4, 16, 256, requires_grad=True)
    readers = nn.ModuleList(_split(nn.Linear(256, 32), 4, []) for _ in range(3))

    def forward():
        return [column_block_linear(x, tuple(m.weight_blocks), m.bounds, m.bias, setting) for m in readers]

    assert _saved_bytes(forward, readers) == 0
    one_block = encode(x[..., 64:128].detach().contiguous(), setting)
    expected = one_block.nbytes
    for m in readers:
        m.weight_blocks[1].requires_grad_(True)
    assert _saved_bytes(forward, readers) == expected
    whole = encode(x.detach(), setting)
    whole_bytes = whole.nbytes
    assert expected * 4 == whole_bytes  # a quarter of what the whole matrix keeps
    readers[0].weight_blocks[3].requires_grad_(True)
    assert _saved_bytes(forward, readers) == 2 * expected


def test_state_dict_keeps_the_plain_weight_key_both_ways():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2))
    reference = {k: v.clone() for k, v in plain.state_dict().items()}
    split = nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2))
    assert split_columns(split, 3) == ["0", "2"]
    split.load_state_dict(reference)
    assert sorted(split.state_dict()) == sorted(reference)
    for key, value in split.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    x = torch.randn(3, 12)
    torch.testing.assert_close(split(x), plain(x), rtol=0, atol=0)
    with torch.no_grad():
        split[0].weight_blocks[1].add_(1.0)
    plain.load_state_dict(split.state_dict())
    torch.testing.assert_close(plain(x), split(x), rtol=0, atol=0)
    assert merge_columns(split) == ["0", "2"]
    assert type(split[0]) is nn.Linear and sorted(split.state_dict()) == sorted(reference)
    torch.testing.assert_close(split(x), plain(x), rtol=0, atol=0)


def test_split_skips_excluded_narrow_and_tied_linears():
    model = nn.ModuleDict(
        {"body": nn.Linear(8, 8), "narrow": nn.Linear(2, 8), "head": nn.Linear(8, 3), "tied": nn.Linear(8, 8)}
    )
    model["again"] = nn.Linear(8, 8)
    model["again"].weight = model["tied"].weight
    assert split_columns(model, 4, exclude=("head",)) == ["body"]
    with pytest.raises(ValueError, match="blocks must be an int of at least 2, got 1"):
        split_columns(model, 1)


def test_split_skips_a_language_models_output_embedding():
    class LanguageModel(nn.Module):  # the get_output_embeddings() of transformers' causal LMs
        def __init__(self):
            super().__init__()
            self.body, self.lm_head = nn.Linear(8, 8), nn.Linear(8, 16)

        def get_output_embeddings(self) -> nn.Module:
            return self.lm_head

    model = LanguageModel()
    assert split_columns(model, 4) == ["body"]
    assert type(model.lm_head) is nn.Linear


def _blocked_classifier() -> nn.Module:
    model = tiny_classifier()
    split_columns(model, 4, exclude=("classifier",))
    return model


def test_a_block_is_judged_small_by_its_whole_matrix():
    # Four blocks of a 32-element matrix, a 2-element norm weight and a 40-element embedding; small: 1/4 of the largest.
    costs, sizes = [8, 8, 8, 8, 2, 40], [32, 32, 32, 32, 2, 40]
    assert InterLayerScheduler(6, 60, costs=costs, small_share=0.25).every_step == [0, 1, 4]
    assert InterLayerScheduler(6, 60, costs=costs, small_share=0.25, sizes=sizes).every_step == [4]
    with pytest.raises(ValueError, match="sizes must be None or, with costs, 6 positive ints"):
        InterLayerScheduler(6, 3, sizes=sizes)
    model = _blocked_classifier()
    sf = SlimFit(model, torch.optim.AdamW(model.parameters()), freeze_ratio=0.9, compression=None, seed=0)
    whole = {name: m.in_features * m.out_features for name, m in model.named_modules() if hasattr(m, "bounds")}
    for name, layer, cost, size in zip(sf.layer_names, sf.layers, sf.scheduler.costs, sf.scheduler.sizes, strict=True):
        module = name.rpartition(".weight_blocks.")[0]
        assert cost == layer.param.numel() and size == whole.get(module, cost), name
    assert not any(".weight_blocks." in sf.layer_names[i] for i in sf.scheduler.every_step)
    assert "bert.embeddings.position_embeddings.weight" in sf.trainable_layers()  # 256: 1/8 of a whole 32 x 64


def _train(model, opt, sf, data):
    """The README's loop; the trainable set before each step and each step's loss."""
    sets, losses = [], []
    for batch in data:
        sets.append(sf.trainable_layers())
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sf.step()
        opt.zero_grad()
        losses.append(loss.item())
    return sets, losses


def test_schedule_of_a_split_model_is_deterministic_and_resumes_exactly():
    def fresh():
        torch.manual_seed(0)  # dropout
        model = _blocked_classifier()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        return model, opt, SlimFit(model, opt, freeze_ratio=0.8, seed=0)

    data = batches(10)
    model, opt, sf = fresh()
    reference, _ = _train(model, opt, sf, data)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert len({tuple(s) for s in reference}) > 2
    assert any(".weight_blocks." in name for s in reference for name in s)
    model, opt, sf = fresh()
    assert _train(model, opt, sf, data[:4])[0] == reference[:4]
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict(), "sf": json.loads(json.dumps(sf.state_dict()))}
    rng = torch.get_rng_state()
    model, opt, sf = fresh()
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    sf.load_state_dict(checkpoint["sf"])
    torch.set_rng_state(rng)
    assert _train(model, opt, sf, data[4:])[0] == reference[4:]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


def test_split_model_trains_like_the_whole_model_when_every_block_trains():
    """freeze_ratio 0: nothing is scheduled away, so blocks and whole matrices take the same AdamW steps."""
    losses = []
    for blocks in (0, 4):
        model = tiny_classifier()
        if blocks:
            split_columns(model, blocks, exclude=("classifier",))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        sf = SlimFit(model, opt, freeze_ratio=0.0, compression=None, seed=0)
        losses.append(_train(model, opt, sf, batches(5))[1])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_patched_blocks_compress_and_report_nothing_uncompressed():
    model = _blocked_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sf = SlimFit(model, opt, freeze_ratio=0.5, seed=0)
    assert sf.uncompressed_modules == []
    query = model.bert.encoder.layer[0].attention.self.query
    assert type(query).__name__ == "SlimFitColumnBlockLinear"
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(query(x), F.linear(x, query.weight, query.bias))
    sf.remove()
    assert type(query) is ColumnBlockLinear


def test_scheduler_states_without_sizes_load_where_sizes_are_the_costs():
    state = InterLayerScheduler(3, 10, costs=[4, 4, 2], small_share=0.5).state_dict()
    del state["sizes"]  # written before sizes existed
    InterLayerScheduler(3, 10, costs=[4, 4, 2], small_share=0.5).load_state_dict(state)
    blocked = InterLayerScheduler(3, 10, costs=[4, 4, 2], small_share=0.5, sizes=[8, 8, 2])
    with pytest.raises(ValueError, match=r"sizes=\[4, 4, 2\], this scheduler has \[8, 8, 2\]"):
        blocked.load_state_dict(state)
