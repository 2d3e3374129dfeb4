"""Kernel vs plain-PyTorch reference timings for every slimfit op, measured side by side in one run.

CPU: each op's compiled kernel against its reference (slimfit.reference) on a 64 MB float32 tensor
(16M elements, rows of 4096), and update_norms over all BERT-base weights against a perturbed copy.
CUDA (when available): achieved GB/s of each kernel (bytes read + written) against ``copy_`` of the
input's bytes. Kernel and reference runs alternate so load from other processes hits both alike.

    python benchmarks/bench_ops.py [--repeats 3] [--out benchmarks/results/ops-<date>-<host>.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import slimfit
from slimfit import reference
from slimfit._extension import STATUS, has_kernel

ops = torch.ops.slimfit


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def side_by_side(kernel, ref, repeats: int, sync=lambda: None) -> tuple[float, float]:
    """Median seconds of kernel and reference, interleaved after one warm-up call each."""
    kernel()
    ref()
    k_times, r_times = [], []
    for _ in range(repeats):
        k_times.append(timed(kernel, sync))
        r_times.append(timed(ref, sync))
    return statistics.median(k_times), statistics.median(r_times)


def bert_pairs() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig())
    before = [p.detach() for p in model.parameters()]
    after = [p + 1e-3 * torch.randn_like(p) for p in before]
    return before, after


def cpu_tensor_rows(repeats: int) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    x = torch.randn(4096, 4096)  # 64 MB float32
    n = x.numel()
    rows = []
    for bits in (8, 4, 2):
        k, r = side_by_side(
            lambda b=bits: ops.quantize(x, b, 128, None), lambda b=bits: reference.quantize(x, b, 128, None), repeats
        )
        rows.append((f"quantize {bits}-bit, group 128", k, r))
    k, r = side_by_side(lambda: ops.quantize(x, 8, 128, 1), lambda: reference.quantize(x, 8, 128, 1), repeats)
    rows.append(("quantize 8-bit stochastic", k, r))
    for bits in (8, 4, 2):
        q = ops.quantize(x, bits, 128, None)
        args = (*q, bits, 128, [n], torch.float32)
        k, r = side_by_side(lambda a=args: ops.dequantize(*a), lambda a=args: reference.dequantize(*a), repeats)
        rows.append((f"dequantize {bits}-bit", k, r))
    keep = slimfit.ops.keep_count(4096, 0.1)
    k, r = side_by_side(lambda: ops.sparsify(x, keep), lambda: reference.sparsify(x, keep), repeats)
    rows.append(("sparsify keep 0.1, rows of 4096", k, r))
    s = ops.sparsify(x, keep)
    k, r = side_by_side(lambda: ops.densify(*s, [4096, 4096]), lambda: reference.densify(*s, [4096, 4096]), repeats)
    rows.append(("densify", k, r))
    mask = x > 0
    k, r = side_by_side(lambda: ops.pack_bits(mask), lambda: reference.pack_bits(mask), repeats)
    rows.append(("pack_bits (16M bools)", k, r))
    packed = ops.pack_bits(mask)
    k, r = side_by_side(lambda: ops.unpack_bits(packed, [n]), lambda: reference.unpack_bits(packed, [n]), repeats)
    rows.append(("unpack_bits", k, r))
    return rows


def cpu_norm_rows(repeats: int) -> list[tuple[str, float, float]]:
    rows = []
    before, after = bert_pairs()
    for metric, eps in slimfit.ops.NORM_EPS.items():
        k, r = side_by_side(
            lambda m=metric, e=eps: ops.update_norms(before, after, m, e),
            lambda m=metric, e=eps: reference.update_norms(before, after, m, e),
            repeats,
        )
        rows.append((f"update_norms {metric}, BERT-base ({len(before)} tensors)", k, r))
    return rows


def device_rows(repeats: int, device: str = "cuda") -> list[tuple[str, float, float]]:
    """(op, GB/s of the kernel, GB/s of copy_ of the input's bytes) on ``device``."""

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    x = torch.randn(4096, 4096, device=device)
    n = x.numel()

    def copy_rate(nbytes: int) -> float:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t, _ = side_by_side(lambda: dst.copy_(src), lambda: None, repeats * 3, sync)
        return 2 * nbytes / t / 1e9  # read + write

    rows = []

    def add(name: str, fn, moved: int, input_bytes: int) -> None:
        t, _ = side_by_side(fn, lambda: None, repeats * 3, sync)
        rows.append((name, moved / t / 1e9, copy_rate(input_bytes)))

    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        for bits in (8, 4, 2):
            q = ops.quantize(xd, bits, 128, None)
            out_bytes = sum(t.numel() * t.element_size() for t in q)
            add(
                f"quantize {bits}-bit {dtype}",
                lambda b=bits, t=xd: ops.quantize(t, b, 128, None),
                xd.nbytes + out_bytes,
                xd.nbytes,
            )
            args = (*q, bits, 128, [n], dtype)
            add(f"dequantize {bits}-bit {dtype}", lambda a=args: ops.dequantize(*a), xd.nbytes + out_bytes, xd.nbytes)
    keep = slimfit.ops.keep_count(4096, 0.1)
    add("sparsify keep 0.1", lambda: ops.sparsify(x, keep), x.nbytes, x.nbytes)
    mask = x > 0
    add("pack_bits", lambda: ops.pack_bits(mask), n + n // 8, n)
    before, after = ([t.to(device) for t in ts] for ts in bert_pairs())
    total = sum(t.nbytes for t in before) * 2
    add("update_norms rel_l2, BERT-base", lambda: ops.update_norms(before, after, "rel_l2", 1e-12), total, total)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per op (median reported)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (default under results/)")
    parser.add_argument("--note", default="", help="free text recorded in the file (e.g. machine load)")
    args = parser.parse_args()
    if not STATUS.loaded:
        raise SystemExit(f"slimfit extension not loaded ({STATUS.reason}); nothing to compare")

    now = datetime.datetime.now(datetime.timezone.utc)
    host = platform.node() or "host"
    cores = os.cpu_count()
    header = [
        f"# slimfit op benchmark, {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {host}, {cpu_model()}, {cores} cores, {torch.get_num_threads()} torch threads",
        f"- torch {torch.__version__}, slimfit {slimfit.__version__}, Python {platform.python_version()}",
        "- inputs: 4096 x 4096 float32 (64 MB) from randn; quantize group 128; sparsify keep 0.1 per row of 4096;"
        " pack_bits on x > 0; update_norms over BertModel(BertConfig()) parameters vs params + 1e-3 * randn",
        "- reference: slimfit.reference (the plain-PyTorch spec); kernel: torch.ops.slimfit (compiled C++/OpenMP)",
        f"- load average before: {load_average()}",
    ]
    if args.note:
        header.append(f"- note: {args.note}")
    lines = header + [
        "",
        f"## CPU: compiled kernel vs plain-PyTorch reference (median of {args.repeats}, interleaved)",
        "",
        "| op | kernel ms | reference ms | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for name, k, r in cpu_tensor_rows(args.repeats) + cpu_norm_rows(args.repeats):
        lines.append(f"| {name} | {k * 1e3:.1f} | {r * 1e3:.1f} | {r / k:.2f}x |")
        print(lines[-1], flush=True)
    if torch.cuda.is_available() and has_kernel("quantize", "CUDA"):
        lines += [
            "",
            f"## CUDA ({torch.cuda.get_device_name()}): kernel GB/s vs copy_ of the input bytes",
            "",
            "| op | kernel GB/s | copy_ GB/s | fraction of copy_ |",
            "|---|---:|---:|---:|",
        ]
        for name, rate, copy in device_rows(args.repeats):
            lines.append(f"| {name} | {rate:.0f} | {copy:.0f} | {rate / copy:.0%} |")
            print(lines[-1], flush=True)
    lines += ["", f"- load average after: {load_average()}", ""]
    out = args.out or Path(__file__).parent / "results" / f"ops-{now:%Y%m%d}-{host}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
