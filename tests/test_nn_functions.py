"""slimfit.nn autograd Functions: exact gradients with compression off, bounded error and small saves with it on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimfit.memory import SavedTensorMeter
from slimfit.nn import (
    ACTIVATIONS,
    ActivationFunction,
    AttentionFunction,
    DropoutFunction,
    LayerNormFunction,
    LinearFunction,
    activation,
    code_segments,
    derivative_levels,
    dropout,
    layer_norm,
    linear,
    scaled_dot_product_attention,
)
from slimfit.policy import DerivativeCode, Quantize, TopK


def _f64(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- gradcheck with compression off (float64) -------------------------------------------------------------


def test_linear_gradcheck():
    x, w, b = _f64(2, 3, 5), _f64(4, 5), _f64(4)
    assert torch.autograd.gradcheck(lambda x, w, b: LinearFunction.apply(x, w, b, None), (x, w, b))


def test_layer_norm_gradcheck():
    x, w, b = _f64(3, 4, 6), _f64(6), _f64(6)
    assert torch.autograd.gradcheck(lambda x, w, b: LayerNormFunction.apply(x, w, b, (6,), 1e-5, None), (x, w, b))
    x2, w2 = _f64(2, 3, 4), _f64(3, 4)
    assert torch.autograd.gradcheck(lambda x, w: LayerNormFunction.apply(x, w, None, (3, 4), 1e-5, None), (x2, w2))


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "sigmoid", "tanh"])
def test_activation_gradcheck(name):
    x = _f64(4, 7)
    assert torch.autograd.gradcheck(lambda x: ActivationFunction.apply(x, name, None), (x,))


@pytest.mark.parametrize("mode", ["packed", "replay"])
def test_dropout_gradcheck(mode):
    x = _f64(4, 9)

    def fn(x):
        torch.manual_seed(0)  # every call of gradcheck must draw the same mask
        return DropoutFunction.apply(x, 0.3, mode)

    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_gradcheck(dropout_p, masked):
    q, k, v = _f64(1, 2, 3, 4), _f64(1, 2, 4, 4), _f64(1, 2, 4, 3)
    mask = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True) if masked else None

    def fn(q, k, v, mask):
        torch.manual_seed(0)
        return AttentionFunction.apply(q, k, v, mask, dropout_p, False, None, None)

    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


def test_attention_causal_gradcheck():
    q, k, v = _f64(1, 1, 4, 3), _f64(1, 1, 4, 3), _f64(1, 1, 4, 3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: AttentionFunction.apply(q, k, v, None, 0.0, True, 0.5, None), (q, k, v)
    )


# --- compression on: bounded error -----------------------------------------------------------------------


def _grads(fn, *inputs):
    inputs = [t.detach().float().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1234)).to(out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in inputs]


def test_linear_quantized_input_gradient_error():
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 16, 64), torch.randn(32, 64), torch.randn(32)
    out_ref, g_ref = _grads(lambda x, w, b: F.linear(x, w, b), x, w, b)
    out, g = _grads(lambda x, w, b: linear(x, w, b, Quantize(8)), x, w, b)
    assert torch.equal(out, out_ref)  # forward is untouched
    assert torch.allclose(g[0], g_ref[0], atol=1e-5)  # dx uses the exact weight
    assert _rel_err(g[1], g_ref[1]) < 0.01
    assert torch.allclose(g[2], g_ref[2], atol=1e-5)


@pytest.mark.parametrize("setting, tol", [(Quantize(8), 0.01), (Quantize(4), 0.1), (TopK(0.5), 0.1), (TopK(0.1), 0.25)])
def test_layer_norm_compressed_gradient_error(setting, tol):
    torch.manual_seed(0)
    x, w, b = torch.randn(8, 32, 128), torch.rand(128) + 0.5, torch.randn(128)
    out_ref, g_ref = _grads(lambda x, w, b: F.layer_norm(x, (128,), w, b), x, w, b)
    out, g = _grads(lambda x, w, b: layer_norm(x, (128,), w, b, 1e-5, setting), x, w, b)
    assert torch.allclose(out, out_ref, atol=1e-6)
    assert _rel_err(g[0], g_ref[0]) < tol
    if isinstance(setting, Quantize):  # TopK serves frozen weights: only dx is meant to be accurate
        assert _rel_err(g[1], g_ref[1]) < tol
    assert torch.allclose(g[2], g_ref[2], atol=1e-4)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "tanh"])
@pytest.mark.parametrize("bits, tol", [(2, 0.3), (3, 0.15), (4, 0.08)])
def test_activation_derivative_code_error(name, bits, tol):
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    out_ref, g_ref = _grads(lambda x: ACTIVATION_REF[name](x), x)
    out, g = _grads(lambda x: activation(x, name, DerivativeCode(bits)), x)
    assert torch.allclose(out, out_ref, atol=1e-6)
    assert _rel_err(g[0], g_ref[0]) < tol


ACTIVATION_REF = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
}


def test_relu_one_bit_code_is_exact():
    x = torch.randn(33, 17)
    x[0, :3] = 0.0
    _, g_ref = _grads(F.relu, x)
    _, g = _grads(lambda x: activation(x, "relu", DerivativeCode(1)), x)
    assert torch.equal(g[0], g_ref[0])


def test_code_segments_agree_with_thresholds():
    x = torch.linspace(-6, 6, 20001, dtype=torch.float64)
    for name in ("gelu", "tanh", "silu"):
        levels, thresholds = derivative_levels(name, 3)
        assert list(levels) == sorted(levels)
        breaks, codes = code_segments(name, 3)
        by_x = torch.tensor(codes)[torch.bucketize(x, torch.tensor(breaks, dtype=torch.float64))]
        by_d = torch.bucketize(ACTIVATIONS[name].grad(x), torch.tensor(thresholds, dtype=torch.float64))
        assert (by_x != by_d).sum() <= 2 * len(breaks)  # may differ only at grid points next to a break


def test_activation_quantized_input_error():
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    _, g_ref = _grads(F.gelu, x)
    _, g = _grads(lambda x: activation(x, "gelu", Quantize(4)), x)
    assert _rel_err(g[0], g_ref[0]) < 0.1


@pytest.mark.parametrize("setting, tol", [(None, 1e-5), (Quantize(8), 0.03)])
def test_attention_matches_sdpa(setting, tol):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    mask[0, ..., 12:] = False
    out_ref, g_ref = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v)
    fn = AttentionFunction.apply
    out, g = _grads(lambda q, k, v: fn(q, k, v, mask, 0.0, False, None, setting), q, k, v)
    assert torch.allclose(out, out_ref, atol=1e-6)
    for got, ref in zip(g, g_ref, strict=True):
        assert _rel_err(got, ref) < tol


def test_attention_dropout_replay_matches_pytorch():
    q, k, v = torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4)
    torch.manual_seed(3)
    out_ref, g_ref = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5), q, k, v)
    torch.manual_seed(3)
    out, g = _grads(lambda q, k, v: scaled_dot_product_attention(q, k, v, dropout_p=0.5, setting=None), q, k, v)
    torch.manual_seed(3)
    fn = AttentionFunction.apply
    out_c, g_c = _grads(lambda q, k, v: fn(q, k, v, None, 0.5, False, None, Quantize(8)), q, k, v)
    assert torch.equal(out, out_ref) and torch.allclose(out_c, out_ref, atol=1e-6)
    for got, got_c, ref in zip(g, g_c, g_ref, strict=True):
        assert torch.equal(got, ref)
        assert _rel_err(got_c, ref) < 0.03  # same dropout pattern replayed; only quantization error


@pytest.mark.parametrize("mode", ["packed", "replay"])
def test_dropout_matches_pytorch(mode):
    x = torch.randn(16, 33)
    torch.manual_seed(1)
    out_ref, g_ref = _grads(lambda x: F.dropout(x, 0.25, True), x)
    torch.manual_seed(1)
    out, g = _grads(lambda x: dropout(x, 0.25, True, mode), x)
    assert torch.equal(out, out_ref) and torch.equal(g[0], g_ref[0])


# --- what is saved ---------------------------------------------------------------------------------------


def _saved_bytes(fn, *inputs, params=()) -> int:
    with SavedTensorMeter([*inputs, *params]) as meter:
        out = fn(*inputs)
    live = meter.live_bytes
    del out
    return live


def test_frozen_linear_saves_nothing_trainable_saves_8bit_once():
    x = torch.randn(4, 32, 64, requires_grad=True)
    w_frozen = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)
    w = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(3)]
    assert _saved_bytes(lambda x: linear(x, w_frozen, None, Quantize(8)), x, params=[w_frozen]) == 0
    one = _saved_bytes(lambda x: linear(x, w[0], None, Quantize(8)), x, params=w)
    assert one == x.numel() + 4 * x.numel() // 128  # 1 byte per element + bf16 scale and offset per group
    x2 = torch.randn(4, 32, 64, requires_grad=True)
    three = _saved_bytes(lambda x: [linear(x, wi, None, Quantize(8)) for wi in w], x2, params=w)
    assert three == one  # Q, K, V share one code


def test_layer_norm_saves_code_and_rstd_only():
    x = torch.randn(8, 16, 128, requires_grad=True)
    w = torch.nn.Parameter(torch.ones(128), requires_grad=False)
    b = torch.nn.Parameter(torch.zeros(128))
    rows = 8 * 16
    sparse = _saved_bytes(lambda x: layer_norm(x, (128,), w, b, 1e-5, TopK(0.1)), x, params=[w, b])
    assert sparse == rows * 13 * (4 + 2) + rows * 4  # 13 kept fp32 values + uint16 offsets, fp32 rstd
    x_frozen = torch.randn(8, 16, 128)
    assert _saved_bytes(lambda x: layer_norm(x, (128,), w, b, 1e-5, TopK(0.1)), x_frozen, params=[w, b]) == 0


def test_activation_code_and_dropout_mask_sizes():
    x = torch.randn(8, 16, 256, requires_grad=True)
    assert _saved_bytes(lambda x: activation(x, "gelu", DerivativeCode(3)), x) == 3 * x.numel() // 8
    assert _saved_bytes(lambda x: dropout(x, 0.1, True, "packed"), x) == x.numel() // 8
    assert _saved_bytes(lambda x: dropout(x, 0.1, True, "replay"), x) == torch.get_rng_state().numel()


def test_attention_never_saves_the_score_matrix():
    q, k, v = (torch.randn(2, 4, 256, 16, requires_grad=True) for _ in range(3))
    saved = _saved_bytes(lambda q, k, v: scaled_dot_product_attention(q, k, v, dropout_p=0.1), q, k, v)
    assert saved < 3 * q.numel() * 1.1 + torch.get_rng_state().numel()  # three 8-bit codes + RNG state
    assert saved < 2 * 4 * 256 * 256  # not even one byte per score


def test_nothing_saved_without_grad():
    x = torch.randn(4, 8, 64)
    w = torch.nn.Parameter(torch.randn(64, 64))
    with torch.no_grad():
        assert _saved_bytes(lambda x: linear(x, w, None, Quantize(8)), x) == 0
    assert _saved_bytes(lambda x: activation(x, "gelu", DerivativeCode(3)), x) == 0
    assert _saved_bytes(lambda x: scaled_dot_product_attention(x, x, x), x.view(4, 1, 8, 64)) == 0


def test_half_precision_follows_activation_dtype():
    x = torch.randn(4, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    y = layer_norm(activation(x, "gelu", DerivativeCode(3)), (64,), w, None, 1e-5, Quantize(8))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


def test_attention_backward_replays_forward_autocast():
    """Rotary embeddings leave q and k in fp32 while v is bf16 under autocast: the backward recompute must cast
    as forward did (it failed with mixed dtypes before)."""
    from slimfit.nn.attention import scaled_dot_product_attention

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 8, 16, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 8, 16, generator=g).bfloat16().requires_grad_()
    grads = []
    for setting in (None, Quantize(8)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = scaled_dot_product_attention(q, k, v, is_causal=True, setting=setting)
        got = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        assert [t.dtype for t in got] == [torch.float32, torch.float32, torch.bfloat16]
        grads.append(got)
    for exact, compressed in zip(*grads, strict=True):
        cos = torch.nn.functional.cosine_similarity(exact.float().flatten(), compressed.float().flatten(), dim=0)
        assert cos > 0.99
