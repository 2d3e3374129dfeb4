"""Encode activations per policy setting and move mixed codec/tensor lists through ``ctx.save_for_backward``.

Only tensors reach the autograd context (so saved-tensor hooks and :mod:`slimfit.memory` see every byte); the
codecs' metadata (shapes, bit widths) rides on ``ctx`` as plain Python values.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from slimfit import ops
from slimfit.codecs import PackedBits, QuantizedTensor, SparseTensor
from slimfit.memory import note_decoded
from slimfit.policy import Quantize, TopK

Saved = torch.Tensor | QuantizedTensor | SparseTensor | PackedBits | None


def encode(x: torch.Tensor, setting: Quantize | TopK | None) -> torch.Tensor | QuantizedTensor | SparseTensor:
    """``x`` compressed as ``setting`` says; ``None`` returns ``x`` itself (exact)."""
    if setting is None:
        return x
    if isinstance(setting, Quantize):
        return ops.quantize(x.detach(), setting.bits, setting.group_size, setting.stochastic)
    if isinstance(setting, TopK):
        return ops.sparsify(x.detach(), setting.keep)
    raise ValueError(f"setting must be None, Quantize or TopK, got {setting!r}")


def decode(saved: torch.Tensor | QuantizedTensor | SparseTensor) -> torch.Tensor:
    """The (approximate) dense tensor behind :func:`encode`'s result."""
    if isinstance(saved, QuantizedTensor):
        return note_decoded(ops.dequantize(saved))
    if isinstance(saved, SparseTensor):
        return note_decoded(ops.densify(saved))
    return saved


def save(ctx, *items: Saved) -> None:
    """Save tensors, codecs and ``None`` placeholders; :func:`load` returns them in the same order."""
    tensors: list[torch.Tensor] = []
    layout: list[tuple] = []
    for item in items:
        if item is None:
            layout.append(("none",))
        elif isinstance(item, torch.Tensor):
            layout.append(("tensor",))
            tensors.append(item)
        else:
            names = [f.name for f in fields(item) if isinstance(getattr(item, f.name), torch.Tensor)]
            meta = {f.name: getattr(item, f.name) for f in fields(item) if f.name not in names}
            layout.append(("codec", type(item), names, meta))
            tensors.extend(getattr(item, n) for n in names)
    ctx.save_for_backward(*tensors)
    ctx.slimfit_layout = layout


def load(ctx) -> list[Saved]:
    """The items given to :func:`save`, rebuilt from ``ctx.saved_tensors``."""
    it = iter(ctx.saved_tensors)
    out: list[Saved] = []
    for entry in ctx.slimfit_layout:
        if entry[0] == "none":
            out.append(None)
        elif entry[0] == "tensor":
            out.append(next(it))
        else:
            _, cls, names, meta = entry
            out.append(cls(**meta, **{n: next(it) for n in names}))
    return out
