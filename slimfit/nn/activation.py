"""Pointwise activations that keep a few-bit code of their derivative (or a quantized input) for backward.

Few-Bit Backward (Novikov et al., ICML 2023): backward of ``y = f(x)`` only needs ``f'(x)``, so forward stores
``f'(x)`` rounded to one of ``2**bits`` levels instead of ``x``. Levels and decision thresholds are fitted once
per activation by Lloyd-Max on the distribution of ``f'(x)`` for ``x ~ N(0, 1)``; each code is stored as
``bits`` bit-planes of 1 bit per element (:func:`slimfit.ops.pack_bits`). The default is 4 bits, an eighth of
fp32: on BERT-base 3 bits gave trainable-gradient cosines down to 0.988 against exact, 4 bits 0.993.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from slimfit import ops
from slimfit.codecs import PackedBits
from slimfit.memory import note_decoded
from slimfit.nn._saving import decode, encode, load, save
from slimfit.policy import DerivativeCode, Quantize

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x * pdf


def _gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    inner = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


def _silu_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _sigmoid_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 - s)


def _tanh_grad(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.tanh(x) ** 2


@dataclass(frozen=True)
class Activation:
    """A pointwise activation: its forward and its derivative, both elementwise on tensors."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    grad: Callable[[torch.Tensor], torch.Tensor]


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("gelu", F.gelu, _gelu_grad),
        Activation("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), _gelu_tanh_grad),
        Activation("relu", F.relu, lambda x: (x > 0).to(x.dtype)),
        Activation("silu", F.silu, _silu_grad),
        Activation("sigmoid", torch.sigmoid, _sigmoid_grad),
        Activation("tanh", torch.tanh, _tanh_grad),
    )
}


@cache
def derivative_levels(name: str, bits: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(levels, thresholds)`` of the ``bits``-bit Lloyd-Max quantizer of ``f'(x)``, ``x ~ N(0, 1)``.

    ``levels`` are ``2**bits`` increasing derivative values; ``thresholds`` the ``2**bits - 1`` midpoints
    between them (a derivative below ``thresholds[i]`` gets a code <= i).
    """
    act = ACTIVATIONS[name]
    x = torch.linspace(-8.0, 8.0, 16001, dtype=torch.float64)
    weight = torch.exp(-0.5 * x * x)
    d = act.grad(x)
    n = 1 << bits
    levels = torch.quantile(d, (torch.arange(n, dtype=torch.float64) + 0.5) / n)
    for _ in range(200):
        thresholds = (levels[1:] + levels[:-1]) / 2
        code = torch.bucketize(d, thresholds)
        mass = torch.bincount(code, weight, minlength=n)
        total = torch.bincount(code, weight * d, minlength=n)
        new = torch.where(mass > 0, total / mass.clamp_min(1e-300), levels)
        if torch.allclose(new, levels, rtol=0, atol=1e-12):
            break
        levels = new
    thresholds = (levels[1:] + levels[:-1]) / 2
    return tuple(levels.tolist()), tuple(thresholds.tolist())


@cache
def code_segments(name: str, bits: int) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """The derivative code as a step function of ``x``: ``(breaks, codes)``.

    ``x <= breaks[0]`` gets ``codes[0]``, ``breaks[i-1] < x <= breaks[i]`` gets ``codes[i]``, and
    ``x > breaks[-1]`` gets ``codes[-1]``. Looking ``x`` up here is equivalent to thresholding ``f'(x)`` but
    needs neither ``f'`` nor a float temporary in forward. Breaks are found on a grid over [-8, 8] (the
    derivatives in :data:`ACTIVATIONS` are monotone beyond it) and refined by bisection.
    """
    act = ACTIVATIONS[name]
    _, thresholds = derivative_levels(name, bits)
    t = torch.tensor(thresholds, dtype=torch.float64)

    def code_of(x: torch.Tensor) -> torch.Tensor:
        return (act.grad(x).unsqueeze(-1) > t).sum(-1)

    grid = torch.arange(-8000, 8001, dtype=torch.float64) / 1000  # contains 0.0 exactly (ReLU's break)
    codes = code_of(grid)
    change = (codes[1:] != codes[:-1]).nonzero().flatten()
    lo, hi = grid[change].clone(), grid[change + 1].clone()
    left = codes[change]
    for _ in range(60):
        mid = (lo + hi) / 2
        same = code_of(mid) == left
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    return tuple(lo.tolist()), (int(codes[0]), *codes[change + 1].tolist())


@torch.compiler.assume_constant_result
def _tables(name: str, bits: int) -> tuple[tuple[float, ...], tuple[int, ...], tuple[float, ...]]:
    """``(breaks, codes, levels)`` of the derivative code. torch.compile calls this eagerly and bakes the result
    into the graph as constants (tracing the Lloyd-Max fit would break the graph at every call)."""
    breaks, codes = code_segments(name, bits)
    return breaks, codes, derivative_levels(name, bits)[0]


class ActivationFunction(torch.autograd.Function):
    """``y = f(x)`` for ``f`` in :data:`ACTIVATIONS`, saving a derivative code or a quantized ``x``."""

    @staticmethod
    def forward(ctx, x, name: str, setting: DerivativeCode | Quantize | None):
        act = ACTIVATIONS[name]
        ctx.act_name = name
        ctx.setting = setting
        if not ctx.needs_input_grad[0]:
            save(ctx)
        elif isinstance(setting, DerivativeCode):
            breaks, codes, _ = _tables(name, setting.bits)
            segment = torch.bucketize(x.detach(), torch.tensor(breaks, dtype=x.dtype, device=x.device), out_int32=True)
            code = torch.tensor(codes, dtype=torch.uint8, device=x.device)[segment]
            save(ctx, *(ops.pack_bits((code & (1 << b)).bool()) for b in range(setting.bits)))
        else:
            save(ctx, encode(x, setting))
        return act.fn(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved = load(ctx)
        if isinstance(ctx.setting, DerivativeCode):
            _, _, levels = _tables(ctx.act_name, ctx.setting.bits)
            return _times_coded_derivative(grad, saved, torch.tensor(levels, dtype=grad.dtype, device=grad.device))
        d = ACTIVATIONS[ctx.act_name].grad(decode(saved[0]).to(grad.dtype))
        return grad * d, None, None


DECODE_CHUNK = 1 << 18
"""Elements of a derivative code decoded at a time in backward (a multiple of 8: whole packed bytes). Decoded,
an element takes 9 bytes (uint8 code, int32 index, float32 derivative): 2.25 MiB a chunk, where a whole MiniLM
GELU of 16 x 128 tokens would take 27 MiB."""


def _times_coded_derivative(grad: torch.Tensor, planes: tuple[PackedBits, ...], levels: torch.Tensor) -> torch.Tensor:
    """``grad * levels[code]``, the code's bit ``b`` in ``planes[b]``, decoded :data:`DECODE_CHUNK` elements at a
    time into the result."""
    flat = grad.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), DECODE_CHUNK):
        end = min(start + DECODE_CHUNK, flat.numel())
        code = note_decoded(torch.zeros(end - start, dtype=torch.uint8, device=grad.device), DECODE_CHUNK)
        for b, plane in enumerate(planes):
            chunk = PackedBits(plane.bits[start // 8 : (end + 7) // 8], (end - start,))
            code |= ops.unpack_bits(chunk).to(torch.uint8) << b
        index = note_decoded(code.int(), DECODE_CHUNK)  # int32 indices: half the bytes of int64
        derivative = note_decoded(levels[index], DECODE_CHUNK)
        torch.mul(flat[start:end], derivative, out=out[start:end])
        del code, index, derivative  # before the next chunk's are made
    return out.view(grad.shape), None, None


def activation(x: torch.Tensor, name: str, setting: DerivativeCode | Quantize | None) -> torch.Tensor:
    """Activation ``name`` (a key of :data:`ACTIVATIONS`) saving per ``setting`` (exact PyTorch op when None)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"name must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    if setting is None or not (torch.is_grad_enabled() and x.requires_grad):
        return ACTIVATIONS[name].fn(x)
    return ActivationFunction.apply(x, name, setting)
