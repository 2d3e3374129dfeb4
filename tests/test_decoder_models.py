"""slimfit.models.patch on decoder LLMs built from tiny configs: Llama, Qwen2, Mistral, Gemma, GPT-2.

RMSNorm, gated MLPs and GPT-2's Conv1D are compressed; tied input/output embeddings are one scheduled layer.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from torch import nn

from slimfit.core import SlimFit
from slimfit.layers import split_parameters
from slimfit.memory import SavedTensorMeter
from slimfit.models import patch
from slimfit.policy import CompressionPolicy

VOCAB, SEQ = 256, 32
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gpt2"]


def _build(family: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, **overrides}))
    name = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "gemma": "Gemma"}[family]
    config = getattr(transformers, f"{name}Config")(**{**SIZES, "num_key_value_heads": 4, **overrides})
    return getattr(transformers, f"{name}ForCausalLM")(config)


def _ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(1))


def _step(model: nn.Module, ids: torch.Tensor):
    """Loss, gradients and saved bytes of one forward/backward (dropout drawn from a fixed seed). The loss, not the
    logits: a patched causal LM computes its head and loss chunked and returns no logits in training."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    with SavedTensorMeter(model) as meter:
        out = model(input_ids=ids, labels=ids)
    saved = meter.live_bytes
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, saved


def _patch(model: nn.Module, policy: CompressionPolicy | None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention is another site's business here
        return patch(model, policy)


def _classes(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


# Which module classes each family gets patched beyond nn.Linear / activations / dropout.
PATCHED = {
    "llama": {"LlamaRMSNorm", "LlamaMLP"},
    "qwen2": {"Qwen2RMSNorm", "Qwen2MLP"},
    "mistral": {"MistralRMSNorm", "MistralMLP"},
    "gemma": {"GemmaRMSNorm", "GemmaMLP"},
    "gpt2": {"Conv1D", "LayerNorm"},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_policy_matches_unpatched(family, one_thread):
    model = _build(family)
    model.train()  # GPT-2's dropout on: patched dropout must replay the same draws
    ids = _ids()
    ref_loss, ref_grads, _ = _step(model, ids)
    before = _classes(model)
    handle = _patch(model, CompressionPolicy.exact())
    assert PATCHED[family] <= {cls.__name__ for cls in handle.patched.values()}
    assert not [name for name in handle.unsupported if "Attention" not in name]
    loss, grads, _ = _step(model, ids)
    handle.remove()
    assert _classes(model) == before
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=0, atol=1e-6, msg=n)


def _freeze_half(model: nn.Module) -> list[str]:
    """Freeze every other scheduled layer (SlimFit's own split); return the trainable layer names."""
    layers = split_parameters(model).layers
    for i, layer in enumerate(layers):
        layer.param.requires_grad_(i % 2 == 0)
    return [layer.name for layer in layers[::2]]


# Measured (hidden 64, 2 layers, batch 2 x 32 tokens, every other layer frozen): per-tensor cosine >= 0.9999 for
# Llama/Qwen2/Mistral/Gemma and >= 0.9984 for GPT-2 (its MLP input projection); norm ratios 0.999-1.002 and, for
# GPT-2, 0.997-1.011; saved bytes 4.8x (Llama, Qwen2, Mistral), 4.2x (Gemma) and 10.1x (GPT-2) below the same model
# unpatched (with the chunked LM head).
@pytest.mark.parametrize("family", FAMILIES)
def test_default_policy_gradients_close_and_memory_smaller(family, one_thread):
    model = _build(family)
    model.train()
    trainable = _freeze_half(model)
    ids = _ids()
    ref_loss, ref_grads, ref_saved = _step(model, ids)
    handle = _patch(model, CompressionPolicy())
    loss, grads, saved = _step(model, ids)
    handle.remove()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)  # forward is unchanged
    for n in trainable:
        cos = torch.nn.functional.cosine_similarity(grads[n].flatten(), ref_grads[n].flatten(), dim=0)
        ratio = grads[n].norm() / ref_grads[n].norm()
        assert cos >= 0.99 and 0.9 <= ratio <= 1.1, (n, float(cos), float(ratio))
    assert saved * 3 < ref_saved, (saved, ref_saved)


def _module_saved(module: nn.Module, x: torch.Tensor) -> int:
    with SavedTensorMeter(module) as meter:
        out = module(x)
    live = meter.live_bytes
    del out
    return live


# The modules this work compresses, each called on its own with every weight trainable (the most they save).
# Measured at hidden 64 / intermediate 160, batch 2 x 32: RMSNorm 7.2x less (fp32 x and normalised x -> 8-bit code and
# per-row 1/rms), gated MLP 5.0x (x, gate, act(gate), up and product in fp32 -> 8-bit x, gate, up and product),
# GPT-2's fused QKV Conv1D 3.9x (fp32 input -> 8-bit), its MLP 11.7x (with the 4-bit GELU derivative code).
SITES = {
    "llama": [("model.layers.0.input_layernorm", 6), ("model.layers.0.mlp", 4)],
    "qwen2": [("model.layers.0.input_layernorm", 6), ("model.layers.0.mlp", 4)],
    "mistral": [("model.layers.0.input_layernorm", 6), ("model.layers.0.mlp", 4)],
    "gemma": [("model.layers.0.input_layernorm", 6), ("model.layers.0.mlp", 4)],
    "gpt2": [("transformer.h.0.attn.c_attn", 3), ("transformer.h.0.mlp", 8)],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_bytes_of_decoder_modules_shrink(family, one_thread):
    model = _build(family)
    model.eval()  # no dropout inside GPT-2's MLP: its mask would count the same either way
    modules = dict(model.named_modules())
    x = torch.randn(2, SEQ, 64, requires_grad=True)
    for name, at_least in SITES[family]:
        plain = _module_saved(modules[name], x)
        handle = _patch(model, CompressionPolicy())
        compressed = _module_saved(modules[name], x)
        handle.remove()
        assert plain >= at_least * compressed, (name, plain, compressed)


def test_unpatched_model_in_the_same_process_is_unchanged(one_thread):
    a, b = _build("llama"), _build("gpt2")
    a.train(), b.train()
    ids = _ids()
    b_loss, b_grads, b_saved = _step(b, ids)
    handle = _patch(a, CompressionPolicy())
    _step(a, ids)
    loss, grads, saved = _step(b, ids)
    assert not any(type(m).__name__.startswith("SlimFit") for m in b.modules())
    handle.remove()
    assert torch.equal(loss, b_loss) and saved == b_saved
    assert all(torch.equal(g, b_grads[n]) for n, g in grads.items())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tied_embeddings_are_one_layer(family, one_thread):
    model = _build(family, tie_word_embeddings=True)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embedding is head
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    layers = split_parameters(model).layers
    names = [layer.name for layer in layers]
    assert len(names) == len(set(names)) and sum(layer.param is embedding for layer in layers) == 1
    assert sum(p is embedding for _, p in model.named_parameters(remove_duplicate=False)) == 2  # two names, one tensor
    embedding_name = next(n for n, p in model.named_parameters() if p is embedding)
    assert embedding_name in names and len(all_names) == len(list(model.parameters())) + 1

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sf = SlimFit(model, optimizer, freeze_ratio=0.5, seed=0)
    assert sf.layer_names == names
    ids = _ids()
    trained_embedding = False
    for _ in range(4):
        trainable = set(sf.trainable_layers())
        assert embedding.requires_grad == (embedding_name in trainable)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        trained_embedding |= embedding.grad is not None
        optimizer.step()
        sf.step()
        optimizer.zero_grad()
    assert trained_embedding
    report = sf.memory_report()
    distinct = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report["weights"] == distinct  # the shared tensor counted once
    assert sum(p is embedding for p in optimizer.state) <= 1
    sf.remove()


class OtherRMSNorm(nn.Module):
    """An RMSNorm of a family slimfit never names (Llama's formula, written differently)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(size) + 0.5)
        self.eps = 1e-6

    def forward(self, x):
        return self.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class CenteredRMSNorm(OtherRMSNorm):
    def forward(self, x):
        return super().forward(x - x.mean(-1, keepdim=True))


def test_torch_and_unnamed_rms_norms_in_a_plain_model(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.RMSNorm(64), nn.Linear(64, 64), OtherRMSNorm(64), CenteredRMSNorm(64), nn.Linear(64, 2)
    )
    nn.init.normal_(model[1].weight, 1.0, 0.3)
    x = torch.randn(16, 8, 32)

    def step():
        model.zero_grad()
        with SavedTensorMeter(model) as meter:
            loss = model(x).square().mean()
        saved = meter.live_bytes
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], saved

    ref_loss, ref_grads, ref_saved = step()
    for policy in (CompressionPolicy.exact(), CompressionPolicy()):
        with pytest.warns(UserWarning, match=r"1 module\(s\) stay uncompressed: 4 \(CenteredRMSNorm\)"):
            handle = patch(model, policy)
        assert {n: c.__name__ for n, c in handle.patched.items() if "RMSNorm" in c.__name__} == {
            "1": "RMSNorm",
            "3": "OtherRMSNorm",
        }
        loss, grads, saved = step()
        handle.remove()
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            if policy == CompressionPolicy.exact():
                torch.testing.assert_close(g, r, rtol=0, atol=1e-6)
            else:
                assert torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0) >= 0.999
    assert saved * 2 < ref_saved


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_torch_compile_traces_the_decoder_functions(family, one_thread):
    """RMSNorm, the gated product, Conv1D and the chunked head trace under torch.compile (aot_eager runs the custom
    ops through their fake kernels): loss and every gradient as in eager."""
    model = _build(family)
    model.train()
    _freeze_half(model)
    handle = _patch(model, CompressionPolicy())
    ids = _ids()
    eager_loss, eager_grads, _ = _step(model, ids)
    compiled = torch.compile(model, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    handle.remove()
    torch.testing.assert_close(loss.detach(), eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)
