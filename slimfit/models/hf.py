"""Hugging Face transformers adapter: activation classes and slimfit's own attention implementation.

transformers 5.x attention modules call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``. slimfit registers
one more implementation there, ``"slimfit"`` (with the same attention-mask format as ``"sdpa"``), and
:func:`route_attention` switches the configs of a patched model from ``"sdpa"`` to it; nothing process-wide is
wrapped, and other models keep their own implementation. :meth:`AttentionRoute.restore` switches them back.

Which modules really ran through it is checked at their first forward: an attention module that does not dispatch
through the registry (a refactored transformers, a custom model, grouped-query attention) is named in one warning
and listed in :attr:`AttentionRoute.uncompressed`, never left uncompressed silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib import metadata

import torch
from torch import nn

from slimfit.nn.attention import scaled_dot_product_attention
from slimfit.policy import Quantize

try:
    from transformers import activations as hf_activations
    from transformers.configuration_utils import PretrainedConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError:  # transformers is optional
    hf_activations = None

IMPLEMENTATION = "slimfit"
"""The name of slimfit's attention in transformers' attention registry (``config._attn_implementation``)."""
SUPPORTED_TRANSFORMERS = ((5, 0), (6, 0))
"""transformers releases slimfit is tested with: from the first (inclusive) to the second (exclusive)."""


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


def transformers_version() -> tuple[int, ...] | None:
    """The installed transformers release as a tuple of ints (None when it is not installed)."""
    if hf_activations is None:
        return None
    return tuple(int(part) for part in metadata.version("transformers").split(".")[:2] if part.isdigit())


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The innermost modules whose class name contains "Attention" (transformers' own naming rule for the modules
    that call the attention registry), ``nn.MultiheadAttention`` excluded: it is reported as unsupported by type."""
    found = []
    for name, module in model.named_modules():
        if not _is_attention(module):
            continue
        if not any(_is_attention(inner) for inner in list(module.modules())[1:]):
            found.append((name, module))
    return found


def _is_attention(module: nn.Module) -> bool:
    return "Attention" in type(module).__name__ and not isinstance(module, nn.MultiheadAttention)


class AttentionRoute:
    """The configs of one patched model switched to ``"slimfit"``, and what its attention modules did.

    Attributes:
        routed: names of the attention modules whose config now selects slimfit's attention.
        uncompressed: ``"name (ClassName: reason)"`` of attention modules that ran without compression.
    """

    def __init__(self, model: nn.Module, setting: Quantize) -> None:
        self.setting = setting
        self.routed: list[str] = []
        self.uncompressed: list[str] = []
        self._configs: list[PretrainedConfig] = []
        self._compressed: set[int] = set()
        self._fallback: dict[int, str] = {}
        self._pending: dict[int, str] = {}  # id(module) -> name, for modules not yet seen running
        self._unreported: list[str] = []  # found uncompressed during the current forward
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.unsupported: list[str] = []  # known before any forward: attention set to another implementation

        configs = {id(c): c for m in model.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)}
        for config in configs.values():
            if config._attn_implementation == IMPLEMENTATION:
                raise ValueError("model is already patched (its config selects slimfit's attention); remove it first")
        _register()
        for config in configs.values():
            if config._attn_implementation == "sdpa":
                config._attn_implementation = IMPLEMENTATION
                self._configs.append(config)
                _ROUTES[id(config)] = self
        for name, module in attention_modules(model):
            implementation = getattr(getattr(module, "config", None), "_attn_implementation", IMPLEMENTATION)
            if implementation != IMPLEMENTATION:
                self.unsupported.append(f"{name} ({type(module).__name__}, attn_implementation={implementation!r})")
                continue
            self.routed.append(name)
            self._pending[id(module)] = name
            self._hooks.append(module.register_forward_hook(self._after_first_forward))
        if self._pending:
            self._hooks.append(model.register_forward_hook(self._report))

    def restore(self) -> None:
        """Switch the configs back to ``"sdpa"`` and remove the hooks (idempotent)."""
        for config in self._configs:
            config._attn_implementation = "sdpa"
            _ROUTES.pop(id(config), None)
        for hook in self._hooks:
            hook.remove()
        self._configs, self._hooks, self._pending = [], [], {}

    def _after_first_forward(self, module: nn.Module, _args: tuple, _output: object) -> None:
        name = self._pending.pop(id(module), None)
        if name is None or id(module) in self._compressed:
            return
        reason = self._fallback.get(id(module), "it does not call transformers' attention registry")
        self._unreported.append(f"{name} ({type(module).__name__}: {reason})")

    def _report(self, _model: nn.Module, _args: tuple, _output: object) -> None:
        """After the model's forward: one warning naming the attention modules that just ran uncompressed."""
        if not self._unreported:
            return
        found, self._unreported = self._unreported, []
        self.uncompressed += found
        warnings.warn(
            f"slimfit: attention of {len(found)} module(s) runs UNCOMPRESSED, keeping full q, k, v and output for "
            f"backward: {', '.join(found)} (see SlimFit.uncompressed_modules)",
            RuntimeWarning,
            stacklevel=2,
        )

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        reason = None
        if kw.get("position_bias") is not None or kw.get("cache") is not None or kw.get("softcap") is not None:
            reason = "position bias, paged cache or softcap is not supported"
        elif getattr(module, "num_key_value_groups", 1) > 1 or query.shape[1] != key.shape[1]:
            reason = "grouped-query attention is not supported"
        if reason is not None:
            self._fallback[id(module)] = reason
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw
            )
        self._compressed.add(id(module))
        # Same causal rule as transformers' sdpa_attention_forward: the flag only when no mask is given.
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
        if causal and key.shape[2] > query.shape[2]:
            key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
        out = scaled_dot_product_attention(query, key, value, attention_mask, dropout, causal, scaling, self.setting)
        return out.transpose(1, 2).contiguous(), None


_ROUTES: dict[int, AttentionRoute] = {}  # id(config) -> the route of the model that config belongs to


def _attention(module: nn.Module, *args, **kwargs):
    """The registry entry: the route of the module's model decides (a module whose config was switched by hand to
    ``"slimfit"`` outside :func:`slimfit.models.patch` runs transformers' SDPA)."""
    route = _ROUTES.get(id(getattr(module, "config", None)))
    if route is None:
        return sdpa_attention_forward(module, *args, **kwargs)
    return route(module, *args, **kwargs)


def _register() -> None:
    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


_version_warned = False


def route_attention(model: nn.Module, setting: Quantize | None) -> AttentionRoute | None:
    """Switch ``model``'s SDPA attention to slimfit's (saving q, k, v as ``setting`` says).

    Returns None when transformers is not installed or ``setting`` is None. Warns once per process when the
    installed transformers is outside :data:`SUPPORTED_TRANSFORMERS` (the first-forward check still reports any
    attention module left uncompressed).
    """
    global _version_warned
    if hf_activations is None or setting is None:
        return None
    version = transformers_version()
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= version < high and not _version_warned:
        _version_warned = True
        warnings.warn(
            f"slimfit: transformers {metadata.version('transformers')} is outside the tested range "
            f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}; attention modules that do not run compressed "
            "will be named at their first forward",
            stacklevel=3,
        )
    return AttentionRoute(model, setting)
