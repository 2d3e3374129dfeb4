"""What `slimfit info` reports: versions, whether the compiled kernels load, and which ops they provide."""

from __future__ import annotations

import platform
from typing import Any

import torch

from slimfit._extension import STATUS, cuda_kernels_compiled, has_kernel, registered_ops
from slimfit._version import __version__


def collect() -> dict[str, Any]:
    """A JSON-serialisable description of this installation."""
    ops = registered_ops()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "extension_loaded": STATUS.loaded,
        "extension_reason": STATUS.reason,
        "cuda_kernels_compiled": cuda_kernels_compiled(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "ops": ops,
        "kernels": {op: [key for key in ("CPU", "CUDA") if has_kernel(op, key)] for op in ops},
    }


def render(info: dict[str, Any]) -> str:
    """Human-readable form of :func:`collect`'s result."""
    lines = [
        f"slimfit {info['version']}  (torch {info['torch']}, CUDA build: {info['torch_cuda'] or 'no'}, "
        f"Python {info['python']})",
        f"platform          {info['platform']}, {info['cpu_threads']} CPU threads",
        f"compiled kernels  {'loaded' if info['extension_loaded'] else 'NOT loaded'}",
    ]
    if not info["extension_loaded"]:
        lines.append(f"  reason          {info['extension_reason']}")
        lines.append("  effect          every op runs its pure-PyTorch reference (correct, slower)")
    lines.append(f"CUDA kernels      {'compiled' if info['cuda_kernels_compiled'] else 'not compiled'}")
    devices = ", ".join(info["cuda_devices"]) or "none"
    lines.append(f"CUDA devices      {devices}")
    lines.append("ops               " + ("none" if not info["ops"] else ""))
    for op, keys in info["kernels"].items():
        lines.append(f"  slimfit::{op:<14} kernels: {', '.join(keys) or 'none'}")
    return "\n".join(lines)
