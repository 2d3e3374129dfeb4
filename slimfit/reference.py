"""Plain-PyTorch versions of every slimfit op.

This module is the specification the C++/CUDA kernels are tested against, and the implementation used
when the compiled extension is missing or ``SLIMFIT_FORCE_REFERENCE=1`` is set. Every function here has
the same signature and return values as its ``torch.ops.slimfit`` counterpart.

Quantization format (shared by all backends)
--------------------------------------------
* The input is flattened (row-major) to ``n`` elements and cut into ``G = ceil(n / group_size)`` groups
  of consecutive elements; the last group may be short.
* Each group stores an ``offset`` and a ``scale`` as bfloat16 (2 bytes each). ``offset`` is the group
  minimum (a zero counts as +0.0) rounded *down* to bfloat16 and ``scale`` is ``(max - offset) / (2**bits - 1)``
  rounded *up*, so every element of the group lies inside the representable range and round-to-nearest is
  off by at most ``scale / 2`` (plus float32's rounding of the dequantized value, which dominates when a group's
  range is tiny next to its magnitude).
* A code is ``round_half_even((x - offset) * inv)`` with ``inv = 1 / scale`` in float32 (``inv = 0`` when
  ``scale == 0``), clamped to ``[0, 2**bits - 1]``. Stochastic rounding replaces the rounding by
  ``floor(v + u)`` where ``u`` in [0, 1) comes from :func:`uniform_from_seed` (a counter-based hash of the
  seed and the element index), so every backend produces identical codes for the same seed.
* Codes are packed little-endian inside a byte: element ``i`` lives in byte ``i * bits // 8`` at bit
  ``(i % (8 // bits)) * bits``. The code tensor has exactly ``ceil(n * bits / 8)`` bytes.
* A group holding NaN or +-Inf gets ``scale = offset = NaN`` (bfloat16 0x7FC0) and zero codes, so it
  dequantizes to NaN (sign and payload unspecified); other groups are unaffected.
* Dequantization is ``offset + code * scale`` in float32, cast to the requested dtype.

Sparse (top-k) format
---------------------
* Rows are the last dimension: ``n = shape[-1]`` (``n = 1`` for a 0-d tensor), ``rows = numel / n``. Each
  row keeps its ``k`` entries of largest magnitude. Magnitude order is the order of the float32 bit
  pattern with the sign cleared, so NaN ranks above +-Inf (NaN is never silently dropped); ties go to the
  lower column. The kept entries are stored in ascending column order.
* ``values``: ``[rows, k]`` in the input dtype, exact. ``indices``: int16 ``[rows, k]`` holding the column
  modulo 65536 as an unsigned 16-bit number (2 bytes per kept entry).
* Rows longer than 65536 are cut into blocks of 65536 columns and ``block_offsets`` (int32
  ``[rows, ceil(n / 65536)]``) holds, per block, the position within the row's ``k`` entries of the first
  entry in that block; the column of entry ``j`` is ``b * 65536 + index`` with ``b`` the last block whose
  offset is ``<= j``. For ``n <= 65536`` ``block_offsets`` is ``[rows, 0]`` (no bytes).
* Densify writes the kept values back and zero everywhere else.

Bit-packed masks
----------------
* The boolean input is flattened (row-major); element ``i`` is bit ``i % 8`` of byte ``i // 8``; the last
  byte's unused bits are zero. The packed tensor is uint8 with ``ceil(n / 8)`` bytes.

Update norms
------------
* For each pair ``(b, a)`` of equally shaped tensors, in float64 on float32-converted elements:
  ``rel_l2 = ||a - b||_2 / max(||b||_2, eps)`` and ``rel_l1_mean = mean(|a - b| / max(|b|, eps))``
  (0 for empty tensors). The result is float32 ``[len(pairs)]``; a NaN or Inf only affects its own entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_from_seed(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` float32 values in [0, 1): element ``i`` is ``hash32(hash32(seed) + i) >> 8`` times 2**-24.

    ``seed`` is taken modulo 2**32. The same formula runs in the CPU and CUDA kernels.
    """
    key = _hash32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=device))
    idx = torch.arange(n, dtype=torch.int64, device=device)
    h = _hash32((idx + key) & _MASK32)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _round_to_bf16(v: torch.Tensor, up: bool) -> torch.Tensor:
    """Round float32 values to bfloat16 toward +inf (``up``) or -inf, exactly."""
    bits = v.contiguous().view(torch.int32)
    truncated = bits & ~0xFFFF  # rounds the magnitude toward zero
    inexact = (bits & 0xFFFF) != 0
    grow = inexact & ((v < 0) != up)  # magnitude must grow when rounding away from zero
    rounded = torch.where(grow, truncated + 0x10000, truncated).view(torch.float32)
    return rounded.to(torch.bfloat16)


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Flattened float32 view of ``x`` as ``[G, group_size]``, the last group padded by repetition."""
    flat = x.reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits) into ``ceil(n * bits / 8)`` bytes, little-endian within a byte."""
    per_byte = 8 // bits
    n = codes.numel()
    pad = (-n) % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    lanes = codes.view(-1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * bits
    return (lanes << shifts).sum(dim=1).to(torch.uint8)


def _unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits
    lanes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return lanes.reshape(-1)[:n]


def quantize(
    x: torch.Tensor, bits: int, group_size: int, seed: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group min/max quantization; returns ``(codes uint8, scale bf16 [G], offset bf16 [G])``."""
    n = x.numel()
    if n == 0:
        empty_bf16 = torch.empty(0, dtype=torch.bfloat16, device=x.device)
        return torch.empty(0, dtype=torch.uint8, device=x.device), empty_bf16, empty_bf16.clone()
    levels = (1 << bits) - 1
    groups = _groups(x, group_size)
    finite = torch.isfinite(groups).all(dim=1)
    # Adding +0.0 turns -0.0 into +0.0, so the signed zero a reduction happens to return does not matter.
    lo = torch.where(finite, groups.amin(dim=1), 0.0) + 0.0
    hi = torch.where(finite, groups.amax(dim=1), 0.0) + 0.0
    offset = _round_to_bf16(lo, up=False)
    scale = _round_to_bf16((hi - offset.float()) / levels, up=True)
    nan = torch.tensor(float("nan"), dtype=torch.bfloat16, device=x.device)
    offset = torch.where(finite, offset, nan)
    scale = torch.where(finite, scale, nan)

    scale32 = scale.float()
    inv = torch.where(scale32 > 0, 1.0 / scale32, 0.0)
    v = (groups - offset.float().unsqueeze(1)) * inv.unsqueeze(1)
    v = v.reshape(-1)[:n]
    if seed is None:
        q = torch.round(v)
    else:
        q = torch.floor(v + uniform_from_seed(seed, n, x.device))
    q = q.clamp(0, levels)
    q = torch.where(finite.repeat_interleave(group_size)[:n], q, 0.0)
    return _pack_codes(q.to(torch.uint8), bits), scale, offset


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bits: int,
    group_size: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``offset + code * scale`` per group, reshaped to ``shape``."""
    n = math.prod(shape)
    q = _unpack_codes(codes, bits, n).to(torch.float32)
    group_of = torch.arange(n, device=codes.device) // group_size
    out = offset.float()[group_of] + q * scale.float()[group_of]
    return out.to(dtype).view(tuple(shape))


_INDEX_BLOCK = 65536  # columns addressed by one uint16 index


def _magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """int64 sort key of ``|x|``: the float32 bit pattern without its sign (NaN above Inf)."""
    return (x.to(torch.float32).contiguous().view(torch.int32) & 0x7FFFFFFF).to(torch.int64)


def _bits_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` viewed as a same-width integer tensor: gather/scatter on it move bit patterns exactly
    (torch's bfloat16 gather does not preserve NaN payloads)."""
    return x.contiguous().view(torch.int32 if x.element_size() == 4 else torch.int16)


def _rows(shape: Sequence[int]) -> tuple[int, int]:
    n = shape[-1] if len(shape) else 1
    return math.prod(shape[:-1]), n


def sparsify(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` magnitudes per row; returns ``(values [rows, k], indices int16 [rows, k], block_offsets)``."""
    rows, n = _rows(x.shape)
    x2 = x.reshape(rows, n)
    num_blocks = -(-n // _INDEX_BLOCK) if n > _INDEX_BLOCK else 0
    if rows == 0 or k == 0:
        return (
            x2.new_empty(rows, k),
            x2.new_empty(rows, k, dtype=torch.int16),
            x2.new_zeros(rows, num_blocks, dtype=torch.int32),
        )
    order = torch.sort(_magnitude_key(x2), dim=1, descending=True, stable=True).indices[:, :k]
    cols = order.sort(dim=1).values
    low = cols & (_INDEX_BLOCK - 1)
    indices = ((low ^ 0x8000) - 0x8000).to(torch.int16)  # uint16 stored in int16's two's complement
    starts = torch.arange(num_blocks, device=x.device, dtype=torch.int64) * _INDEX_BLOCK
    block_offsets = torch.searchsorted(cols, starts.expand(rows, num_blocks).contiguous(), out_int32=True)
    return _bits_view(x2).gather(1, cols).view(x.dtype), indices, block_offsets


def densify(
    values: torch.Tensor, indices: torch.Tensor, block_offsets: torch.Tensor, shape: Sequence[int]
) -> torch.Tensor:
    """Inverse of :func:`sparsify`: kept values at their columns, zero elsewhere, reshaped to ``shape``."""
    rows, n = _rows(shape)
    out = _bits_view(values.new_zeros(rows, n))
    k = values.shape[1]
    if rows == 0 or k == 0:
        return out.view(values.dtype).view(tuple(shape))
    cols = indices.to(torch.int64) & (_INDEX_BLOCK - 1)
    if block_offsets.shape[1]:
        j = torch.arange(k, device=values.device, dtype=torch.int32).expand(rows, k).contiguous()
        block = torch.searchsorted(block_offsets.contiguous(), j, right=True) - 1
        cols = cols + block * _INDEX_BLOCK
    return out.scatter_(1, cols, _bits_view(values)).view(values.dtype).view(tuple(shape))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Boolean tensor to uint8 ``[ceil(numel / 8)]``, element ``i`` at bit ``i % 8`` of byte ``i // 8``."""
    flat = mask.reshape(-1).to(torch.uint8)
    return _pack_codes(flat, 1)


def unpack_bits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape``."""
    return _unpack_codes(packed, 1, math.prod(shape)).to(torch.bool).view(tuple(shape))


def update_norms(
    before: Sequence[torch.Tensor], after: Sequence[torch.Tensor], metric: str, eps: float
) -> torch.Tensor:
    """Relative change of each ``(before[i], after[i])`` pair as float32 ``[len(before)]`` (see module doc)."""
    out = []
    for b, a in zip(before, after, strict=True):
        b64 = b.detach().to(torch.float32).to(torch.float64)
        d = a.detach().to(torch.float32).to(torch.float64) - b64
        if metric == "rel_l2":
            value = d.square().sum().sqrt() / b64.square().sum().sqrt().clamp_min(eps)
        elif metric != "rel_l1_mean":
            raise ValueError(f"metric must be 'rel_l2' or 'rel_l1_mean', got {metric!r}")
        elif b.numel() == 0:
            value = d.new_zeros(())
        else:
            value = (d.abs() / b64.abs().clamp_min(eps)).mean()
        out.append(value)
    device = before[0].device if len(before) else torch.device("cpu")
    if not out:
        return torch.zeros(0, dtype=torch.float32, device=device)
    return torch.stack(out).to(torch.float32)
