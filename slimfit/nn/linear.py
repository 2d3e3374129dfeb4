"""Linear layer that keeps its input compressed for the weight gradient, shared between sibling Linears."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from slimfit.nn._saving import decode, encode, load, save
from slimfit.policy import Quantize

# Attribute set on an input tensor to share its code between Linears that read it (Q, K, V): the code lives
# exactly as long as the tensor object, and the graph holds one storage however many Linears save it.
_SHARED_CODE_ATTR = "_slimfit_linear_code"


def shared_code(x: torch.Tensor, setting: Quantize | None, columns: tuple[int, int] | None = None):
    """``encode(x[..., columns], setting)`` (all of ``x`` for None), computed once per (tensor, version, setting,
    columns) and reused afterwards."""

    def part() -> torch.Tensor:
        return x if columns is None else x[..., columns[0] : columns[1]].contiguous()

    if setting is None:
        return x if columns is None else x[..., columns[0] : columns[1]]
    if torch.compiler.is_compiling():
        # torch.compile cannot trace the tensor-attribute cache: compiled graphs encode once per Linear.
        return encode(part(), setting)
    cached = getattr(x, _SHARED_CODE_ATTR, None)
    if cached is None or cached[0] != x._version:
        cached = (x._version, {})
        setattr(x, _SHARED_CODE_ATTR, cached)
    key = (setting, columns)
    if key not in cached[1]:
        cached[1][key] = encode(part(), setting)
    return cached[1][key]


class LinearFunction(torch.autograd.Function):
    """``y = x @ W^T + b`` saving ``W`` (a parameter, free) for dx and the encoded ``x`` only when W trains.

    Shapes: x ``[..., in]``, weight ``[out, in]``, bias ``[out]`` or None, y ``[..., out]``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, setting: Quantize | None):
        need_x, need_w, _ = ctx.needs_input_grad[:3]
        save(ctx, weight if need_x else None, shared_code(x, setting) if need_w else None)
        ctx.x_dtype = x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        weight, x_saved = load(ctx)
        dx = dw = db = None
        if need_x:
            dx = (grad @ weight.to(grad.dtype)).to(ctx.x_dtype)
        if need_w:
            x = decode(x_saved)
            g2 = grad.reshape(-1, grad.shape[-1])
            dw = g2.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)
        if need_b:
            db = grad.reshape(-1, grad.shape[-1]).sum(0)
        return dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, setting: Quantize | None) -> torch.Tensor:
    """``F.linear`` that saves ``x`` as ``setting`` says when ``weight`` trains (exact ``F.linear`` otherwise)."""
    if setting is None or not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)
    return LinearFunction.apply(x, weight, bias, setting)
