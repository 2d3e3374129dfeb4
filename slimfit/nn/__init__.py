"""Autograd Functions and drop-in modules that save compressed tensors for backward.

Functional API (each falls back to the plain PyTorch op when its setting is None or nothing needs grad):
:func:`linear`, :func:`layer_norm`, :func:`activation`, :func:`dropout`, :func:`scaled_dot_product_attention`.
Modules: :class:`Linear`, :class:`LayerNorm`, :class:`Dropout`, :class:`GELU`, :class:`ReLU`, :class:`SiLU`,
:class:`Tanh`, :class:`Sigmoid` (same constructors as torch's; settings from ``module.slimfit_policy``).
"""

from slimfit.nn.activation import ACTIVATIONS, ActivationFunction, activation, code_segments, derivative_levels
from slimfit.nn.attention import AttentionFunction, scaled_dot_product_attention
from slimfit.nn.dropout import DropoutFunction, dropout
from slimfit.nn.layernorm import LayerNormFunction, layer_norm
from slimfit.nn.linear import LinearFunction, linear
from slimfit.nn.modules import (
    GELU,
    TORCH_MODULES,
    Dropout,
    LayerNorm,
    Linear,
    ReLU,
    Sigmoid,
    SiLU,
    Tanh,
    patched_class,
)

__all__ = [
    "ACTIVATIONS",
    "GELU",
    "TORCH_MODULES",
    "ActivationFunction",
    "AttentionFunction",
    "Dropout",
    "DropoutFunction",
    "LayerNorm",
    "LayerNormFunction",
    "Linear",
    "LinearFunction",
    "ReLU",
    "SiLU",
    "Sigmoid",
    "Tanh",
    "activation",
    "code_segments",
    "derivative_levels",
    "dropout",
    "layer_norm",
    "linear",
    "patched_class",
    "scaled_dot_product_attention",
]
