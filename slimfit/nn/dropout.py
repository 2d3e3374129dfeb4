"""Dropout whose mask is kept at 1 bit per element, or not kept at all (RNG replay)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from slimfit import ops
from slimfit.memory import note_decoded
from slimfit.nn._rng import replay, rng_state
from slimfit.nn._saving import load, save


def _keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    # Same draw as PyTorch's unfused dropout (a bernoulli_ on a tensor like x), so CPU results match nn.Dropout.
    return torch.empty_like(x).bernoulli_(1.0 - p).bool()


class DropoutFunction(torch.autograd.Function):
    """Inverted dropout ``y = x * mask / (1 - p)``.

    ``mode="packed"`` saves the mask bit-packed (``ceil(numel / 8)`` bytes); ``mode="replay"`` saves the RNG
    state (CPU 5056 bytes, CUDA 16 bytes) and draws the mask again in backward.
    """

    @staticmethod
    def forward(ctx, x, p: float, mode: Literal["packed", "replay"]):
        state = rng_state(x.device) if mode == "replay" else None
        mask = _keep_mask(x, p)
        if mode == "packed":
            save(ctx, ops.pack_bits(mask))
        else:
            save(ctx, state)
        # The mask's strides too: a permuted x draws its mask in x's memory order, and replay must match it.
        ctx.p, ctx.mode, ctx.shape, ctx.stride, ctx.dtype = p, mode, x.shape, mask.stride(), x.dtype
        return x * mask.to(x.dtype).div_(1.0 - p)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (saved,) = load(ctx)
        if ctx.mode == "packed":
            mask = note_decoded(ops.unpack_bits(saved))
        else:
            with replay(grad.device, saved):
                like = torch.empty_strided(ctx.shape, ctx.stride, dtype=ctx.dtype, device=grad.device)
                mask = _keep_mask(like, ctx.p)
        return grad * mask.to(grad.dtype).div_(1.0 - ctx.p), None, None


def dropout(x: torch.Tensor, p: float, training: bool, mode: Literal["packed", "replay"] | None) -> torch.Tensor:
    """``F.dropout`` (not in place) keeping its mask as ``mode`` says (exact ``F.dropout`` when None)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    if mode is None or not training or p == 0.0 or p == 1.0 or not (torch.is_grad_enabled() and x.requires_grad):
        return F.dropout(x, p, training)
    return DropoutFunction.apply(x, p, mode)
