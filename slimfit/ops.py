"""Public op API: argument checks, backend choice and fake (meta) kernels.

Each function runs the compiled ``torch.ops.slimfit`` kernel for the input's device when one is
registered, and the plain-PyTorch reference in :mod:`slimfit.reference` otherwise (extension missing,
``SLIMFIT_FORCE_REFERENCE=1``, or a device without a kernel). Both produce identical results.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimfit import reference
from slimfit._extension import STATUS, has_kernel
from slimfit.codecs import QuantizedTensor

QUANT_BITS = (2, 4, 8)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel(op: str, device: torch.device) -> Callable:
    """The compiled kernel for ``op`` on ``device`` if registered, else the reference function."""
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    if key is not None and has_kernel(op, key):
        return getattr(torch.ops.slimfit, op)
    return getattr(reference, op)


def _check_choice(name: str, value, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {list(accepted)}, got {value!r}")


def _check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must have dtype float32, float16 or bfloat16, got {x.dtype}")


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
    fn = _kernel("dequantize", q.codes.device)
    return fn(q.codes, q.scale, q.offset, q.bits, q.group_size, list(q.shape), q.dtype)


def _register_fakes() -> None:
    """Shape-only kernels so torch.compile and opcheck can trace the compiled ops."""

    @torch.library.register_fake("slimfit::quantize")
    def _quantize_fake(x, bits, group_size, seed):
        n = x.numel()
        groups = -(-n // group_size)
        codes = x.new_empty((n * bits + 7) // 8, dtype=torch.uint8)
        return codes, x.new_empty(groups, dtype=torch.bfloat16), x.new_empty(groups, dtype=torch.bfloat16)

    @torch.library.register_fake("slimfit::dequantize")
    def _dequantize_fake(codes, scale, offset, bits, group_size, shape, dtype):
        return codes.new_empty(shape, dtype=dtype)


if STATUS.loaded:
    _register_fakes()
