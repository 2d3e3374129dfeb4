"""Autograd Functions and drop-in modules that save compressed tensors for backward.

Functional API (each falls back to the plain PyTorch op when its setting is None or nothing needs grad):
:func:`linear`, :func:`layer_norm`, :func:`rms_norm`, :func:`activation`, :func:`gated_product`, :func:`dropout`,
:func:`scaled_dot_product_attention`.
Modules: :class:`Linear`, :class:`LayerNorm`, :class:`RMSNorm`, :class:`Dropout`, :class:`GELU`, :class:`ReLU`,
:class:`SiLU`, :class:`Tanh`, :class:`Sigmoid` (same constructors as torch's; settings from
``module.slimfit_policy``).
"""

from slimfit.nn.activation import ACTIVATIONS, ActivationFunction, activation, code_segments, derivative_levels
from slimfit.nn.attention import AttentionFunction, scaled_dot_product_attention
from slimfit.nn.dropout import DropoutFunction, dropout
from slimfit.nn.gated_mlp import GatedProductFunction, gated_product, is_gated_mlp
from slimfit.nn.layernorm import LayerNormFunction, layer_norm
from slimfit.nn.linear import LinearFunction, linear
from slimfit.nn.modules import (
    GELU,
    TORCH_MODULES,
    Dropout,
    LayerNorm,
    Linear,
    ReLU,
    RMSNorm,
    Sigmoid,
    SiLU,
    Tanh,
    patched_class,
)
from slimfit.nn.rmsnorm import RMSNormFunction, rms_norm, rms_norm_form

__all__ = [
    "ACTIVATIONS",
    "GELU",
    "TORCH_MODULES",
    "ActivationFunction",
    "AttentionFunction",
    "Dropout",
    "DropoutFunction",
    "GatedProductFunction",
    "LayerNorm",
    "LayerNormFunction",
    "Linear",
    "LinearFunction",
    "RMSNorm",
    "RMSNormFunction",
    "ReLU",
    "SiLU",
    "Sigmoid",
    "Tanh",
    "activation",
    "code_segments",
    "derivative_levels",
    "dropout",
    "gated_product",
    "is_gated_mlp",
    "layer_norm",
    "linear",
    "patched_class",
    "rms_norm",
    "rms_norm_form",
    "scaled_dot_product_attention",
]
