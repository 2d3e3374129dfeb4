"""Drop-in modules: subclasses of the torch (or model-library) classes whose forward saves compressed tensors.

A patched class subclasses the original, so ``isinstance`` checks, parameters, buffers, hooks and state-dict
keys are unchanged; :func:`slimfit.models.patch` switches an instance's ``__class__`` to it and back. When a
site's setting is None, or nothing at the site needs grad, the original ``forward`` runs unchanged. Each
module reads its settings from ``self.slimfit_policy`` (a :class:`slimfit.policy.CompressionPolicy`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimfit.nn.activation import ACTIVATIONS, activation
from slimfit.nn.column_blocks import ColumnBlockLinear, column_block_linear
from slimfit.nn.dropout import dropout
from slimfit.nn.gated_mlp import gated_product
from slimfit.nn.layernorm import layer_norm
from slimfit.nn.linear import linear
from slimfit.nn.rmsnorm import FORMS, rms_norm, rms_norm_eps
from slimfit.policy import DEFAULT_POLICY


def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias, self.slimfit_policy.linear_input)


def _column_blocks_forward(self, x: torch.Tensor) -> torch.Tensor:
    return column_block_linear(x, tuple(self.weight_blocks), self.bounds, self.bias, self.slimfit_policy.linear_input)


def _layer_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    policy = self.slimfit_policy
    trainable = self.weight is not None and self.weight.requires_grad
    setting = policy.layernorm_trainable if trainable else policy.layernorm_frozen
    return layer_norm(x, tuple(self.normalized_shape), self.weight, self.bias, self.eps, setting)


def _rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    policy = self.slimfit_policy
    trainable = self.weight is not None and self.weight.requires_grad
    setting = policy.layernorm_trainable if trainable else policy.layernorm_frozen
    if setting is None or not torch.is_grad_enabled():
        return self.slimfit_base.forward(self, x)
    eps = rms_norm_eps(self)
    eps = torch.finfo(x.dtype).eps if eps is None else eps  # nn.RMSNorm(eps=None), as F.rms_norm does
    n_norm = len(self.normalized_shape) if isinstance(self, nn.RMSNorm) else 1
    return rms_norm(x, self.weight, n_norm, eps, self.slimfit_rms_form, setting)


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``Conv1D`` (``x @ W + b``, W ``[in, out]``) is a Linear with the weight transposed."""
    setting = self.slimfit_policy.linear_input
    if setting is None or not (torch.is_grad_enabled() and self.weight.requires_grad):
        return self.slimfit_base.forward(self, x)
    return linear(x, self.weight.t(), self.bias, setting)


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    setting = self.slimfit_policy.gated_mlp
    if setting is None or not torch.is_grad_enabled():
        return self.slimfit_base.forward(self, x)
    # act_fn is itself patched (patch() only takes MLPs whose activation it supports), so its class names it.
    name = type(self.act_fn).slimfit_activation_of(self.act_fn)
    return self.down_proj(gated_product(self.gate_proj(x), self.up_proj(x), name, setting))


def _dropout_forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.inplace:  # the caller relies on x being overwritten; keep PyTorch's semantics
        return self.slimfit_base.forward(self, x)
    return dropout(x, self.p, self.training, self.slimfit_policy.dropout)


def _activation_forward(self, x: torch.Tensor) -> torch.Tensor:
    setting = self.slimfit_policy.activation
    if setting is None or not (torch.is_grad_enabled() and x.requires_grad):
        return self.slimfit_base.forward(self, x)
    return activation(x, self.slimfit_activation_of(self), setting)


_FORWARDS: dict[str, Callable] = {
    "linear": _linear_forward,
    "column_blocks": _column_blocks_forward,
    "layer_norm": _layer_norm_forward,
    "rms_norm": _rms_norm_forward,
    "conv1d": _conv1d_forward,
    "gated_mlp": _gated_mlp_forward,
    "dropout": _dropout_forward,
    "activation": _activation_forward,
}
_PATCHED: dict[type, type] = {}


def patched_class(
    base: type[nn.Module],
    kind: str,
    activation_of: Callable[[nn.Module], str] | None = None,
    rms_form: str | None = None,
) -> type:
    """The compressed subclass of ``base`` (cached per base class).

    kind: "linear" (nn.Linear-like: weight, bias), "column_blocks" (:class:`ColumnBlockLinear`), "layer_norm"
    (normalized_shape, weight, bias, eps),
    "rms_norm" (weight, ``eps`` or ``variance_epsilon``; ``rms_form`` is its form, a key of
    :data:`slimfit.nn.rmsnorm.FORMS`), "conv1d" (transformers' ``Conv1D``: weight ``[in, out]``, bias),
    "gated_mlp" (gate_proj, up_proj, down_proj Linears and a patched act_fn: see
    :func:`slimfit.nn.gated_mlp.is_gated_mlp`), "dropout" (p, inplace) or "activation" (pointwise;
    ``activation_of(module)`` names it, a key of :data:`slimfit.nn.activation.ACTIVATIONS`).
    """
    if base in _PATCHED:
        return _PATCHED[base]
    if kind not in _FORWARDS:
        raise ValueError(f"kind must be one of {sorted(_FORWARDS)}, got {kind!r}")
    if (kind == "activation") != (activation_of is not None):
        raise ValueError("activation_of must be given exactly when kind is 'activation'")
    if (kind == "rms_norm") != (rms_form is not None) or rms_form not in (None, *FORMS):
        raise ValueError(f"rms_form must be one of {list(FORMS)} exactly when kind is 'rms_norm', got {rms_form!r}")
    attrs = {
        "forward": _FORWARDS[kind],
        "slimfit_base": base,
        "slimfit_policy": DEFAULT_POLICY,
        "__module__": __name__,
        "__doc__": f"{base.__name__} saving compressed activations ({kind}); see :mod:`slimfit.nn.modules`.",
    }
    if activation_of is not None:
        attrs["slimfit_activation_of"] = staticmethod(activation_of)
    if rms_form is not None:
        attrs["slimfit_rms_form"] = rms_form
    cls = type(f"SlimFit{base.__name__}", (base,), attrs)
    globals()[cls.__name__] = cls  # importable by name, so pickling a patched model works
    _PATCHED[base] = cls
    return cls


def _gelu_name(m: nn.Module) -> str:
    return "gelu_tanh" if getattr(m, "approximate", "none") == "tanh" else "gelu"


def _fixed(name: str) -> Callable[[nn.Module], str]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return lambda m: name


Linear = patched_class(nn.Linear, "linear")
ColumnBlocks = patched_class(ColumnBlockLinear, "column_blocks")
LayerNorm = patched_class(nn.LayerNorm, "layer_norm")
RMSNorm = patched_class(nn.RMSNorm, "rms_norm", rms_form="torch")
Dropout = patched_class(nn.Dropout, "dropout")
GELU = patched_class(nn.GELU, "activation", _gelu_name)
ReLU = patched_class(nn.ReLU, "activation", _fixed("relu"))
SiLU = patched_class(nn.SiLU, "activation", _fixed("silu"))
Tanh = patched_class(nn.Tanh, "activation", _fixed("tanh"))
Sigmoid = patched_class(nn.Sigmoid, "activation", _fixed("sigmoid"))

#: torch module types patched by type: exact type -> patched class.
TORCH_MODULES: dict[type, type] = {
    nn.Linear: Linear,
    ColumnBlockLinear: ColumnBlocks,
    nn.LayerNorm: LayerNorm,
    nn.RMSNorm: RMSNorm,
    nn.Dropout: Dropout,
    nn.GELU: GELU,
    nn.ReLU: ReLU,
    nn.SiLU: SiLU,
    nn.Tanh: Tanh,
    nn.Sigmoid: Sigmoid,
}
