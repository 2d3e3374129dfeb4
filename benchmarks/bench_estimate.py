"""`slimfit estimate` against measured runs: predicted and measured peak bytes by category, side by side.

For each case (model x batch x length x method) the prediction is :func:`slimfit.finetune.estimate.estimate` and
the measurement a real run of the same configuration through :func:`slimfit.finetune.loop.run`: 4 optimizer steps
for full fine-tuning, 3 SlimFit warm-ups plus 2 steps for SlimFit (its peak comes from the layer sets it chooses,
which change every step). Models are built from their published configurations with random weights (no pretrained
BERT-base, ViT-base or Llama installs here) and saved with a tokenizer or image processor into a temporary folder:

- MiniLM-L6: the bundled pretrained model on BBC News (the default `slimfit finetune` run: 16 x 128 tokens);
- BERT-base (``BertConfig()``) with the bundled MiniLM's tokenizer (the same 30,522-token uncased vocabulary) on
  BBC News, 8 x 128 tokens;
- ViT-base (``ViTConfig()``: 224 px, 16 px patches) on Fashion-MNIST class folders
  (``benchmarks/fashion_mnist_folders.py``, 20 images per class), batch 8;
- a Llama (hidden 512, 8 layers, 8 query / 4 key-value heads, MLP 1,408) with the MiniLM tokenizer, as a causal
  LM on BBC News articles (plain text, packed into 256-token blocks), batch 4.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_estimate.py [--out benchmarks/results/estimate-DATE-cpu.md]
       [--cases minilm bert vit llama]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import slimfit
from slimfit import tasks
from slimfit.data import default_data_dir
from slimfit.finetune import estimate, loop
from slimfit.finetune.options import FinetuneConfig
from slimfit.tasks.base import default_model_path

MiB = 2**20
CATEGORIES = ("weights", "gradients", "optimizer_state", "activations", "temporaries", "scoring", "total")
METHODS = (("full", None), ("slimfit", 0.9))


def minilm(_: Path) -> FinetuneConfig:
    return FinetuneConfig(batch_size=16, max_length=128)


def bert(root: Path) -> FinetuneConfig:
    folder = root / "bert-base"
    transformers.BertModel(transformers.BertConfig(), add_pooling_layer=True).save_pretrained(folder)  # no head
    transformers.AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return FinetuneConfig(model=str(folder), batch_size=8, max_length=128)


def vit(root: Path) -> FinetuneConfig:
    folder, images = root / "vit-base", root / "fashion-mnist"
    transformers.ViTModel(transformers.ViTConfig(), add_pooling_layer=False).save_pretrained(folder)  # no head
    transformers.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    script = Path(__file__).with_name("fashion_mnist_folders.py")
    subprocess.run([sys.executable, str(script), str(images), "--per-class", "20", "--test-per-class", "2"], check=True)
    return FinetuneConfig(model=str(folder), data=str(images / "train"), eval_data=str(images / "test"), batch_size=8)


def llama(root: Path) -> FinetuneConfig:
    folder, data = root / "llama", root / "bbc.csv"
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.eos_token = tokenizer.sep_token  # a causal LM ends texts with EOS; WordPiece calls it [SEP]
    tokenizer.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    files = sorted(f for topic in default_data_dir().iterdir() if topic.is_dir() for f in topic.iterdir())[:300]
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([f.read_text(encoding="utf-8", errors="replace")] for f in files)
    return FinetuneConfig(task="causal-lm", model=str(folder), data=str(data), batch_size=4, max_length=256)


CASES = {"minilm": minilm, "bert": bert, "vit": vit, "llama": llama}


def measured_steps(config: FinetuneConfig) -> int:
    return 4 if config.method == "full" else 3 * round(1 / (1 - config.freeze_ratio)) + 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            base = CASES[name](Path(tmp))
            base, task = tasks.prepare(base)
            for method, ratio in METHODS:
                config = dataclasses.replace(base, method=method, freeze_ratio=ratio or base.freeze_ratio)
                predicted = estimate.estimate(config, task)
                run = dataclasses.replace(config, max_steps=measured_steps(config))
                actual = loop.run(run, task, progress=False).memory
                label = f"{name} {config.batch_size} x {config.max_length or 'image'}, {method}"
                label += f" {ratio}" if ratio else ""
                rows.append((label, predicted, actual))
                print(label, {c: f"{predicted.get(c, 0) / MiB:.1f}/{actual.get(c, 0) / MiB:.1f}" for c in CATEGORIES})
    header = "| case | " + " | ".join(f"{c}: predicted / measured MiB" for c in CATEGORIES) + " |"
    lines = [header, "|---" * (len(CATEGORIES) + 1) + "|"]
    for label, predicted, actual in rows:
        cells = []
        for c in CATEGORIES:
            p, a = predicted.get(c, 0), actual.get(c, 0)
            error = f" ({(p - a) / a:+.1%})" if a else ""
            cells.append(f"{p / MiB:.1f} / {a / MiB:.1f}{error}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    stamp = (
        f"{datetime.date.today()} · {platform.machine()} · {torch.get_num_threads()} torch thread(s) · torch "
        f"{torch.__version__} · transformers {transformers.__version__} · slimfit {slimfit.__version__}"
    )
    text = "\n".join([stamp, "", *lines, ""])
    print(text)
    if args.out:
        args.out.write_text(f"# Predicted vs measured peak memory (`slimfit estimate`)\n\n{__doc__}\n{text}")


if __name__ == "__main__":
    main()
