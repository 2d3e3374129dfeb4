"""Loads the compiled extension (``slimfit._C``) or explains why the reference path is used instead."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

FORCE_REFERENCE_ENV = "SLIMFIT_FORCE_REFERENCE"
REBUILD_HINT = "rebuild with: pip install --no-build-isolation --force-reinstall --no-deps ."


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    reason: str | None  # why it is not loaded; None when loaded


def _load() -> ExtensionStatus:
    if os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0"):
        return ExtensionStatus(False, f"{FORCE_REFERENCE_ENV} is set; using the pure-PyTorch reference ops")
    try:
        from slimfit import _C  # noqa: F401  (importing registers torch.ops.slimfit.*)
    except ImportError as exc:
        return ExtensionStatus(False, f"slimfit._C could not be imported ({exc}); {REBUILD_HINT}")
    except OSError as exc:  # ABI mismatch or a missing shared library
        return ExtensionStatus(False, f"slimfit._C failed to load ({exc}); {REBUILD_HINT}")
    return ExtensionStatus(True, None)


STATUS = _load()
if not STATUS.loaded and os.environ.get(FORCE_REFERENCE_ENV, "") in ("", "0"):
    warnings.warn(f"slimfit: compiled kernels unavailable, using the reference path: {STATUS.reason}", stacklevel=2)


def registered_ops() -> list[str]:
    """Names of the ops registered under ``torch.ops.slimfit`` (empty when the extension is not loaded)."""
    if not STATUS.loaded:
        return []
    prefix = "slimfit::"
    return sorted(n[len(prefix) :] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``slimfit::op`` has a kernel registered for ``dispatch_key`` (e.g. "CPU", "CUDA")."""
    return STATUS.loaded and torch._C._dispatch_has_kernel_for_dispatch_key(f"slimfit::{op}", dispatch_key)


def cuda_kernels_compiled() -> bool:
    """True when the extension was built with its CUDA sources (checked on the first op)."""
    return has_kernel("quantize", "CUDA")
