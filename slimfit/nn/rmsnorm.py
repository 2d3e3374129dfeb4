"""RMSNorm that keeps only the normalised input (compressed) and the per-row 1/rms for backward.

Three forms, which differ only in where the gain is applied and where the result is cast back to the input dtype
(they are bit-identical in fp32 but not in bf16/fp16); the statistics are always computed in fp32:

- ``"scale"`` (Llama, Qwen2, Mistral and most transformers ``*RMSNorm``): ``weight * n.to(x.dtype)``;
- ``"offset"`` (Gemma family): ``(n * (1 + weight.float())).to(x.dtype)``;
- ``"torch"`` (``torch.nn.RMSNorm`` / ``F.rms_norm``): ``(n * weight.float()).to(x.dtype)``;

with ``n = x.float() * rstd`` and ``rstd = rsqrt(mean(x.float()**2) + eps)`` over the normalised dims.
:func:`rms_norm_form` finds a module's form by running its own forward on a probe input.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from slimfit.nn._saving import decode, encode, load, save
from slimfit.nn.layernorm import _row_aligned
from slimfit.policy import Quantize, TopK

FORMS = ("scale", "offset", "torch")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """fp32 for the statistics, as the models compute them; float64 stays float64 (gradcheck)."""
    return t if t.dtype == torch.float64 else t.float()


def _gain(weight: torch.Tensor | None, form: str) -> torch.Tensor | None:
    """The factor (fp32, or float64) the normalised input is multiplied by (None: no gain)."""
    if weight is None:
        return None
    return _upcast(weight) + 1.0 if form == "offset" else _upcast(weight)


def _apply_gain(n: torch.Tensor, weight: torch.Tensor | None, form: str, dtype: torch.dtype) -> torch.Tensor:
    if weight is None:
        return n.to(dtype)
    if form == "scale":
        return weight * n.to(dtype)
    return (n * _gain(weight, form)).to(dtype)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, n_norm: int, eps: float, form: str
) -> torch.Tensor:
    """The forward of every form, op for op as transformers and torch write it."""
    x32 = _upcast(x)
    dims = tuple(range(x.dim() - n_norm, x.dim()))
    n = x32 * torch.rsqrt(x32.pow(2).mean(dims, keepdim=True) + eps)
    return _apply_gain(n, weight, form, x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """RMS normalisation over the last ``n_norm`` dims with a gain of the given ``form`` (see the module doc).

    Saved: ``n = x * rstd`` encoded by ``setting`` (needed by dx and dweight), ``rstd`` ``[..., 1]`` exact fp32
    (only for dx), and the weight (a parameter). Nothing is saved when nothing needs grad.
    """

    @staticmethod
    def forward(ctx, x, weight, n_norm: int, eps: float, form: str, setting: Quantize | TopK | None):
        need_x, need_w = ctx.needs_input_grad[:2]
        x32 = _upcast(x)
        dims = tuple(range(x.dim() - n_norm, x.dim()))
        rstd = torch.rsqrt(x32.pow(2).mean(dims, keepdim=True) + eps)
        n = x32 * rstd
        code = None
        if need_x or need_w:
            # Flatten the normalised dims so TopK works per row and groups align with rows.
            flat = n.to(x.dtype).reshape(*x.shape[: x.dim() - n_norm], -1)
            code = encode(flat, _row_aligned(setting, flat.shape[-1]))
        save(ctx, code, rstd if need_x else None, weight if need_x else None)
        ctx.x_shape, ctx.x_dtype, ctx.n_norm, ctx.form = x.shape, x.dtype, n_norm, form
        ctx.w_dtype = weight.dtype if weight is not None else None
        return _apply_gain(n, weight, form, x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        need_x, need_w = ctx.needs_input_grad[:2]
        n_saved, rstd, weight = load(ctx)
        dims = tuple(range(len(ctx.x_shape) - ctx.n_norm, len(ctx.x_shape)))
        g32 = _upcast(grad)
        n = _upcast(decode(n_saved).reshape(ctx.x_shape)) if n_saved is not None else None
        dx = dw = None
        if need_x:
            gain = _gain(weight, ctx.form)
            g = g32 * gain if gain is not None else g32
            mean_gn = (g * n).sum(dims, keepdim=True) / math.prod(ctx.x_shape[-ctx.n_norm :])
            dx = ((g - n * mean_gn) * rstd).to(ctx.x_dtype)
        if need_w:
            lead = tuple(range(grad.dim() - ctx.n_norm))
            dw = (g32 * n).sum(lead).to(ctx.w_dtype)
        return dx, dw, None, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    n_norm: int,
    eps: float,
    form: str,
    setting: Quantize | TopK | None,
) -> torch.Tensor:
    """RMSNorm of ``form`` whose saved activations follow ``setting`` (the plain PyTorch ops when None)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    if setting is None or not torch.is_grad_enabled():
        return rms_norm_reference(x, weight, n_norm, eps, form)
    return RMSNormFunction.apply(x, weight, n_norm, eps, form, setting)


def rms_norm_eps(module: nn.Module) -> float | None:
    """``variance_epsilon`` (Llama style) or ``eps`` (Gemma, torch) of an RMSNorm module."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else None


def rms_norm_form(module: nn.Module) -> str | None:
    """The form (a key of :data:`FORMS`) a model-specific RMSNorm module computes, or None if it is none of them.

    Candidates are classes named ``*RMSNorm`` with a 1-D ``weight``, an ``eps``/``variance_epsilon`` and a
    forward taking one tensor. Their forward is run on a probe (a random gain in place of the real weight, one
    row at unit scale and one at ``sqrt(eps)``, so a wrong eps shows) and compared with each form: the one it
    matches bit for bit, else the closest within a dtype-sized tolerance. Judging by what the forward computes,
    rather than by the class or its source, covers families not named anywhere in slimfit and leaves a norm that
    merely looks like one (centred, gated, input-scaled) uncompressed.
    """
    weight = getattr(module, "weight", None)
    eps = rms_norm_eps(module)
    if not (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1):
        return None
    if eps is None or weight.device.type == "meta" or not _takes_one_tensor(type(module).forward):
        return None
    g = torch.Generator().manual_seed(0)
    size = weight.shape[0]
    scale = torch.tensor([[1.0], [math.sqrt(eps)]])
    x = (torch.randn(2, size, generator=g) * scale).to(weight.device, weight.dtype).unsqueeze(0)
    w = (torch.randn(size, generator=g) + 1.0).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            out = torch.func.functional_call(module, {"weight": w}, (x,))
    except Exception:  # a forward that needs more than one tensor, or other shapes: not one of ours
        return None
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None
    with torch.no_grad():
        candidates = {form: rms_norm_reference(x, w, 1, eps, form) for form in FORMS}
    exact = [form for form, ref in candidates.items() if ref.dtype == out.dtype and torch.equal(ref, out)]
    if exact:
        return exact[0]
    tol = 1e-4 if out.dtype in (torch.float32, torch.float64) else 2e-2
    errors = {
        form: float((ref.float() - out.float()).abs().max() / ref.float().abs().max())
        for form, ref in candidates.items()
    }
    best = min(errors, key=errors.get)
    return best if errors[best] <= tol else None


def _takes_one_tensor(forward) -> bool:
    """A patched forward takes exactly one argument; a forward with optional extras (a gate) could be given more."""
    params = list(inspect.signature(forward).parameters.values())[1:]
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)
