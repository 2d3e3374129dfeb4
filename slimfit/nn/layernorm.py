"""LayerNorm that keeps only the normalised output (compressed) and the per-row 1/std for backward."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from slimfit.nn._saving import decode, encode, load, save
from slimfit.policy import Quantize, TopK


def _row_aligned(setting: Quantize | TopK | None, row: int) -> Quantize | TopK | None:
    """``setting`` with quantization groups that never straddle two rows.

    Rows have very different 1/std, so a group shared by two rows would let the error of one be amplified by
    the other's 1/std in dx (an all-constant row, e.g. a zero-initialised token, has 1/std ~ 1/sqrt(eps)).
    """
    if isinstance(setting, Quantize) and row % setting.group_size != 0:
        return replace(setting, group_size=row)
    return setting


class LayerNormFunction(torch.autograd.Function):
    """Layer normalisation over the last ``len(normalized_shape)`` dims.

    Saved: ``x_hat = (x - mean) * rstd`` encoded by ``setting`` (needed by dx and dweight), ``rstd``
    ``[..., 1]`` exact (only for dx), and the weight (a parameter). Nothing is saved when nothing needs grad.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape: tuple[int, ...], eps: float, setting: Quantize | TopK | None):
        need_x, need_w, _ = ctx.needs_input_grad[:3]
        out, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        x_hat = None
        if need_x or need_w:
            dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
            # Flatten the normalised dims so TopK works per row; the code is reshaped back in backward.
            x_hat = ((x - mean) * rstd).reshape(*x.shape[: x.dim() - len(dims)], -1)
        save(
            ctx,
            encode(x_hat, _row_aligned(setting, x_hat.shape[-1])) if x_hat is not None else None,
            rstd if need_x else None,
            weight if need_x else None,
        )
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.n_norm = len(normalized_shape)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_hat_saved, rstd, weight = load(ctx)
        dims = tuple(range(len(ctx.x_shape) - ctx.n_norm, len(ctx.x_shape)))
        lead = tuple(range(len(ctx.x_shape) - ctx.n_norm))
        g32 = grad.float()
        x_hat = decode(x_hat_saved).reshape(ctx.x_shape).float() if x_hat_saved is not None else None
        dx = dw = db = None
        if need_x:
            g = g32 * weight.float() if weight is not None else g32
            n = math.prod(ctx.x_shape[-ctx.n_norm :])
            mean_g = g.sum(dims, keepdim=True) / n
            mean_gx = (g * x_hat).sum(dims, keepdim=True) / n
            dx = ((g - mean_g - x_hat * mean_gx) * rstd.float()).to(ctx.x_dtype)
        if need_w:
            dw = (g32 * x_hat).sum(lead).to(grad.dtype)
        if need_b:
            db = g32.sum(lead).to(grad.dtype)
        return dx, dw, db, None, None, None


def layer_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    setting: Quantize | TopK | None,
) -> torch.Tensor:
    """``F.layer_norm`` whose saved activations follow ``setting`` (exact ``F.layer_norm`` when None)."""
    if setting is None or not torch.is_grad_enabled():
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    return LayerNormFunction.apply(x, weight, bias, tuple(normalized_shape), eps, setting)
