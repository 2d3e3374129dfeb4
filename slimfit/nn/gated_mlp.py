"""The gated product of Llama-style MLPs, ``act(gate) * up``, keeping 8-bit gate and up instead of three fp32 tensors.

``down_proj(act(gate_proj(x)) * up_proj(x))`` (LlamaMLP, Qwen2MLP, MistralMLP, GemmaMLP, ...): PyTorch keeps
``gate`` (for the activation's derivative), ``act(gate)`` and ``up`` (for the product), 12 bytes per element in fp32.
Backward needs ``d_gate = g * up * act'(gate)`` and ``d_up = g * act(gate)``, both functions of ``gate`` and
``up`` alone, so :class:`GatedProductFunction` keeps those two encoded (2 bytes per element at 8 bits) and
recomputes ``act`` and ``act'`` from the decoded gate. A derivative code (as for plain activations) would not do:
``d_up`` needs ``act(gate)`` itself.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from slimfit.nn._saving import decode, encode, load, save
from slimfit.nn.activation import ACTIVATIONS
from slimfit.nn.rmsnorm import _takes_one_tensor
from slimfit.policy import Quantize


class GatedProductFunction(torch.autograd.Function):
    """``y = act(gate) * up`` for ``act`` in :data:`slimfit.nn.activation.ACTIVATIONS`; gate and up same shape.

    Saved: ``gate`` encoded by ``setting`` when either input needs grad, ``up`` encoded only when ``gate`` does.
    """

    @staticmethod
    def forward(ctx, gate, up, name: str, setting: Quantize | None):
        need_gate, need_up = ctx.needs_input_grad[:2]
        save(
            ctx,
            encode(gate, setting) if need_gate or need_up else None,
            encode(up, setting) if need_gate else None,
        )
        ctx.act_name = name
        ctx.dtypes = (gate.dtype, up.dtype)
        return ACTIVATIONS[name].fn(gate) * up

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        need_gate, need_up = ctx.needs_input_grad[:2]
        gate_saved, up_saved = load(ctx)
        act = ACTIVATIONS[ctx.act_name]
        # fp32 (float64 stays) so a bf16 gate's derivative is not rounded twice.
        work = torch.promote_types(grad.dtype, torch.float32)
        g = grad.to(work)
        gate = decode(gate_saved).to(work) if gate_saved is not None else None
        d_gate = (g * decode(up_saved).to(work) * act.grad(gate)).to(ctx.dtypes[0]) if need_gate else None
        d_up = (g * act.fn(gate)).to(ctx.dtypes[1]) if need_up else None
        return d_gate, d_up, None, None


def gated_product(gate: torch.Tensor, up: torch.Tensor, name: str, setting: Quantize | None) -> torch.Tensor:
    """``act(gate) * up`` saving ``gate`` and ``up`` as ``setting`` says (plain PyTorch ops when None)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"name must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    if setting is None or not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return ACTIVATIONS[name].fn(gate) * up
    return GatedProductFunction.apply(gate, up, name, setting)


def is_gated_mlp(module: nn.Module) -> bool:
    """``gate_proj``, ``up_proj`` and ``down_proj`` Linears, an ``act_fn`` module, a one-tensor forward, and that
    forward computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` on a probe input.

    The probe (a forward on two random rows, compared with the formula up to rounding) keeps a module that has the
    same parts but combines them differently (an MoE expert block, a residual inside) unpatched.
    """
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    if not (all(isinstance(p, nn.Linear) for p in parts) and isinstance(act, nn.Module)):
        return False
    if not _takes_one_tensor(type(module).forward):
        return False
    gate_proj, up_proj, down_proj = parts
    weight = gate_proj.weight
    if weight.device.type == "meta":
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, gate_proj.in_features, generator=g).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            out = type(module).forward(module, x)
            ref = down_proj(act(gate_proj(x)) * up_proj(x))
    except Exception:  # not the shapes or the single input we assumed
        return False
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return False
    tol = 1e-4 if out.dtype in (torch.float32, torch.float64) else 2e-2
    return bool((out - ref).abs().max() <= tol * ref.abs().max().clamp_min(1e-30))
