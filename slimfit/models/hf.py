"""Hugging Face transformers adapter: activation classes and slimfit's own attention implementation.

transformers 5.x attention modules call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``. slimfit registers
one more implementation there, ``"slimfit"`` (with the same attention-mask format as ``"sdpa"``), and
:func:`route_attention` switches the configs of a patched model from ``"sdpa"`` to it; nothing process-wide is
wrapped, and other models keep their own implementation. :meth:`AttentionRoute.restore` switches them back.

Which modules really ran through it is checked at their first forward: an attention module that does not dispatch
through the registry (a refactored transformers, a custom model) or that needs what slimfit's attention does not do
(position bias, a paged cache, softcapping: transformers' SDPA runs instead) is named in one warning
and listed in :attr:`AttentionRoute.uncompressed`, never left uncompressed silently.

Causal LMs of :data:`CHUNKED_LM_HEAD_TYPES` get :class:`LMHeadRoute` as their forward: in training with labels their
head and loss run chunked (:func:`slimfit.nn.lm_head.linear_cross_entropy`) and the N x V logits are never built.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from importlib import metadata

import torch
import torch.nn.functional as F
from torch import nn

from slimfit.nn.attention import scaled_dot_product_attention
from slimfit.nn.lm_head import linear_cross_entropy
from slimfit.policy import CompressionPolicy, Quantize

try:
    from transformers import activations as hf_activations
    from transformers.configuration_utils import PretrainedConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.loss.loss_utils import LOSS_MAPPING
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface, PreTrainedModel
    from transformers.utils import ModelOutput
except ImportError:  # transformers is optional
    hf_activations = None

IMPLEMENTATION = "slimfit"
"""The name of slimfit's attention in transformers' attention registry (``config._attn_implementation``)."""
SUPPORTED_TRANSFORMERS = ((5, 18), (6, 0))
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
        if kw.get("position_bias") is not None or kw.get("cache") is not None or kw.get("softcap") is not None:
            self._fallback[id(module)] = "position bias, paged cache or softcap is not supported"
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kw
            )
        self._compressed.add(id(module))
        # Sliding windows need nothing here: the "slimfit" mask function (transformers' sdpa_mask) builds the window
        # into the 4-D mask whenever the sequence is longer than the window.
        # Same causal rule as transformers' sdpa_attention_forward: the flag only when no mask is given.
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
        if causal and key.shape[2] > query.shape[2]:
            key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
        # Grouped-query / multi-query attention: k and v arrive (after rotary embeddings) with one head per key/value
        # head; they are saved at that width and shared across query heads inside SDPA.
        gqa = query.shape[1] != key.shape[1]
        out = scaled_dot_product_attention(
            query, key, value, attention_mask, dropout, causal, scaling, self.setting, enable_gqa=gqa
        )
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

CHUNKED_LM_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2", "gpt2"})
"""``config.model_type`` of the causal LMs whose head runs chunked: their forward is base model -> ``lm_head`` ->
transformers' causal-LM loss with nothing in between (checked against the unpatched model in tests/test_lm_head.py).
Others (Gemma 2's logit softcapping, Cohere's and Granite's logit scales, ...) keep their full logits."""


class LMHeadRoute:
    """The forward of one causal LM, computing head and loss chunked in training (installed as ``model.forward``).

    A call with ``labels=`` (a keyword, as the Trainer passes it) in training mode with grad enabled runs the model's
    own forward (so its argument handling, ``logits_to_keep``, loss kwargs and any wrapper such as accelerate's
    autocast stay as they are) with the head passing the hidden states through and the loss function replaced by
    :func:`slimfit.nn.lm_head.linear_cross_entropy` with transformers' label shift, ``ignore_index`` and
    ``num_items_in_batch`` (sum / num_items_in_batch, for gradient accumulation); the output's ``logits`` is None.
    Any other call (evaluation, no labels, no grad) is the unchanged forward.
    """

    def __init__(self, model: nn.Module, head: nn.Linear, chunk_size: int, setting: Quantize | None) -> None:
        self.model, self.head, self.chunk_size, self.setting = model, head, chunk_size, setting
        self._inner = model.__dict__.get("forward")  # a wrapper installed before us, e.g. accelerate's autocast
        self.__signature__ = inspect.signature(model.forward)  # what the Trainer inspects for loss kwargs
        self._active = True
        model.forward = self

    def restore(self) -> None:
        """Give the model its forward back (idempotent). If something wrapped ours since, it only delegates."""
        self._active = False
        if self.model.__dict__.get("forward") is self:
            if self._inner is None:
                del self.model.forward
            else:
                self.model.forward = self._inner

    def __call__(self, *args, **kwargs):
        model = self.model
        forward = self._inner or functools.partial(type(model).forward, model)
        if not (self._active and kwargs.get("labels") is not None and model.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        captured: list[torch.Tensor] = []

        def pass_hidden(hidden: torch.Tensor) -> torch.Tensor:
            captured.append(hidden)
            return hidden

        def loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **_):
            # transformers' ForCausalLMLoss, with the head applied here chunk by chunk.
            if not captured or logits is not captured[-1]:
                raise RuntimeError(
                    f"slimfit: {type(model).__name__} changes its logits between the head and the loss; its head "
                    "cannot run chunked (CompressionPolicy(lm_head_chunk=None) keeps the full logits)"
                )
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            reduction = "mean" if num_items_in_batch is None else "sum"
            value = linear_cross_entropy(
                logits,
                self.head.weight,
                self.head.bias,
                shift_labels.to(logits.device),
                ignore_index=ignore_index,
                reduction=reduction,
                chunk_size=self.chunk_size,
                setting=self.setting,
            )
            if num_items_in_batch is None:
                return value
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(value.device)
            return value / num_items_in_batch

        head_forward, model_loss = self.head.__dict__.get("forward"), model.__dict__.get("_loss_function")
        self.head.forward, model.loss_function = pass_hidden, loss
        try:
            out = forward(*args, **kwargs)
        finally:
            _put_back(self.head, "forward", head_forward)
            _put_back(model, "_loss_function", model_loss)
        if isinstance(out, ModelOutput):
            return type(out)(**{k: v for k, v in out.items() if k != "logits"})
        return (out[0], *out[2:])  # return_dict=False: (loss, logits, ...) without the logits


def _put_back(obj: object, name: str, value: object) -> None:
    if value is None:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = value


def route_lm_head(model: nn.Module, policy: CompressionPolicy) -> tuple[LMHeadRoute | None, str | None]:
    """Chunk the head and loss of ``model`` in training (:class:`LMHeadRoute`) if it is a causal LM of
    :data:`CHUNKED_LM_HEAD_TYPES` with a linear head and transformers' default causal-LM loss, and the policy's
    ``lm_head_chunk`` is set. Returns the route (or None: nothing changes) and, for a causal LM left with its full
    logits, ``"name (ClassName: why)"`` for the warning of modules left uncompressed."""
    if hf_activations is None or policy.lm_head_chunk is None or not isinstance(model, PreTrainedModel):
        return None, None
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return None, None
    head = model.get_output_embeddings()
    reason = None
    if model.config.model_type not in CHUNKED_LM_HEAD_TYPES:
        reason = f"model type {model.config.model_type!r} is not among those whose loss the chunked head matches"
    elif not isinstance(head, nn.Linear):
        reason = "its output embedding is not an nn.Linear"
    elif model.loss_function is not LOSS_MAPPING["ForCausalLM"]:
        reason = "it uses its own loss function"
    if reason is not None:
        name = next((n for n, m in model.named_modules() if m is head), "lm_head")
        return None, f"{name} ({type(model).__name__}: keeps the full logits, {reason})"
    return LMHeadRoute(model, head, policy.lm_head_chunk, policy.linear_input), None


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
