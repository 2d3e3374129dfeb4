"""Public op API: argument checks, backend choice and fake (meta) kernels.

Each function runs the compiled ``torch.ops.slimfit`` kernel for the input's device when one is
registered, and the plain-PyTorch reference in :mod:`slimfit.reference` otherwise (extension missing,
``SLIMFIT_FORCE_REFERENCE=1``, or a device without a kernel). Both produce identical results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from slimfit import reference
from slimfit._extension import STATUS, has_kernel, registered_ops
from slimfit.codecs import PackedBits, QuantizedTensor, SparseTensor

QUANT_BITS = (2, 4, 8)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The update_norms metrics, the default first, each with the floor of its denominator: keeps all-zero and
# zero-valued weights finite.
NORM_EPS = {"rel_l1_mean": 1e-8, "rel_l2": 1e-12}


# (op, dispatch key) -> compiled kernel, looked up once at import: torch.compile cannot trace the dispatcher
# query, but it can read a dict of constants.
_KERNELS: dict[tuple[str, str], Callable] = {
    (op, key): getattr(torch.ops.slimfit, op)
    for op in registered_ops()
    for key in ("CPU", "CUDA")
    if has_kernel(op, key)
}


def _kernel(op: str, device: torch.device) -> Callable:
    """The compiled kernel for ``op`` on ``device`` if registered, else the reference function."""
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else ""
    return _KERNELS.get((op, key)) or getattr(reference, op)


def _check_choice(name: str, value, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {list(accepted)}, got {value!r}")


def _check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must have dtype float32, float16 or bfloat16, got {x.dtype}")


def _check_same_device(tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor of one call on the first one's device: kernels read them all through that device."""
    items = list(tensors.items())
    for name, t in items[1:]:
        if t.device != items[0][1].device:
            raise ValueError(f"{name} must be on the device of {items[0][0]} ({items[0][1].device}), got {t.device}")


def _draw_seed() -> int:
    """A 32-bit seed from torch's default generator, so stochastic rounding follows torch.manual_seed."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


def quantize(x: torch.Tensor, bits: int = 8, group_size: int = 128, stochastic: bool = False) -> QuantizedTensor:
    """Per-group quantization of ``x`` (any shape) to ``bits`` in {2, 4, 8}.

    Footprint: ``ceil(numel * bits / 8)`` code bytes plus 4 bytes (bf16 scale and offset) per group of
    ``group_size`` consecutive elements. Round-to-nearest error is at most half a step (``scale / 2``);
    ``stochastic=True`` rounds up or down with probability given by the distance (unbiased).
    """
    _check_float_tensor("x", x)
    _check_choice("bits", bits, QUANT_BITS)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(stochastic, bool):
        raise ValueError(f"stochastic must be a bool, got {stochastic!r}")
    seed = _draw_seed() if stochastic else None
    codes, scale, offset = _kernel("quantize", x.device)(x, bits, group_size, seed)
    return QuantizedTensor(codes, scale, offset, bits, group_size, tuple(x.shape), x.dtype)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Restore a :class:`QuantizedTensor` to its original shape, dtype and device."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    _check_same_device({"q.codes": q.codes, "q.scale": q.scale, "q.offset": q.offset})
    fn = _kernel("dequantize", q.codes.device)
    return fn(q.codes, q.scale, q.offset, q.bits, q.group_size, list(q.shape), q.dtype)


def keep_count(n: int, keep: float) -> int:
    """Entries kept per row of length ``n``: ``ceil(keep * n)``, at least 1 when ``n > 0``.

    The product is taken with a 1e-9 tolerance so that e.g. ``keep=0.1, n=30`` keeps 3, not 4.
    """
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(keep * n - 1e-9)))


def sparsify(x: torch.Tensor, keep: float = 0.1) -> SparseTensor:
    """Keep the ``ceil(keep * n)`` largest-magnitude entries of each row (last dimension, length ``n``).

    Values stay exact in ``x``'s dtype; each kept entry costs ``element_size + 2`` bytes (uint16 column
    offsets; rows longer than 65536 add 4 bytes per 65536-column block). NaN ranks above Inf and is kept;
    ties go to the lower column. ``densify`` restores ``x`` with every other entry zero.
    """
    _check_float_tensor("x", x)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a number in (0, 1], got {keep!r}")
    k = keep_count(x.shape[-1] if x.dim() else 1, float(keep))
    values, indices, block_offsets = _kernel("sparsify", x.device)(x, k)
    return SparseTensor(values, indices, block_offsets, tuple(x.shape))


def densify(s: SparseTensor) -> torch.Tensor:
    """Dense tensor of ``s``'s original shape, dtype and device: kept values, zero elsewhere."""
    if not isinstance(s, SparseTensor):
        raise TypeError(f"s must be a SparseTensor, got {type(s).__name__}")
    _check_same_device({"s.values": s.values, "s.indices": s.indices, "s.block_offsets": s.block_offsets})
    fn = _kernel("densify", s.values.device)
    return fn(s.values, s.indices, s.block_offsets, list(s.shape))


def pack_bits(mask: torch.Tensor) -> PackedBits:
    """Pack a bool tensor (any shape) into ``ceil(numel / 8)`` bytes, 1 bit per element."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must have dtype torch.bool, got {mask.dtype}")
    return PackedBits(_kernel("pack_bits", mask.device)(mask), tuple(mask.shape))


def unpack_bits(p: PackedBits) -> torch.Tensor:
    """The bool tensor that :func:`pack_bits` packed, with its original shape and device."""
    if not isinstance(p, PackedBits):
        raise TypeError(f"p must be a PackedBits, got {type(p).__name__}")
    return _kernel("unpack_bits", p.bits.device)(p.bits, list(p.shape))


def _check_pairs(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> None:
    for name, seq in (("before", before), ("after", after)):
        if not isinstance(seq, (list, tuple)):
            raise ValueError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if len(before) != len(after):
        raise ValueError(f"before and after must have the same length, got {len(before)} and {len(after)}")
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        _check_float_tensor(f"before[{i}]", b)
        _check_float_tensor(f"after[{i}]", a)
        if b.shape != a.shape:
            raise ValueError(
                f"before[{i}] and after[{i}] must have the same shape, got {tuple(b.shape)} and {tuple(a.shape)}"
            )
        if b.device != before[0].device or a.device != before[0].device:
            raise ValueError(
                f"all tensors must be on one device ({before[0].device}), got before[{i}] on {b.device} "
                f"and after[{i}] on {a.device}"
            )


def update_norms(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor], metric: str = "rel_l2") -> torch.Tensor:
    """How much each tensor moved, as float32 ``[len(before)]`` on the tensors' device.

    ``rel_l2``: ``||after - before||_2 / max(||before||_2, 1e-12)``. ``rel_l1_mean`` (the original SlimFit
    score, made safe): ``mean(|after - before| / max(|before|, 1e-8))``, 0 for empty tensors. Accumulated in
    float64; a NaN or Inf in one pair only affects its own entry. Pairs may differ in dtype and shape.
    """
    _check_choice("metric", metric, tuple(NORM_EPS))
    _check_pairs(before, after)
    if not before:
        return torch.zeros(0, dtype=torch.float32)
    with torch.no_grad():
        fn = _kernel("update_norms", before[0].device)
        return fn([b.detach() for b in before], [a.detach() for a in after], metric, NORM_EPS[metric])


def _register_fakes() -> None:
    """Shape-only kernels so torch.compile and opcheck can trace the compiled ops."""
    ops = set(registered_ops())

    @torch.library.register_fake("slimfit::quantize")
    def _quantize_fake(x, bits, group_size, seed):
        n = x.numel()
        groups = -(-n // group_size)
        codes = x.new_empty((n * bits + 7) // 8, dtype=torch.uint8)
        return codes, x.new_empty(groups, dtype=torch.bfloat16), x.new_empty(groups, dtype=torch.bfloat16)

    @torch.library.register_fake("slimfit::dequantize")
    def _dequantize_fake(codes, scale, offset, bits, group_size, shape, dtype):
        _check_same_device({"codes": codes, "scale": scale, "offset": offset})
        return codes.new_empty(shape, dtype=dtype)

    if "sparsify" not in ops:  # an extension built before these ops existed
        return

    @torch.library.register_fake("slimfit::sparsify")
    def _sparsify_fake(x, k):
        n = x.shape[-1] if x.dim() else 1
        rows = x.numel() // n if n else math.prod(x.shape[:-1])
        blocks = -(-n // 65536) if n > 65536 else 0
        return (
            x.new_empty(rows, k),
            x.new_empty(rows, k, dtype=torch.int16),
            x.new_empty(rows, blocks, dtype=torch.int32),
        )

    @torch.library.register_fake("slimfit::densify")
    def _densify_fake(values, indices, block_offsets, shape):
        _check_same_device({"values": values, "indices": indices, "block_offsets": block_offsets})
        return values.new_empty(shape)

    @torch.library.register_fake("slimfit::pack_bits")
    def _pack_bits_fake(mask):
        return mask.new_empty((mask.numel() + 7) // 8, dtype=torch.uint8)

    @torch.library.register_fake("slimfit::unpack_bits")
    def _unpack_bits_fake(packed, shape):
        return packed.new_empty(shape, dtype=torch.bool)

    @torch.library.register_fake("slimfit::update_norms")
    def _update_norms_fake(before, after, metric, eps):
        _check_same_device(
            {f"{side}[{i}]": t for side, seq in (("before", before), ("after", after)) for i, t in enumerate(seq)}
        )
        return before[0].new_empty(len(before), dtype=torch.float32)


if STATUS.loaded:
    _register_fakes()
