"""Compressed containers returned by :mod:`slimfit.ops`.

Each container is a frozen dataclass of tensors plus the metadata needed to restore the original tensor.
``tensors()`` / ``from_tensors()`` let an autograd Function hand the tensors to ``ctx.save_for_backward``
(so saved-tensor hooks and memory accounting see them) and rebuild the container in backward.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


class _Codec:
    """Shared helpers: byte size and the tensor/metadata split used by autograd Functions."""

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor))

    def from_tensors(self, tensors: tuple[torch.Tensor, ...]):
        names = [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]
        return replace(self, **dict(zip(names, tensors, strict=True)))

    @property
    def nbytes(self) -> int:
        """Bytes held by the container's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass(frozen=True)
class QuantizedTensor(_Codec):
    """Per-group quantized tensor (format in :mod:`slimfit.reference`).

    codes: uint8, ``ceil(numel * bits / 8)`` bytes; scale, offset: bfloat16 ``[ceil(numel / group_size)]``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    bits: int
    group_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class SparseTensor(_Codec):
    """Top-k entries of each row (last dimension) of a tensor (format in :mod:`slimfit.reference`).

    values: input dtype ``[rows, k]``; indices: int16 ``[rows, k]`` (uint16 column offsets, 2 bytes each);
    block_offsets: int32 ``[rows, ceil(n / 65536)]`` for rows longer than 65536, else ``[rows, 0]``.
    """

    values: torch.Tensor
    indices: torch.Tensor
    block_offsets: torch.Tensor
    shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype


@dataclass(frozen=True)
class PackedBits(_Codec):
    """A boolean tensor packed 8 elements per byte: ``bits`` is uint8 ``[ceil(numel / 8)]``."""

    bits: torch.Tensor
    shape: tuple[int, ...]
