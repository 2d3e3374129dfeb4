"""Language-model head and cross-entropy in one, without materialising the logits: :func:`linear_cross_entropy`.

A causal LM's head turns N hidden states into N x V logits (V: the vocabulary, 32k-256k); autograd then keeps the
logits' log-softmax for backward, N x V floats, usually more than the rest of the model's activations. Here the
tokens are processed ``chunk_size`` at a time, in forward and again in backward: forward keeps only each token's
log-sum-exp, backward recomputes each chunk's logits from the hidden states and turns them into
``softmax - onehot`` at once (the idea of Liger-Kernel's fused linear cross-entropy, written here in PyTorch ops).
So what is kept for backward is the hidden states (N x h, or an 8-bit code of them when only the head's weight
needs a gradient) plus 20 bytes per token, and the largest temporary is ``chunk_size`` x V, whatever N is.
Tokens whose label is ``ignore_index`` cost nothing: only the others are chunked.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from slimfit.nn._saving import decode, encode, load, save
from slimfit.policy import Quantize

__all__ = ["LinearCrossEntropyFunction", "linear_cross_entropy"]


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Like transformers' causal-LM loss: the head runs in the model's dtype, the softmax in at least float32.
    logits = F.linear(hidden, weight, bias)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed ``cross_entropy(hidden @ weight.T + bias, labels)`` over the tokens whose label is not ignored.

    hidden ``[N, h]``, weight ``[V, h]``, bias ``[V]`` or None, labels ``[N]`` (int64). Returns a 0-d tensor of
    float32 (float64 for float64 inputs). Saved: the hidden states (exact when they need a gradient, else encoded
    by ``setting``), the weight and bias, and per kept token its row, label and log-sum-exp.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, chunk_size: int, setting):
        rows = (labels != ignore_index).nonzero().squeeze(1)
        targets = labels.index_select(0, rows)
        logsumexp = []
        total = torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            logits = _logits(hidden.index_select(0, rows[start : start + chunk_size]), weight, bias)
            lse = torch.logsumexp(logits, dim=1)
            total += (lse - logits.gather(1, targets[start : start + chunk_size, None]).squeeze(1)).sum()
            logsumexp.append(lse)
        lse = torch.cat(logsumexp) if logsumexp else total.new_empty(0)
        saved = hidden if ctx.needs_input_grad[0] else encode(hidden, setting)
        save(ctx, saved, weight, bias, rows, targets, lse)
        device = hidden.device.type
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved, weight, bias, rows, targets, lse = load(ctx)
        hidden = decode(saved)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # Accumulate the weight gradient over chunks in at least float32, as one matmul over all tokens would.
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if need_bias else None
        # Recompute under the autocast forward ran under, so the logits match the saved log-sum-exp.
        device = hidden.device.type
        with torch.autocast(device, dtype=ctx.autocast, enabled=ctx.autocast is not None):
            for start in range(0, rows.numel(), ctx.chunk_size):
                index = rows[start : start + ctx.chunk_size]
                h = hidden.index_select(0, index)
                probs = _logits(h, weight, bias).sub_(lse[start : start + ctx.chunk_size, None]).exp_()
                target = targets[start : start + ctx.chunk_size, None]
                probs.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=probs.dtype, device=probs.device))
                dlogits = probs.mul_(grad).to(weight.dtype)  # d loss / d logits = grad * (softmax - onehot)
                if need_hidden:
                    grad_hidden.index_copy_(0, index, (dlogits @ weight).to(grad_hidden.dtype))
                if need_weight:
                    grad_weight += (dlogits.t() @ h.to(dlogits.dtype)).to(accumulate)
                if need_bias:
                    grad_bias += dlogits.sum(0).to(accumulate)
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum"] = "mean",
    chunk_size: int = 1024,
    setting: Quantize | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=..., reduction=...)`` computed
    ``chunk_size`` tokens at a time, in forward and backward, without keeping the logits.

    Args:
        hidden: ``[..., h]`` hidden states (the head's input).
        weight: ``[V, h]`` head weight (may be tied to the input embedding: its gradient accumulates as usual).
        bias: ``[V]`` or None.
        labels: ``[...]`` class indices (same leading shape as ``hidden``); ``ignore_index`` marks tokens left out.
        reduction: ``"mean"`` over the tokens not ignored (NaN when all are, like PyTorch) or ``"sum"``.
        chunk_size: tokens per chunk; the largest temporary is ``chunk_size x V`` logits (float32).
        setting: how the hidden states are kept when only ``weight``/``bias`` need a gradient (None: exact).
            When ``hidden`` needs a gradient it is always kept exact: backward recomputes the softmax from it.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels must have the leading shape of hidden: hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    total = LinearCrossEntropyFunction.apply(hidden, weight, bias, labels, ignore_index, chunk_size, setting)
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum()
