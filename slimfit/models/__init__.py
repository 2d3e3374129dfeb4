"""Patch a model so that what it saves for backward is compressed: :func:`patch` and :class:`PatchHandle`.

Modules are patched by type, in place: an instance's ``__class__`` becomes a subclass of its own class
(:mod:`slimfit.nn.modules`), so parameters, hooks, state-dict keys and ``isinstance`` checks are unchanged and
:meth:`PatchHandle.remove` restores the exact original classes.

- torch modules of exactly these types: ``nn.Linear``, ``nn.LayerNorm``, ``nn.Dropout``, ``nn.GELU``, ``nn.ReLU``,
  ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid`` and slimfit's ``ColumnBlockLinear`` (the generic path: any model built
  from them);
- transformers activation classes (GELU variants, SiLU), and attention of models whose config selects
  ``attn_implementation="sdpa"``: the config is switched to slimfit's own registered implementation
  (:mod:`slimfit.models.hf`; BERT, RoBERTa, ELECTRA, DistilBERT, ViT, DeiT and other 5.x models);
- decoder parts: ``nn.RMSNorm`` and any class named ``*RMSNorm`` whose forward computes one of the forms of
  :mod:`slimfit.nn.rmsnorm` (Llama's, Gemma's ``1 + weight``, ...), transformers' ``Conv1D`` (GPT-2), and gated
  MLPs ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` whose ``act_fn`` is patched here
  (:func:`slimfit.nn.gated_mlp.is_gated_mlp`). Norms and MLPs are recognised by probing their forward once.
- the head of causal LMs (:data:`slimfit.models.hf.CHUNKED_LM_HEAD_TYPES`): in training with labels, head and loss
  run a chunk of tokens at a time without keeping the logits (``CompressionPolicy.lm_head_chunk``).

Leaf modules that hold parameters or compute an activation or attention we do not handle (e.g. ``nn.Conv2d``,
``nn.MultiheadAttention``, eager attention) stay uncompressed; one warning names them. Attention modules are also
checked at their first forward: one that did not run through slimfit's attention is named in a warning and added
to :attr:`PatchHandle.unsupported`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from slimfit.models import hf
from slimfit.nn.gated_mlp import is_gated_mlp
from slimfit.nn.modules import TORCH_MODULES, patched_class
from slimfit.nn.rmsnorm import rms_norm_form
from slimfit.policy import CompressionPolicy

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional
    Conv1D = None

__all__ = ["PatchHandle", "patch"]

_POLICY_ATTR = "slimfit_policy"
# Leaf modules that save nothing worth compressing (indices, or nothing at all; a ParameterList only holds the
# column blocks its ColumnBlockLinear computes with).
_HARMLESS = (nn.Embedding, nn.Identity, nn.Flatten, nn.ParameterList)
_ACTIVATION_MODULES = (nn.modules.activation.__name__, "transformers.activations")


@dataclass
class PatchHandle:
    """What :func:`patch` changed; :meth:`remove` undoes it.

    Attributes:
        patched: module name -> original class, for every module whose class was switched.
        attention: names of attention modules routed to slimfit's attention implementation.
        unsupported: ``"name (ClassName...)"`` of modules left uncompressed, including attention modules found
            at their first forward not to run compressed.
    """

    model: nn.Module | None = field(repr=False)
    policy: CompressionPolicy | None
    patched: dict[str, type] = field(default_factory=dict)
    # The module objects themselves, so remove() works even if the model was re-wrapped or re-arranged since.
    _switched: list[tuple[nn.Module, type]] = field(default_factory=list, repr=False)
    _static_unsupported: list[str] = field(default_factory=list, repr=False)
    _route: hf.AttentionRoute | None = field(default=None, repr=False)
    _lm_head: hf.LMHeadRoute | None = field(default=None, repr=False)

    @property
    def chunked_lm_head(self) -> bool:
        """Whether the model's head and loss run chunked in training (:class:`slimfit.models.hf.LMHeadRoute`)."""
        return self._lm_head is not None

    @property
    def attention(self) -> list[str]:
        return list(self._route.routed) if self._route is not None else []

    @property
    def unsupported(self) -> list[str]:
        route = self._route
        return self._static_unsupported + (route.unsupported + route.uncompressed if route is not None else [])

    def remove(self) -> None:
        """Restore every patched module's original class and attention implementation (idempotent)."""
        if self.model is None:
            return
        for m, cls in self._switched:
            m.__class__ = cls
            m.__dict__.pop(_POLICY_ATTR, None)
        if self._route is not None:
            self._route.restore()
        if self._lm_head is not None:
            self._lm_head.restore()
            self._lm_head = None
        self.model = None
        self.patched, self._switched, self._route = {}, [], None


def patch(model: nn.Module, policy: CompressionPolicy | None) -> PatchHandle:
    """Switch ``model``'s supported modules to compressed-saving versions following ``policy``.

    ``policy=None`` changes nothing (the handle's ``remove`` is a no-op), so results are bit-identical to the
    unpatched model. A model already patched must be restored (``remove``) before patching it again.
    Call it on the model's modules as they will run (e.g. after ``model.to(device)``; the patch survives it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if policy is not None and not isinstance(policy, CompressionPolicy):
        raise ValueError(f"policy must be a CompressionPolicy or None, got {policy!r}")
    handle = PatchHandle(model, policy)
    if policy is None:
        return handle
    already = [n for n, m in model.named_modules() if _POLICY_ATTR in m.__dict__]
    if already:
        raise ValueError(f"model is already patched (e.g. module {already[0]!r}); call remove() on its handle first")
    handle._route = hf.route_attention(model, policy.attention)
    handle._lm_head, unchunked = hf.route_lm_head(model, policy)
    if unchunked is not None:
        handle._static_unsupported.append(unchunked)

    hf_acts = hf.activation_classes()
    for name, m in model.named_modules():
        cls = type(m)
        target = TORCH_MODULES.get(cls)
        if target is None and cls in hf_acts:
            target = patched_class(cls, "activation", hf_acts[cls])
        if target is None:
            target = _decoder_target(m, hf_acts)
        if target is not None:
            handle.patched[name] = cls
            handle._switched.append((m, cls))
            m.__class__ = target
            setattr(m, _POLICY_ATTR, policy)
        elif isinstance(m, nn.MultiheadAttention) or _is_unsupported_leaf(m):
            handle._static_unsupported.append(f"{name} ({cls.__name__})")
    if handle.unsupported:
        warnings.warn(
            f"slimfit: {len(handle.unsupported)} module(s) stay uncompressed: {', '.join(handle.unsupported)}",
            stacklevel=2,
        )
    return handle


def _decoder_target(m: nn.Module, hf_acts: dict) -> type | None:
    """The patched class for a GPT-2 ``Conv1D``, an RMSNorm of a known form or a gated MLP; None otherwise."""
    cls = type(m)
    if Conv1D is not None and cls is Conv1D:
        return patched_class(cls, "conv1d")
    form = rms_norm_form(m)
    if form is not None:
        target = patched_class(cls, "rms_norm", rms_form=form)
        # Patched classes are per class; an instance computing another form than its class's first stays as is.
        return target if target.slimfit_rms_form == form else None
    act = type(getattr(m, "act_fn", None))
    act_patched = act in hf_acts or hasattr(TORCH_MODULES.get(act), "slimfit_activation_of")
    return patched_class(cls, "gated_mlp") if act_patched and is_gated_mlp(m) else None


def _is_unsupported_leaf(m: nn.Module) -> bool:
    if next(m.children(), None) is not None or isinstance(m, _HARMLESS):
        return False
    owns_params = next(m.parameters(recurse=False), None) is not None
    is_activation = type(m).__module__ in _ACTIVATION_MODULES
    return owns_params or is_activation
