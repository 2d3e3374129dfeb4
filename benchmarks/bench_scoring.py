"""Do rebuilt and sampled update scores choose the same layers as whole copies? One run, three scorers every step.

SlimFit trains the bundled MiniLM on BBC News with its default scoring. Beside it, three
:class:`slimfit.scoring.UpdateScorer` score the same trained layers at every optimizer step, on the same weights:
``copy`` (whole copies taken before the step, the reference), ``rebuilt`` (from AdamW's moments, no copy: what
``scoring="auto"`` does) and ``sampled``. Per step it records each layer's relative error ``|x - copy| / copy`` and
whether the next trainable set the scheduler would choose from each scorer's scores (same scheduler state, same
``K``) equals the one chosen from the copies' scores. Sets are compared after the warm-up (while some layer was
never scored, pending layers come first whatever the scores).

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
    sf = SlimFit(
        model, optimizer, freeze_ratio=args.freeze_ratio, freeze_unit="layers", metric=args.metric, seed=args.seed
    )
    params = [layer.param for layer in sf.layers]
    scorers = {
        "copy": UpdateScorer(params, args.metric, "exact"),  # no optimizer given: whole copies
        "rebuilt": UpdateScorer(params, args.metric, "auto", args.seed, optimizer),
        "sampled": UpdateScorer(params, args.metric, "sampled", args.seed),
    }
    index = {name: i for i, name in enumerate(sf.layer_names)}
    seconds = {name: [] for name in scorers}

    def snapshot(_optimizer, _args, _kwargs) -> None:
        rates = [optimizer.param_groups[0]["lr"]] * sf.num_trainable
        for name, scorer in scorers.items():
            start = time.perf_counter()
            scorer.snapshot([index[layer] for layer in sf.trainable_layers()], rates)
            seconds[name].append(time.perf_counter() - start)

    optimizer.register_step_pre_hook(snapshot)
    rows = []
    batches = iter(loader)
    for step in range(steps):
        loss = model(**next(batches)).loss
        loss.backward()
        warming_up = not bool(sf.scheduler.scored.all())  # pending layers come first whatever the scores
        optimizer.step()
        before_step = sf.scheduler.state_dict()
        scores = {}
        for name, scorer in scorers.items():
            start = time.perf_counter()
            scores[name] = scorer.score()
            seconds[name][-1] += time.perf_counter() - start
        sf.step()
        schedule.step()
        optimizer.zero_grad()
        row = {"step": step + 1, "loss": loss.item(), "warm_up": warming_up}
        reference = _next_set(sf, before_step, *scores["copy"])
        for name in ("rebuilt", "sampled"):
            layers, values = scores[name]
            exact = scores["copy"][1].double()
            errors = ((values.double() - exact).abs() / exact).tolist() if layers else []
            row[f"{name}_mean_rel_error"] = float(np.mean(errors)) if errors else float("nan")
            row[f"{name}_max_rel_error"] = max(errors, default=float("nan"))
            row[f"{name}_next_set_overlap"] = len(_next_set(sf, before_step, layers, values) & reference) / len(
                reference
            )
            row[f"{name}_seconds"] = seconds[name][-1]
        rows.append(row)
        print(
            f"step {step + 1}/{steps} loss {loss.item():.4f} "
            + " ".join(
                f"{n}: error {row[f'{n}_mean_rel_error']:.2e} overlap {row[f'{n}_next_set_overlap']:.2f}"
                for n in ("rebuilt", "sampled")
            ),
            flush=True,
        )
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(f"metric {args.metric}; steps {steps}, K = {sf.num_trainable} of {len(sf.layers)} layers")
    for name in ("rebuilt", "sampled"):
        scored = [row for row in rows if not np.isnan(row[f"{name}_mean_rel_error"])]
        means = np.array([row[f"{name}_mean_rel_error"] for row in scored])
        maxima = np.array([row[f"{name}_max_rel_error"] for row in scored])
        overlaps = np.array([row[f"{name}_next_set_overlap"] for row in rows if not row["warm_up"]])
        summary = {
            "relative error, mean over steps of the step mean": f"{means.mean():.3g} (worst step {means.max():.3g})",
            "relative error, worst layer of a step": f"median {np.median(maxima):.3g}, worst {maxima.max():.3g}",
            "next trainable set identical (after warm-up)": f"{np.mean(overlaps == 1.0):.4f} of {len(overlaps)} steps",
            "next trainable set overlap (after warm-up)": f"mean {overlaps.mean():.4f}, min {overlaps.min():.2f}",
            "peak bytes vs the copies'": f"{scorers[name].peak_bytes} vs {scorers['copy'].peak_bytes} "
            f"({scorers[name].peak_bytes / scorers['copy'].peak_bytes:.4%})",
            "snapshot + score per step": f"{np.mean(seconds[name]) * 1e3:.1f} ms "
            f"(copy: {np.mean(seconds['copy']) * 1e3:.1f} ms)",
        }
        print(f"  {name}:")
        for label, value in summary.items():
            print(f"    {label}: {value}")


def _next_set(sf: SlimFit, state: dict, layers: list[int], scores: torch.Tensor) -> set[int]:
    """The trainable set the scheduler in ``state`` would choose from ``scores`` of ``layers``."""
    scheduler = InterLayerScheduler(len(sf.layers), sf.num_trainable, torch.Generator())  # state loaded next
    scheduler.load_state_dict(state)
    scheduler.step(layers, scores)
    return set(scheduler.trainable)


if __name__ == "__main__":
    main()
