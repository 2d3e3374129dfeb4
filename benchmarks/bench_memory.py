"""Bytes by category for full fine-tuning, freezing alone, and SlimFit, on BERT-base and ViT-base.

Categories: weights, gradients and optimizer state (AdamW) on the model's device after one training step, and
activations saved for backward after one forward (measured by :class:`slimfit.memory.SavedTensorMeter`).
Freezing alone and SlimFit train the same set: SlimFit's first trainable set at seed 0 (``--freeze-unit``: what the
freeze ratio counts, the library's default unless given), without and with compression.

Batch 128 without running it: every saved tensor's size is affine in the batch size (token-proportional codes
and masks; per-call RNG states are constant; quantization groups never straddle a batch boundary here because
rows are multiples of the group size), so the saved bytes are measured at batch 1 and 2, extrapolated, and the
extrapolation is checked to equal the measurement at batch 8 exactly before batch 128 is reported.

Usage: python benchmarks/bench_memory.py [--out benchmarks/results/memory-DATE.md] [--models bert vit]
       [--causal-lm llama qwen2 gpt2] [--causal-lm-memory llama qwen2 gpt2] [--freeze-unit parameters|layers]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import warnings

import torch
import transformers

import slimfit
from slimfit.memory import SavedTensorMeter, gradient_bytes, optimizer_state_bytes, parameter_bytes
from slimfit.policy import CompressionPolicy
from slimfit.scheduler import FREEZE_UNITS

MiB = 2**20
FREEZE_RATIO = 0.9


def _model(name: str) -> tuple[torch.nn.Module, callable]:
    torch.manual_seed(0)
    if name == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig())

        def batch(b: int) -> dict:
            g = torch.Generator().manual_seed(b)
            return dict(input_ids=torch.randint(0, 30522, (b, 128), generator=g), labels=torch.arange(b) % 2)

        return model, batch
    if name == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=10))

        def batch(b: int) -> dict:
            g = torch.Generator().manual_seed(b)
            return dict(pixel_values=torch.randn(b, 3, 224, 224, generator=g), labels=torch.arange(b) % 10)

        return model, batch
    raise ValueError(f"model must be one of ['bert', 'vit'], got {name!r}")


def _family(name: str) -> tuple[torch.nn.Module, dict]:
    """A base-size model of a family (random init) and a batch of 8 (128 tokens, 384 for bert-qa, or 224 px
    images)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(8)
    text = dict(input_ids=torch.randint(5, 30000, (8, 128), generator=g), labels=torch.arange(8) % 2)
    image = dict(pixel_values=torch.randn(8, 3, 224, 224, generator=g), labels=torch.arange(8) % 2)
    if name == "electra":  # ElectraConfig() is the small model; this is ELECTRA-base
        cfg = transformers.ElectraConfig(
            hidden_size=768, embedding_size=768, num_attention_heads=12, intermediate_size=3072, num_labels=2
        )
        return transformers.ElectraForSequenceClassification(cfg), text
    if name == "bert-qa":  # SQuAD's setting: question answering over 384-token windows
        positions = torch.randint(0, 384, (2, 8), generator=g).sort(dim=0).values
        qa = dict(input_ids=torch.randint(5, 30000, (8, 384), generator=g), start_positions=positions[0])
        return transformers.BertForQuestionAnswering(transformers.BertConfig()), {**qa, "end_positions": positions[1]}
    classes = {
        "bert": ("BertForSequenceClassification", "BertConfig", text),
        "roberta": ("RobertaForSequenceClassification", "RobertaConfig", text),
        "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig", text),
        "vit": ("ViTForImageClassification", "ViTConfig", image),
        "deit": ("DeiTForImageClassification", "DeiTConfig", image),
    }
    model_cls, config_cls, batch = classes[name]
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(num_labels=2)), batch


def families_table(names: list[str], unit: str) -> str:
    """Saved-for-backward MiB at batch 8: full fine-tuning, SlimFit's first set frozen alone, and SlimFit."""
    lines = [
        "| model | full fine-tuning | freeze only | SlimFit | vs full | vs freeze |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        model, batch = _family(name)
        model.train()
        full = _saved(model, batch)
        frozen, slim = (_saved_under(model, batch, unit, policy) for policy in (None, CompressionPolicy()))
        lines.append(
            f"| {name} | {full / MiB:.1f} | {frozen / MiB:.1f} | {slim / MiB:.1f} | {full / slim:.1f}x "
            f"| {frozen / slim:.1f}x |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


CAUSAL_LMS = ("llama", "qwen2", "gpt2")


def _causal_lm(name: str) -> tuple[torch.nn.Module, dict]:
    """A 6-layer, hidden-512 causal LM (random init; Llama and Qwen2 with 8 query / 2 key-value heads, vocabulary
    32,000; GPT-2 with 50,257 and its tied head) and a batch of 4 x 512 tokens with labels."""
    torch.manual_seed(0)
    decoder = dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2
    )
    if name == "llama":
        model, vocab = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32000, **decoder)), 32000
    elif name == "qwen2":
        model, vocab = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=32000, **decoder)), 32000
    elif name == "gpt2":
        config = transformers.GPT2Config(n_embd=512, n_layer=6, n_head=8, n_positions=512)
        model, vocab = transformers.GPT2LMHeadModel(config), config.vocab_size
    else:
        raise ValueError(f"causal LM must be one of {list(CAUSAL_LMS)}, got {name!r}")
    ids = torch.randint(0, vocab, (4, 512), generator=torch.Generator().manual_seed(4))
    return model, dict(input_ids=ids, labels=ids)


def causal_lm_table(names: list[str], unit: str) -> str:
    """Saved-for-backward MiB of causal LMs given labels: full fine-tuning, SlimFit's first set frozen alone, and
    that set with compression, first keeping the full logits (lm_head_chunk=None), then with the chunked head and
    loss (SlimFit's default)."""
    lines = [
        "| model | full fine-tuning | freeze only | + compression, full logits | + chunked head (SlimFit) "
        "| vs full | vs freeze |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        model, batch = _causal_lm(name)
        model.train()
        full = _saved(model, batch)
        frozen, logits_kept, chunked = (
            _saved_under(model, batch, unit, policy)
            for policy in (None, CompressionPolicy(lm_head_chunk=None), CompressionPolicy())
        )
        lines.append(
            f"| {name} | {full / MiB:.1f} | {frozen / MiB:.1f} | {logits_kept / MiB:.1f} | {chunked / MiB:.1f} "
            f"| {full / chunked:.1f}x | {frozen / chunked:.1f}x |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def _slimfit(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, unit: str, compression: CompressionPolicy | None
) -> slimfit.SlimFit:
    """SlimFit at FREEZE_RATIO with seed 0, so every row of a model trains the same first set."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # modules left uncompressed (ViT's patch Conv2d), layers over the budget
        return slimfit.SlimFit(
            model, optimizer, freeze_ratio=FREEZE_RATIO, freeze_unit=unit, compression=compression, seed=0
        )


def _saved_under(model: torch.nn.Module, batch: dict, unit: str, compression: CompressionPolicy | None) -> int:
    """Saved bytes of one forward with SlimFit's first set trainable (``compression=None``: freezing alone)."""
    sf = _slimfit(model, torch.optim.AdamW(model.parameters()), unit, compression)
    try:
        return _saved(model, batch)
    finally:
        sf.remove()


def _saved(model: torch.nn.Module, batch: dict) -> int:
    torch.manual_seed(0)
    with SavedTensorMeter(model) as meter:
        out = model(**batch)
    live = meter.live_bytes
    del out
    return live


def _saved_by_batch(model: torch.nn.Module, make_batch) -> tuple[int, int]:
    """Saved bytes at batch 8 (measured) and 128 (extrapolated from batches 1 and 2, checked at 8)."""
    s1, s2, s8 = (_saved(model, make_batch(b)) for b in (1, 2, 8))
    per_sample, fixed = s2 - s1, 2 * s1 - s2
    if fixed + 8 * per_sample != s8:
        raise RuntimeError(f"saved bytes are not affine in the batch size: {s1}, {s2}, {s8} at batch 1, 2, 8")
    return s8, fixed + 128 * per_sample


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, sf=None) -> dict[str, int]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    grads = gradient_bytes(model)
    optimizer.step()
    if sf is not None:
        sf.step()
    device = next(model.parameters()).device
    return dict(weights=parameter_bytes(model), gradients=grads, optimizer=optimizer_state_bytes(optimizer, device))


def run(name: str, unit: str) -> list[dict]:
    rows = []
    for setup, policy in (("full fine-tuning", None), ("freeze only", None), ("SlimFit", CompressionPolicy())):
        model, make_batch = _model(name)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters())
        sf = None if setup == "full fine-tuning" else _slimfit(model, optimizer, unit, policy)
        saved8, saved128 = _saved_by_batch(model, make_batch)
        counts = _train_step(model, optimizer, make_batch(8), sf)
        rows.append(dict(model=name, setup=setup, saved8=saved8, saved128=saved128, **counts))
        print(rows[-1], flush=True)
        if sf is not None:
            sf.remove()
    return rows


def run_causal_lm(name: str, unit: str) -> list[dict]:
    """Bytes by category for :func:`_causal_lm`'s model and batch: full fine-tuning, then SlimFit's schedule without
    compression (freeze only) and with it; both SlimFit rows train the same first set (seed 0)."""
    rows = []
    for setup, policy in (("full fine-tuning", None), ("freeze only", None), ("SlimFit", CompressionPolicy())):
        model, batch = _causal_lm(name)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters())
        sf = None if setup == "full fine-tuning" else _slimfit(model, optimizer, unit, policy)
        saved = _saved(model, batch)
        counts = _train_step(model, optimizer, batch, sf)
        rows.append(dict(model=name, setup=setup, saved=saved, **counts))
        print(rows[-1], flush=True)
        if sf is not None:
            sf.remove()
    return rows


def _causal_lm_memory_table(rows: list[dict]) -> str:
    head = (
        "| model | setup | weights | gradients | AdamW state | saved | total | saved vs full |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    full = {r["model"]: r["saved"] for r in rows if r["setup"] == "full fine-tuning"}
    lines = []
    for r in rows:
        cells = [r["weights"], r["gradients"], r["optimizer"], r["saved"]]
        cells.append(sum(cells))
        lines.append(
            f"| {r['model']} | {r['setup']} | "
            + " | ".join(f"{c / MiB:.1f}" for c in cells)
            + f" | {full[r['model']] / r['saved']:.1f}x |"
        )
    return head + "\n".join(lines) + "\n"


def _table(rows: list[dict]) -> str:
    head = (
        "| model | setup | weights | gradients | AdamW state | saved b8 | total b8 | saved b128 | total b128 "
        "| saved vs full |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    full = {r["model"]: r["saved8"] for r in rows if r["setup"] == "full fine-tuning"}
    lines = []
    for r in rows:
        static = r["weights"] + r["gradients"] + r["optimizer"]
        cells = [r["weights"], r["gradients"], r["optimizer"], r["saved8"], static + r["saved8"], r["saved128"]]
        cells.append(static + r["saved128"])
        lines.append(
            f"| {r['model']} | {r['setup']} | "
            + " | ".join(f"{c / MiB:.1f}" for c in cells)
            + f" | {full[r['model']] / r['saved8']:.2f}x |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["bert", "vit"], choices=["bert", "vit"])
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    parser.add_argument(
        "--families",
        nargs="*",
        default=[],
        choices=["bert", "roberta", "distilbert", "electra", "vit", "deit", "bert-qa"],
        help="also tabulate saved bytes at batch 8 for these base-size families (full, freeze only, SlimFit)",
    )
    parser.add_argument(
        "--causal-lm",
        nargs="*",
        default=[],
        choices=list(CAUSAL_LMS),
        help="also tabulate saved bytes of 6-layer causal LMs at 4 x 512 tokens with labels (chunked head and loss)",
    )
    parser.add_argument(
        "--causal-lm-memory",
        nargs="*",
        default=[],
        choices=list(CAUSAL_LMS),
        help="also tabulate bytes by category of these causal LMs (full, freeze only and SlimFit at 4 x 512 tokens)",
    )
    parser.add_argument(
        "--freeze-unit",
        default=FREEZE_UNITS[0],
        choices=list(FREEZE_UNITS),
        help="what the freeze ratio counts (slimfit.SlimFit's freeze_unit; default: the library's)",
    )
    args = parser.parse_args()
    unit = args.freeze_unit
    rows = [r for m in args.models for r in run(m, unit)]
    header = (
        f"# Memory by category (MiB), fp32, train mode, freeze ratio {FREEZE_RATIO} counting {unit}\n\n"
        f"{datetime.date.today()} · {platform.machine()} {platform.processor() or ''} · torch {torch.__version__} · "
        f"transformers {transformers.__version__} · slimfit {slimfit.__version__}\n\n"
        "BERT-base: batch x 128 tokens; ViT-base: 224 px (197 tokens). Weights, gradients and AdamW state after one "
        "step (state exists for the layers that trained; on an accelerator SlimFit's default offloads the state of "
        "frozen layers, so this is its on-device state). Saved = live bytes held for backward after one forward, "
        "measured at batch 8; batch 128 extrapolated exactly from batches 1 and 2 (checked at 8). Biases train.\n\n"
    )
    text = header + (_table(rows) if rows else "")
    if args.families:
        text += "\n## Saved for backward (MiB), batch 8, per family\n\n" + families_table(args.families, unit)
    if args.causal_lm:
        text += "\n## Causal LMs: saved for backward (MiB), 4 x 512 tokens with labels\n\n"
        text += causal_lm_table(args.causal_lm, unit)
    if args.causal_lm_memory:
        text += "\n## Causal LMs: bytes by category (MiB), 4 x 512 tokens with labels, after one step\n\n"
        text += _causal_lm_memory_table([r for m in args.causal_lm_memory for r in run_causal_lm(m, unit)])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
