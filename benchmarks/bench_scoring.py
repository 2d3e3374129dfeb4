"""Do sampled update scores choose the same layers as exact ones? One training run, both scorers on every step.

SlimFit trains the bundled MiniLM on BBC News with ``scoring="exact"`` (the schedule follows exact scores); a
second, sampled :class:`slimfit.scoring.UpdateScorer` snapshots the same layers before every optimizer step and
scores them after it, on the same weights. Per step it records each layer's relative error
``|sampled - exact| / exact`` and the share of the next trainable set that the scheduler would choose from the
sampled scores which equals the set chosen from the exact ones (same scheduler state, same ``K``). Sets are compared
after the warm-up (while some layer was never scored, pending layers come first whatever the scores).

Usage (one CPU thread, about 1 s per step on a shared core):
    OMP_NUM_THREADS=1 python benchmarks/bench_scoring.py --metric rel_l1_mean [--steps N] [--csv steps.csv]
"""

from __future__ import annotations

import argparse
import csv
import time

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from slimfit import SlimFit
from slimfit.finetune.options import FinetuneConfig
from slimfit.scheduler import InterLayerScheduler
from slimfit.scoring import UpdateScorer
from slimfit.tasks import prepare
from slimfit.tasks.base import quiet_transformers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric", default="rel_l1_mean", choices=["rel_l1_mean", "rel_l2"])
    parser.add_argument("--freeze-ratio", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="default: one epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", help="write one row per step here")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    _, task = prepare(FinetuneConfig(max_length=args.max_length, batch_size=args.batch_size, seed=args.seed))
    with quiet_transformers():
        model = task.build_model()
    model.train()
    loader = torch.utils.data.DataLoader(
        task.train_dataset,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=task.collator,
        generator=torch.Generator().manual_seed(args.seed),
    )
    steps = args.steps or len(loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, round(0.06 * steps), steps)
    sf = SlimFit(model, optimizer, freeze_ratio=args.freeze_ratio, metric=args.metric, scoring="exact", seed=args.seed)
    sampled = UpdateScorer([layer.param for layer in sf.layers], args.metric, "sampled", args.seed)
    index = {name: i for i, name in enumerate(sf.layer_names)}
    seconds = []

    def snapshot(_optimizer, _args, _kwargs) -> None:
        start = time.perf_counter()
        rates = [optimizer.param_groups[0]["lr"]] * sf.num_trainable
        sampled.snapshot([index[name] for name in sf.trainable_layers()], rates)
        seconds.append(time.perf_counter() - start)

    optimizer.register_step_pre_hook(snapshot)
    rows = []
    batches = iter(loader)
    for step in range(steps):
        loss = model(**next(batches)).loss
        loss.backward()
        warming_up = not bool(sf.scheduler.scored.all())  # pending layers come first whatever the scores
        optimizer.step()
        before_step = sf.scheduler.state_dict()
        sf.step()
        start = time.perf_counter()
        layers, scores = sampled.score()
        seconds[-1] += time.perf_counter() - start
        schedule.step()
        optimizer.zero_grad()
        exact = sf.scheduler.scores[layers].double()
        errors = ((scores.double() - exact).abs() / exact).tolist() if layers else []
        alternative = InterLayerScheduler(len(sf.layers), sf.num_trainable, torch.Generator())  # state loaded next
        alternative.load_state_dict(before_step)
        alternative.step(layers, scores)
        overlap = len(set(alternative.trainable) & set(sf.scheduler.trainable)) / sf.num_trainable
        rows.append(
            {
                "step": step + 1,
                "loss": loss.item(),
                "warm_up": warming_up,
                "mean_rel_error": float(np.mean(errors)) if errors else float("nan"),
                "max_rel_error": max(errors, default=float("nan")),
                "next_set_overlap": overlap,
                "sampled_seconds": seconds[-1],
            }
        )
        print(
            f"step {step + 1}/{steps} loss {loss.item():.4f} error mean {rows[-1]['mean_rel_error']:.4f} "
            f"max {rows[-1]['max_rel_error']:.4f} overlap {overlap:.2f}",
            flush=True,
        )
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    scored = [row for row in rows if not np.isnan(row["mean_rel_error"])]
    means = np.array([row["mean_rel_error"] for row in scored])
    maxima = np.array([row["max_rel_error"] for row in scored])
    overlaps = np.array([row["next_set_overlap"] for row in rows if not row["warm_up"]])
    summary = {
        "steps (scored)": f"{steps} ({len(scored)}), K = {sf.num_trainable} of {len(sf.layers)} layers",
        "relative error, mean over steps of the step mean": f"{means.mean():.4f} (worst step {means.max():.4f})",
        "relative error, worst layer of a step": f"median {np.median(maxima):.4f}, worst {maxima.max():.4f}",
        "next trainable set identical (after warm-up)": f"{np.mean(overlaps == 1.0):.4f} of {len(overlaps)} steps",
        "next trainable set overlap (after warm-up)": f"mean {overlaps.mean():.4f}, min {overlaps.min():.2f}",
        "scoring peak bytes, sampled vs exact": f"{sampled.peak_bytes} vs {sf.scoring_bytes} "
        f"({sampled.peak_bytes / sf.scoring_bytes:.4%})",
        "sampled snapshot + score per step": f"{np.mean(seconds) * 1e3:.1f} ms",
    }
    print(f"metric {args.metric}")
    for name, value in summary.items():
        print(f"  {name}: {value}")


if __name__ == "__main__":
    main()
