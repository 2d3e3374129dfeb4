"""A tiny randomly initialised BERT with a WordPiece tokenizer, saved as a local Hugging Face model folder.

Tests of the CLI, the benchmark and the Trainer callback use it instead of the bundled MiniLM: it loads in
milliseconds and a training step takes a few milliseconds on one CPU core.
"""

from __future__ import annotations

import csv
from pathlib import Path

# Vocabulary size and sequence length of :func:`tiny_classifier`'s synthetic token tasks.
VOCAB, SEQ = 40, 8

SPORT = "goal match team player score win league ball coach stadium".split()
TECH = "computer software chip code data network phone app server robot".split()


def save_tiny_bert(folder: Path) -> Path:
    """Write config, weights and tokenizer of a 2-layer, hidden-32 BERT into ``folder`` and return it."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SPORT, *TECH]) + "\n")
    # Positional: transformers 4 calls the argument vocab_file, transformers 5 calls it vocab.
    BertTokenizerFast(str(vocab)).save_pretrained(folder)
    config = BertConfig(
        vocab_size=5 + len(SPORT) + len(TECH),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (text, label) pairs: sport words -> "sport", tech words -> "tech", alternating."""
    import random

    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        words, label = (SPORT, "sport") if i % 2 == 0 else (TECH, "tech")
        pairs.append((" ".join(rng.choices(words, k=rng.randint(4, 12))), label))
    return pairs


def write_csv(path: Path, rows: list[tuple[str, str]], text_column: str = "body", label_column: str = "topic") -> Path:
    """A CSV with custom column names (plus an unused id column)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", text_column, label_column])
        writer.writerows((i, text, label) for i, (text, label) in enumerate(rows))
    return path


def tiny_classifier(seed: int = 0):
    """A 2-layer, hidden-32 BertForSequenceClassification over ``VOCAB`` tokens and ``SEQ`` positions, 2 labels."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def bypass_attention_registry(monkeypatch) -> None:
    """Make BertSelfAttention call transformers' SDPA directly instead of through the attention registry, as a
    refactored transformers release or a custom model could: slimfit must then report it uncompressed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.bert import modeling_bert

    def direct_sdpa(self, hidden_states, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        q, k, v = (f(hidden_states).view(shape).transpose(1, 2) for f in (self.query, self.key, self.value))
        out, _ = sdpa_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling)
        return out.reshape(*hidden_states.shape[:-1], -1), None

    monkeypatch.setattr(modeling_bert.BertSelfAttention, "forward", direct_sdpa)


def batches(n: int, batch_size: int = 32, seed: int = 1) -> list[dict]:
    """Synthetic task for :func:`tiny_classifier`: is the token at position 1 in the upper half of the vocabulary?"""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)
        out.append({"input_ids": ids, "labels": (ids[:, 1] >= VOCAB // 2).long()})
    return out
