"""Eager vs torch.compile step time and graph counts of a small BERT trained under SlimFit.

Three runs from the same seed on the same batches: eager, the whole model compiled, and each encoder layer
compiled on its own (regional compilation). Printed per run: wall time of all steps (compilation included),
median step time over the last half of the steps (after most compilation), graphs compiled, graph breaks,
distinct trainable sets seen, and the largest loss difference from eager. Dropout is off so that compiled
and eager runs draw no random numbers and their losses can be compared.

    python benchmarks/bench_compile.py [--steps 24] [--backend inductor] [--freeze-ratio 0.5]
        [--compression default] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
import torch._dynamo
import transformers
from torch._dynamo.utils import counters

import slimfit


def make_model(seed: int) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def run(mode: str, args: argparse.Namespace) -> dict[str, float]:
    torch._dynamo.reset()
    counters.clear()
    model = make_model(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compression = None if args.compression == "none" else "default"
    sf = slimfit.SlimFit(
        model, opt, freeze_ratio=args.freeze_ratio, freeze_unit="layers", compression=compression, seed=args.seed
    )
    call = model
    if mode == "compiled model":
        call = torch.compile(model, backend=args.backend)
    elif mode == "compiled layers":
        for layer in model.bert.encoder.layer:
            layer.compile(backend=args.backend)
    g = torch.Generator().manual_seed(args.seed + 1)
    losses, times, sets = [], [], set()
    start = time.perf_counter()
    for _ in range(args.steps):
        ids = torch.randint(0, 1000, (args.batch, args.seq), generator=g)
        sets.add(tuple(sf.trainable_layers()))
        t = time.perf_counter()
        loss = call(input_ids=ids, labels=(ids[:, 1] >= 500).long()).loss
        loss.backward()
        opt.step()
        sf.step()
        opt.zero_grad()
        losses.append(loss.item())
        times.append(time.perf_counter() - t)
    return {
        "total_s": time.perf_counter() - start,
        "step_ms": 1000 * statistics.median(times[len(times) // 2 :]),
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
        "sets": len(sets),
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--freeze-ratio", type=float, default=0.5)
    parser.add_argument("--compression", choices=["default", "none"], default="default")
    parser.add_argument("--recompile-limit", type=int, default=64, help="torch._dynamo.config.recompile_limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: stable timings on a shared machine)"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = args.recompile_limit

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads; BERT hidden 64 x 2 layers, batch {args.batch} x seq {args.seq}, "
        f"freeze_ratio {args.freeze_ratio}, {args.compression} compression, backend {args.backend}, {args.steps} steps"
    )
    results = {mode: run(mode, args) for mode in ("eager", "compiled model", "compiled layers")}
    eager = results["eager"]
    print(
        f"| run | total s (incl. compile) | median step ms (2nd half) | vs eager | graphs | graph breaks "
        f"| distinct trainable sets | max loss diff |\n|{'---|' * 8}"
    )
    for mode, r in results.items():
        diff = max(abs(a - b) for a, b in zip(r["losses"], eager["losses"], strict=True))
        print(
            f"| {mode} | {r['total_s']:.1f} | {r['step_ms']:.1f} | {r['step_ms'] / eager['step_ms']:.2f}x "
            f"| {r['graphs']} | {r['breaks']} | {r['sets']} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
