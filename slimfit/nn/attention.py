"""Scaled-dot-product attention that keeps compressed q, k, v and recomputes the rest in backward.

Like fused SDPA kernels, no L x L matrix is kept between forward and backward: backward dequantizes q, k, v,
reruns ``F.scaled_dot_product_attention`` under autograd and differentiates that (one extra attention forward
per backward). Grouped-query attention (fewer key/value heads than query heads) keeps k and v at their own
width: the heads are shared inside SDPA (``enable_gqa``), never expanded in what is saved, and autograd sums the
gradients of the query heads sharing a key/value head back to that width. Attention-probability dropout is
replayed from the RNG state saved in forward rather than moved to V (the original SlimFit's choice), so the
dropout pattern, and therefore the gradient, is the one forward used; with compression off the result equals
PyTorch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from slimfit.nn._rng import replay, rng_state
from slimfit.nn._saving import decode, encode, load, save
from slimfit.policy import DEFAULT_POLICY, Quantize


def _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


class AttentionFunction(torch.autograd.Function):
    """``softmax(q k^T * scale + mask) v`` with dropout on the probabilities.

    Shapes as in ``F.scaled_dot_product_attention``: q ``[..., L, E]``, k ``[..., S, E]``, v ``[..., S, Ev]``,
    attn_mask broadcastable to ``[..., L, S]`` (bool or additive float) or None; with ``enable_gqa`` k and v may
    have fewer heads (dim -3) than q, a divisor of q's. Saved: q, k, v encoded by
    ``setting``, the mask as given (models share one mask across layers, so it is stored once), and the RNG
    state when ``dropout_p > 0``.
    """

    @staticmethod
    def forward(
        ctx, q, k, v, attn_mask, dropout_p: float, is_causal: bool, scale: float | None, setting, enable_gqa=False
    ):
        state = rng_state(q.device) if dropout_p > 0 else None
        if dropout_p > 0:
            # Run exactly the call backward will replay (same grad mode and requires_grad flags), so SDPA picks
            # the same kernel and consumes the RNG the same way; the graph built here is dropped at once.
            with torch.enable_grad():
                args = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), ctx.needs_input_grad[:3], strict=True)]
                out = _sdpa(*args, attn_mask, dropout_p, is_causal, scale, enable_gqa).detach()
        else:
            out = _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        save(ctx, encode(q, setting), encode(k, setting), encode(v, setting), attn_mask, state)
        ctx.args = (dropout_p, is_causal, scale, enable_gqa)
        # Backward runs outside autocast; replaying forward's keeps SDPA's casts (e.g. fp32 q and k after rotary
        # embeddings with a bf16 v) the same in the recompute.
        device = q.device.type
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q_saved, k_saved, v_saved, attn_mask, state = load(ctx)
        dropout_p, is_causal, scale, enable_gqa = ctx.args
        needs = ctx.needs_input_grad[:4]
        saved_qkv = (q_saved, k_saved, v_saved)
        inputs = [decode(s).detach().requires_grad_(n) for s, n in zip(saved_qkv, needs[:3], strict=True)]
        mask = attn_mask.detach().requires_grad_(needs[3]) if attn_mask is not None else None
        autocast = torch.autocast(grad.device.type, dtype=ctx.autocast, enabled=ctx.autocast is not None)
        with torch.enable_grad(), autocast:
            if state is not None:
                with replay(grad.device, state):
                    out = _sdpa(*inputs, mask, dropout_p, is_causal, scale, enable_gqa)
            else:
                out = _sdpa(*inputs, mask, dropout_p, is_causal, scale, enable_gqa)
            wrt = [t for t, n in zip((*inputs, mask), needs, strict=True) if n]
            grads = iter(torch.autograd.grad(out, wrt, grad))
        return (*(next(grads) if n else None for n in needs), None, None, None, None, None)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    setting: Quantize | None = DEFAULT_POLICY.attention,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` that saves q, k, v as ``setting`` says (k and v at their own
    head count under ``enable_gqa``).

    Falls back to the plain PyTorch call when no input requires grad, grad mode is off or ``setting`` is None.
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, attn_mask))
    if setting is None or not needs_grad:
        return _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return AttentionFunction.apply(q, k, v, attn_mask, dropout_p, is_causal, scale, setting, enable_gqa)
