"""Layer discovery: which parameters inter-layer scheduling (ILS) freezes and thaws.

A *layer* is a parameter with more than one dimension (Linear / embedding / conv weights, classifier,
position tables) or the weight (gamma) of a normalisation module (LayerNorm, RMSNorm, BatchNorm,
GroupNorm, and model-specific norms such as ``LlamaRMSNorm``). Every other parameter (biases and the
remaining 1-D tensors) is an *auxiliary* parameter: tiny, so it either always trains or never does.

Only parameters that require grad when SlimFit is attached are considered: a parameter the user froze
stays frozen and is not scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Modules whose 1-D ``weight`` is a normalisation gain even when their class is model-specific.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass(frozen=True)
class Layer:
    """One schedulable tensor: ``name`` as in ``model.named_parameters()`` of the unwrapped model."""

    name: str
    param: nn.Parameter
    kind: str  # "weight" (more than one dimension) or "norm" (normalisation gain)


@dataclass(frozen=True)
class ParameterSplit:
    """The trainable parameters of a model split into scheduled layers and auxiliary parameters."""

    layers: tuple[Layer, ...]
    auxiliary: tuple[tuple[str, nn.Parameter], ...]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the parameters: strips DDP / DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def reject_sharded_parameters(model: nn.Module) -> None:
    """Raise for FSDP: ``FullyShardedDataParallel`` (FlatParameters) and FSDP2 ``fully_shard`` (DTensor shards).

    Scoring a layer needs the norm of the whole tensor and freezing must be decided for whole tensors on
    every rank; neither is implemented for shards, and a silent per-shard schedule would train wrongly.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support: nothing can be sharded
        return
    advice = (
        "are not supported by SlimFit yet. Use DistributedDataParallel (or accelerate with DDP) instead, and apply "
        "SlimFit to the unsharded model."
    )
    wrapped = [name or "<model>" for name, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)]
    if wrapped:
        raise ValueError(
            f"model has {len(wrapped)} FullyShardedDataParallel module(s) (first: {wrapped[0]!r}): FSDP "
            f"(FullyShardedDataParallel, FlatParameter parameters), FSDP2 (fully_shard) and tensor-parallel models "
            + advice
        )
    sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(
            f"model has {len(sharded)} DTensor parameter(s) (first: {sharded[0]!r}): FSDP2 (fully_shard) and "
            "tensor-parallel models " + advice
        )


def is_norm_module(module: nn.Module) -> bool:
    """True for normalisation modules, including model-specific classes named ``*Norm`` (e.g. T5LayerNorm)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def split_parameters(model: nn.Module) -> ParameterSplit:
    """Split the parameters of ``model`` that require grad into layers and auxiliary parameters.

    Tied parameters (e.g. an MLM decoder sharing the word embeddings) appear once, under their first name.
    """
    norm_weights = {
        id(module.weight)
        for module in model.modules()
        if is_norm_module(module) and isinstance(getattr(module, "weight", None), torch.Tensor)
    }
    layers: list[Layer] = []
    auxiliary: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() > 1:
            layers.append(Layer(name, param, "weight"))
        elif id(param) in norm_weights:
            layers.append(Layer(name, param, "norm"))
        else:
            auxiliary.append((name, param))
    return ParameterSplit(tuple(layers), tuple(auxiliary))
