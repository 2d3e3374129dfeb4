"""Hugging Face transformers adapter: activation classes and the attention-function registry.

transformers 5.x attention modules (BERT, RoBERTa, ELECTRA, DistilBERT, ViT, DeiT and most others) look up
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` on every call. While any model is patched, the
``"sdpa"`` entry is wrapped: calls coming from a marked module (``module.slimfit_attention`` set) run
:func:`slimfit.nn.scaled_dot_product_attention`; every other call goes to the original function untouched.
The wrapper is removed when the last patch is removed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

from slimfit.nn.attention import scaled_dot_product_attention

try:
    from transformers import activations as hf_activations
    from transformers.modeling_utils import AttentionInterface
except ImportError:  # transformers is optional
    hf_activations = None
    AttentionInterface = None

ATTENTION_ATTR = "slimfit_attention"
_REGISTRY_NAME = "ALL_ATTENTION_FUNCTIONS"


def activation_classes() -> dict[type, Callable[[nn.Module], str]]:
    """transformers activation classes we compress -> function naming the activation of an instance."""
    if hf_activations is None:
        return {}
    table = {
        "GELUActivation": "gelu",
        "GELUTanh": "gelu_tanh",
        "NewGELUActivation": "gelu_tanh",
        "FastGELUActivation": "gelu_tanh",
        "AccurateGELUActivation": "gelu_tanh",
        "SiLUActivation": "silu",
    }
    return {getattr(hf_activations, n): _named(a) for n, a in table.items() if hasattr(hf_activations, n)}


def _named(name: str) -> Callable[[nn.Module], str]:
    return lambda m: name


def is_registry_attention(module: nn.Module) -> bool:
    """Whether ``module.forward`` dispatches attention through transformers' attention-function registry."""
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and _REGISTRY_NAME in code.co_names and hasattr(module, "config")


def attention_implementation(module: nn.Module) -> str | None:
    """The attention implementation a registry-dispatching module uses (``config._attn_implementation``)."""
    return getattr(getattr(module, "config", None), "_attn_implementation", None)


class _Dispatcher:
    """Reference-counted wrapper of the registry's "sdpa" entry."""

    def __init__(self) -> None:
        self.users = 0
        self.original: Callable | None = None
        self.fallback_warned: set[str] = set()

    @property
    def available(self) -> bool:
        return AttentionInterface is not None

    def acquire(self) -> None:
        if self.users == 0:
            self.original = AttentionInterface._global_mapping["sdpa"]
            AttentionInterface.register("sdpa", self)
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            AttentionInterface.register("sdpa", self.original)
            self.original = None

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        setting = getattr(module, ATTENTION_ATTR, None)
        reason = None
        if kw.get("position_bias") is not None or kw.get("cache") is not None or kw.get("softcap") is not None:
            reason = "position bias, paged cache or softcap"
        elif getattr(module, "num_key_value_groups", 1) > 1 or query.shape[1] != key.shape[1]:
            reason = "grouped-query attention"
        if setting is None or reason is not None:
            if setting is not None and type(module).__name__ not in self.fallback_warned:
                self.fallback_warned.add(type(module).__name__)
                warnings.warn(
                    f"slimfit: attention of {type(module).__name__} runs uncompressed ({reason} is not supported)",
                    stacklevel=2,
                )
            return self.original(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw
            )
        # Same causal rule as transformers' sdpa_attention_forward: the flag only when no mask is given.
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
        if causal and key.shape[2] > query.shape[2]:
            key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
        out = scaled_dot_product_attention(query, key, value, attention_mask, dropout, causal, scaling, setting)
        return out.transpose(1, 2).contiguous(), None


DISPATCHER = _Dispatcher()
