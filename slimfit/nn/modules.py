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
from slimfit.nn.dropout import dropout
from slimfit.nn.layernorm import layer_norm
from slimfit.nn.linear import linear
from slimfit.policy import DEFAULT_POLICY


def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias, self.slimfit_policy.linear_input)


def _layer_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    policy = self.slimfit_policy
    trainable = self.weight is not None and self.weight.requires_grad
    setting = policy.layernorm_trainable if trainable else policy.layernorm_frozen
    return layer_norm(x, tuple(self.normalized_shape), self.weight, self.bias, self.eps, setting)


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
    "layer_norm": _layer_norm_forward,
    "dropout": _dropout_forward,
    "activation": _activation_forward,
}
_PATCHED: dict[type, type] = {}


def patched_class(base: type[nn.Module], kind: str, activation_of: Callable[[nn.Module], str] | None = None) -> type:
    """The compressed subclass of ``base`` (cached per base class).

    kind: "linear" (nn.Linear-like: weight, bias), "layer_norm" (normalized_shape, weight, bias, eps),
    "dropout" (p, inplace) or "activation" (pointwise; ``activation_of(module)`` names it, a key of
    :data:`slimfit.nn.activation.ACTIVATIONS`).
    """
    if base in _PATCHED:
        return _PATCHED[base]
    if kind not in _FORWARDS:
        raise ValueError(f"kind must be one of {sorted(_FORWARDS)}, got {kind!r}")
    if (kind == "activation") != (activation_of is not None):
        raise ValueError("activation_of must be given exactly when kind is 'activation'")
    attrs = {
        "forward": _FORWARDS[kind],
        "slimfit_base": base,
        "slimfit_policy": DEFAULT_POLICY,
        "__module__": __name__,
        "__doc__": f"{base.__name__} saving compressed activations ({kind}); see :mod:`slimfit.nn.modules`.",
    }
    if activation_of is not None:
        attrs["slimfit_activation_of"] = staticmethod(activation_of)
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
LayerNorm = patched_class(nn.LayerNorm, "layer_norm")
Dropout = patched_class(nn.Dropout, "dropout")
GELU = patched_class(nn.GELU, "activation", _gelu_name)
ReLU = patched_class(nn.ReLU, "activation", _fixed("relu"))
SiLU = patched_class(nn.SiLU, "activation", _fixed("silu"))
Tanh = patched_class(nn.Tanh, "activation", _fixed("tanh"))
Sigmoid = patched_class(nn.Sigmoid, "activation", _fixed("sigmoid"))

#: torch module types patched by type: exact type -> patched class.
TORCH_MODULES: dict[type, type] = {
    nn.Linear: Linear,
    nn.LayerNorm: LayerNorm,
    nn.Dropout: Dropout,
    nn.GELU: GELU,
    nn.ReLU: ReLU,
    nn.SiLU: SiLU,
    nn.Tanh: Tanh,
    nn.Sigmoid: Sigmoid,
}
