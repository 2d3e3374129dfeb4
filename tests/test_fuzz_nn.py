"""Hypothesis fuzzing of the slimfit.nn autograd Functions against the uncompressed PyTorch modules.

Drawn: shapes (including size-1 dims), dtypes (float32, bfloat16, float16), memory layouts (contiguous,
transposed, every-other-element slices) and magnitudes from 1e-30 to 1e30 (float16 within its range).
Checked: no crash; outputs and gradients finite wherever the uncompressed reference's are; gradients within
the error bound the compression guarantees. Op-level fuzzing of the kernels lives in tests/test_ops_*.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimfit.nn import ACTIVATIONS, code_segments, derivative_levels
from slimfit.nn.activation import ActivationFunction
from slimfit.nn.attention import AttentionFunction
from slimfit.nn.dropout import DropoutFunction
from slimfit.nn.layernorm import LayerNormFunction
from slimfit.nn.linear import LinearFunction
from slimfit.policy import DerivativeCode, Quantize, TopK

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "transposed", "strided")
# Smallest normal float16 is 6e-5 and its largest value 65504: keep its magnitudes (and products) inside.
EXPONENTS = {torch.float32: (-30, 30), torch.bfloat16: (-30, 30), torch.float16: (-2, 2)}


@st.composite
def tensors(draw, shape: tuple[int, ...], dtype: torch.dtype | None = None, scale_exp: int | None = None):
    """A leaf tensor of ``shape`` with a drawn dtype, layout and magnitude ``10**scale_exp``."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    if scale_exp is None:
        scale_exp = draw(st.integers(*EXPONENTS[dtype]))
    layout = draw(st.sampled_from(LAYOUTS)) if len(shape) >= 2 else "contiguous"
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if layout == "transposed":
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)
    elif layout == "strided":
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
    else:
        base = torch.randn(*shape, generator=g)
    x = (base * 10.0**scale_exp).to(dtype)
    if layout != "contiguous":  # .to() above may have made it contiguous: restore the drawn layout
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2) if layout == "transposed" else _strided(x)
    return x.requires_grad_()


def _strided(x: torch.Tensor) -> torch.Tensor:
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def _finite_where(ours: torch.Tensor, ref: torch.Tensor) -> None:
    mask = torch.isfinite(ref)
    assert torch.isfinite(ours[mask]).all()


def _grads(out: torch.Tensor, grad_out: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor | None]:
    need = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, need, grad_out))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def _within(ours: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    finite = torch.isfinite(ref)
    err = (ours.double() - ref.double()).abs()
    assert bool((err[finite] <= bound.expand_as(err)[finite]).all())


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


shapes2d = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 40))


@FUZZ
@given(data=st.data(), shape=shapes2d, out_features=st.integers(1, 12), bits=st.sampled_from([2, 4, 8]))
def test_linear_fuzz(data, shape, out_features, bits):
    x = data.draw(tensors(shape))
    w = data.draw(tensors((out_features, shape[-1]), dtype=x.dtype, scale_exp=0))
    b = data.draw(tensors((out_features,), dtype=x.dtype, scale_exp=0))
    g = data.draw(tensors((*shape[:-1], out_features), dtype=x.dtype, scale_exp=0)).detach()
    out = LinearFunction.apply(x, w, b, Quantize(bits, 16))
    ref = F.linear(x, w, b)
    assert out.dtype == x.dtype and out.shape == ref.shape
    # Forward is F.linear itself; grad mode may pick another kernel, so allow a few ulps of the summed terms.
    _within(out, ref, 8 * _eps(x.dtype) * (x.detach().double().abs() @ w.detach().double().abs().t() + b.abs()))
    dx, dw, db = _grads(out, g, x, w, b)
    rdx, rdw, rdb = _grads(ref, g, x, w, b)
    for ours, theirs in ((dx, rdx), (dw, rdw), (db, rdb)):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        _finite_where(ours, theirs)
    # dx and db are exact up to summation order: a few ulps of the sum of absolute terms.
    g64, w64 = g.double().abs(), w.detach().double().abs()
    _within(dx, rdx, 8 * _eps(x.dtype) * (g64 @ w64))
    _within(db, rdb, 8 * _eps(x.dtype) * g64.reshape(-1, out_features).sum(0))
    # dW = g^T x_hat, |x_hat - x| <= one quantization step per element (half a step plus bf16-rounded scales),
    # a step being at most the tensor's range / (2**bits - 1); the bf16 offset (a group's minimum) is rounded
    # too, by up to 2**-8 of |x|, which is all the error of a constant group (a range, so a step, of 0).
    x64, g64 = x.detach().double(), g.double().reshape(-1, out_features)
    step = float(x64.max() - x64.min()) / (2**bits - 1)
    bound = (
        float(g64.norm()) * math.sqrt(x.numel()) * (step + 2**-8 * float(x64.abs().max()))
        + 8 * _eps(x.dtype) * float(g64.abs().sum(0).max()) * float(x64.abs().max()) * x.shape[-1]
    )
    if math.isfinite(bound):
        assert float((dw.double() - rdw.double()).norm()) <= bound


@FUZZ
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(2, 48)),
    setting=st.sampled_from([Quantize(8), Quantize(4), TopK(0.1), TopK(1.0)]),
    trainable=st.booleans(),
)
def test_layer_norm_fuzz(data, shape, setting, trainable):
    dtype = data.draw(st.sampled_from(DTYPES))
    x = data.draw(tensors(shape, dtype=dtype))
    w = data.draw(tensors(shape[-1:], dtype=dtype, scale_exp=0)).requires_grad_(trainable)
    b = data.draw(tensors(shape[-1:], dtype=dtype, scale_exp=0))
    g = data.draw(tensors(shape, dtype=dtype, scale_exp=0)).detach()
    out = LayerNormFunction.apply(x, w, b, shape[-1:], 1e-5, setting)
    ref = F.layer_norm(x, shape[-1:], w, b, 1e-5)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    _finite_where(out, ref)
    dx, dw, db = _grads(out, g, x, w, b)
    rdx, rdw, rdb = _grads(ref, g, x, w, b)
    assert (dw is None) == (not trainable)
    for ours, theirs in ((dx, rdx), (dw, rdw), (db, rdb)):
        if theirs is not None:
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            _finite_where(ours, theirs)
    # dx error bound: the normalised output is kept to within one quantization step (Quantize) or only its
    # largest entries (TopK); either way |x_hat_kept - x_hat| <= ||x_hat|| = sqrt(n) per row, so the error
    # of dx per row is bounded by a few ||w * g|| * rstd. Compare relative to the exact gradient's scale.
    # The natural scale of dx is |w * g| * rstd (dx itself can cancel to almost nothing, e.g. rows of two).
    x64 = x.detach().double()
    rstd = (x64.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
    natural = float((w.detach().double() * g.double() * rstd).abs().max())
    if isinstance(setting, TopK) and setting.keep == 1.0 and dtype == torch.float32 and math.isfinite(natural):
        # Where PyTorch's own float32 statistics overflow (|x| near 1e20: the variance passes 3e38) both are NaN;
        # compare where the reference is finite, as _finite_where does.
        finite = torch.isfinite(rdx)
        torch.testing.assert_close(dx[finite], rdx[finite], rtol=1e-3, atol=1e-4 * natural)
    elif isinstance(setting, Quantize) and setting.bits == 8 and dtype == torch.float32 and torch.isfinite(rdx).all():
        # Backward uses x_hat + d, |d| <= D per element: one step (x_hat's range / 255) plus the bf16 rounding of a
        # group's offset (2**-8 of |x_hat|). dx = rstd * (wg - mean(wg) - x_hat * mean(wg * x_hat)), so per row
        # |dx error| <= rstd * ||wg|| * D * (2 + D), as ||x_hat|| <= sqrt(n) (Cauchy-Schwarz on both means). The
        # error scales with rstd: a row of two nearly equal values has a large one and an exact dx of almost 0.
        x_hat = (x64 - x64.mean(-1, keepdim=True)) * rstd
        d = float(x_hat.max() - x_hat.min()) / 255 + 2**-8 * float(x_hat.abs().max())
        per_row = rstd[..., 0] * (w.detach().double() * g.double()).norm(dim=-1) * d * (2 + d)
        err = float((dx.double() - rdx.double()).norm())
        assert err <= 1.01 * float(per_row.norm()) + 1e-3 * float(rdx.double().norm()) + 1e-30


@FUZZ
@given(
    data=st.data(),
    shape=shapes2d,
    name=st.sampled_from(sorted(ACTIVATIONS)),
    bits=st.sampled_from([1, 2, 3, 4]),
)
def test_activation_derivative_code_fuzz(data, shape, name, bits):
    dtype = data.draw(st.sampled_from(DTYPES))
    x = data.draw(tensors(shape, dtype=dtype, scale_exp=data.draw(st.integers(-30, 1))))
    g = data.draw(tensors(shape, dtype=dtype, scale_exp=0)).detach()
    act = ACTIVATIONS[name]
    out = ActivationFunction.apply(x, name, DerivativeCode(bits))
    torch.testing.assert_close(out, act.fn(x), rtol=0, atol=0)  # forward is the exact activation
    (dx,) = torch.autograd.grad(out, x, g)
    assert dx.dtype == dtype and dx.shape == x.shape and torch.isfinite(dx).all()
    # Element by element (so any layout mix-up shows): dx = g * levels[code(x)], code from the x-breakpoints.
    breaks, codes = code_segments(name, bits)
    levels, _ = derivative_levels(name, bits)
    seg = torch.bucketize(x.detach(), torch.tensor(breaks, dtype=dtype), out_int32=True)
    expected = g * torch.tensor(levels, dtype=dtype)[torch.tensor(codes)[seg.long()]]
    torch.testing.assert_close(dx, expected, rtol=0, atol=0)


@FUZZ
@given(data=st.data(), shape=shapes2d, name=st.sampled_from(sorted(ACTIVATIONS)), bits=st.sampled_from([4, 8]))
def test_activation_quantized_input_fuzz(data, shape, name, bits):
    x = data.draw(tensors(shape, dtype=torch.float32, scale_exp=data.draw(st.integers(-30, 2))))
    g = data.draw(tensors(shape, dtype=torch.float32, scale_exp=0)).detach()
    act = ACTIVATIONS[name]
    (dx,) = torch.autograd.grad(ActivationFunction.apply(x, name, Quantize(bits, 16)), x, g)
    (rdx,) = torch.autograd.grad(act.fn(x), x, g)
    _finite_where(dx, rdx)
    # |x_hat - x| <= one step: the range (widened by the bf16 rounding of the group offset) over 2**bits - 1.
    # f' is Lipschitz with a constant below 1 except ReLU's, a step function: there only elements farther than
    # a step from 0 keep their exact derivative.
    xd = x.detach()
    step = float(xd.max() - xd.min() + 2**-7 * xd.abs().max()) / (2**bits - 1)
    err = (dx - rdx).abs()
    if name == "relu":
        assert float(torch.where(xd.abs() > step, err, 0.0).max()) == 0.0
    else:
        assert float(err.max()) <= (step + 1e-6) * float(g.abs().max()) * 1.01 + 1e-6


@FUZZ
@given(
    data=st.data(),
    shape=shapes2d,
    p=st.floats(0.05, 0.95),
    mode=st.sampled_from(["packed", "replay"]),
)
def test_dropout_fuzz(data, shape, p, mode):
    x = data.draw(tensors(shape))
    g = data.draw(tensors(shape, dtype=x.dtype, scale_exp=0)).detach()
    seed = data.draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    out = DropoutFunction.apply(x, p, mode)
    torch.manual_seed(seed)
    ref = F.dropout(x, p, training=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the same draw as PyTorch's dropout
    (dx,) = torch.autograd.grad(out, x, g)
    (rdx,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(dx, rdx, rtol=0, atol=0)  # the mask is kept exactly (1 bit) or redrawn exactly


@FUZZ
@given(
    data=st.data(),
    dims=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 16)),
    masked=st.booleans(),
    dropout_p=st.sampled_from([0.0, 0.3]),
    scale_exp=st.integers(-30, 0),
)
def test_attention_fuzz(data, dims, masked, dropout_p, scale_exp):
    batch, heads, length, source, embed = dims
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    q = data.draw(tensors((batch, heads, length, embed), dtype=dtype, scale_exp=scale_exp))
    k = data.draw(tensors((batch, heads, source, embed), dtype=dtype, scale_exp=scale_exp))
    v = data.draw(tensors((batch, heads, source, embed), dtype=dtype, scale_exp=0))
    g = data.draw(tensors((batch, heads, length, embed), dtype=dtype, scale_exp=0)).detach()
    mask = None
    if masked:  # a boolean mask that keeps at least one key per query
        keep = torch.rand(batch, 1, length, source, generator=torch.Generator().manual_seed(source)) > 0.3
        mask = keep | (torch.arange(source) == 0)
    seed = data.draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    out = AttentionFunction.apply(q, k, v, mask, dropout_p, False, None, Quantize(8))
    torch.manual_seed(seed)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # forward is SDPA itself
    grads = _grads(out, g, q, k, v)
    refs = _grads(ref, g, q, k, v)
    for ours, theirs in zip(grads, refs, strict=True):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        _finite_where(ours, theirs)
    # dv = P^T g with P recomputed from 8-bit q, k; inputs of at most unit scale keep the logits O(1), so the
    # recomputed probabilities, and dv, stay within a few percent.
    dv, rdv = grads[2].double(), refs[2].double()
    tol = 0.05 if dtype == torch.float32 else 0.1
    assert float((dv - rdv).norm()) <= tol * float(rdv.norm()) + 1e-6 * float(g.double().norm())
