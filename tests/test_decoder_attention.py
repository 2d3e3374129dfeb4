"""Grouped-query and multi-query attention of decoder LLMs (Llama, Mistral, Qwen2, Gemma) through slimfit's
compressed SDPA: the masks that reach it, exactness against transformers' own SDPA, fidelity under 8-bit codes, and
k/v kept at the key/value-head width."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers

from slimfit import ops
from slimfit.memory import SavedTensorMeter
from slimfit.models import hf, patch
from slimfit.nn.attention import AttentionFunction, scaled_dot_product_attention
from slimfit.policy import CompressionPolicy, Quantize

pytestmark = pytest.mark.usefixtures("one_thread")

DECODER = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# Only attention routed to slimfit's, the rest exact: isolates what this file tests.
ATTENTION_ONLY = dataclasses.replace(CompressionPolicy.exact(), attention=Quantize(8))


def _exact_attention(q, k, v, mask, dropout, causal, scale, setting, enable_gqa):
    """slimfit's attention Function saving q, k, v exactly (a policy's attention=None would not route attention)."""
    return AttentionFunction.apply(q, k, v, mask, dropout, causal, scale, None, enable_gqa)


def _decoder(family: str, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    settings = {**DECODER, **overrides}
    if family == "llama":  # grouped-query: 4 query heads share 2 key/value heads
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **settings))
    if family == "llama-mqa":  # multi-query: one key/value head
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=1, **settings))
    if family == "mistral":  # a window shorter than the sequence, so the window is in the mask
        return transformers.MistralForCausalLM(
            transformers.MistralConfig(num_key_value_heads=2, sliding_window=4, **settings)
        )
    if family == "qwen2":
        config = transformers.Qwen2Config(
            num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1, **settings
        )
        return transformers.Qwen2ForCausalLM(config)
    if family == "gemma":
        return transformers.GemmaForCausalLM(transformers.GemmaConfig(num_key_value_heads=1, head_dim=8, **settings))
    raise ValueError(family)


def _inputs(padded: bool, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(1)
    batch = dict(input_ids=torch.randint(3, 120, (3, length), generator=g))
    if padded:
        mask = torch.ones(3, length, dtype=torch.long)
        mask[1, :5] = 0  # left padding
        mask[2, -3:] = 0  # right padding
        batch["attention_mask"] = mask
    return batch


def _step(model, batch):
    """Logits and gradients of a next-token loss computed from the logits (no labels: the head is not chunked)."""
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits
    ids = batch["input_ids"]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_masks_that_reach_attention(monkeypatch):
    """Llama without padding: no mask, causal flag; with padding: transformers' 4-D bool mask [B, 1, L, S]. Either way
    k and v arrive at the key/value-head width and go to SDPA with enable_gqa."""
    calls = []

    def spy(q, k, v, mask, dropout, causal, scale, setting, enable_gqa):
        calls.append((q.shape[1], k.shape[1], v.shape[1], mask, causal, enable_gqa))
        return scaled_dot_product_attention(q, k, v, mask, dropout, causal, scale, setting, enable_gqa=enable_gqa)

    monkeypatch.setattr(hf, "scaled_dot_product_attention", spy)
    model = _decoder("llama")
    handle = patch(model, CompressionPolicy())
    model(**_inputs(padded=False))
    assert [c[:3] for c in calls] == [(4, 2, 2)] * 2
    assert all(c[3] is None and c[4] and c[5] for c in calls)
    calls.clear()
    model(**_inputs(padded=True))
    mask = calls[0][3]
    assert mask.dtype == torch.bool and mask.shape == (3, 1, 12, 12)
    assert not mask[1, 0, :, :5].any() and not mask[2, 0, :, -3:].any()  # padding is masked
    assert all(not c[4] and c[5] for c in calls)
    handle.remove()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", ["llama", "llama-mqa", "mistral", "qwen2", "gemma"])
def test_exact_saving_matches_transformers_sdpa(family, padded, monkeypatch):
    """With q, k, v saved exactly, logits and every gradient equal transformers' own SDPA (causal, padding and
    sliding-window masks; k/v gradients summed back to the key/value heads)."""
    model = _decoder(family)
    model.train()
    batch = _inputs(padded)
    ref_logits, ref_grads = _step(model, batch)
    monkeypatch.setattr(hf, "scaled_dot_product_attention", _exact_attention)
    handle = patch(model, ATTENTION_ONLY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # every attention module runs through slimfit's
        logits, grads = _step(model, batch)
    assert len(handle.attention) == 2 and not any("Attention" in name for name in handle.unsupported)
    handle.remove()
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_compressed_gradients_close_per_tensor(family):
    """8-bit q, k, v: every parameter's gradient within cosine 0.99 of transformers' SDPA (hidden 256, 64 tokens)."""
    model = _decoder(family, hidden_size=256, intermediate_size=512, num_attention_heads=8)
    model.train()
    batch = _inputs(padded=True, length=64)
    _, ref_grads = _step(model, batch)
    handle = patch(model, ATTENTION_ONLY)
    _, grads = _step(model, batch)
    handle.remove()
    for name, g in grads.items():
        cos = F.cosine_similarity(g.flatten(), ref_grads[name].flatten(), dim=0)
        assert cos >= 0.99, (name, float(cos))


def _qkv(batch=2, heads=8, kv_heads=2, length=32, dim=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def test_gqa_function_gradcheck():
    q, k, v = _qkv(1, 4, 2, 5, 3, torch.float64)
    mask = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[..., 0] = True

    def fn(q, k, v):
        return AttentionFunction.apply(q, k, v, mask, 0.0, False, None, None, True)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gqa_dropout_is_replayed_exactly():
    q, k, v = _qkv(length=16, dim=16)
    grad = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    outs = []
    for fn in (
        lambda: AttentionFunction.apply(q, k, v, None, 0.3, True, None, None, True),
        lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True, enable_gqa=True),
    ):
        torch.manual_seed(5)
        out = fn()
        outs.append((out.detach(), *torch.autograd.grad(out, (q, k, v), grad)))
    for got, ref in zip(*outs, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_gqa_keeps_kv_codes_at_kv_head_width():
    """8 query heads, 2 key/value heads: what is kept is the codes of q, k and v as given, the k and v codes a quarter
    of what the heads expanded to 8 would keep."""
    setting = Quantize(8)
    q, k, v = _qkv()
    expanded = [t.detach().repeat_interleave(4, dim=1).requires_grad_() for t in (k, v)]

    def saved(q, k, v, gqa):
        with SavedTensorMeter() as meter:
            out = scaled_dot_product_attention(q, k, v, is_causal=True, setting=setting, enable_gqa=gqa)
        live = meter.live_bytes
        del out
        return live

    def code(t):
        return ops.quantize(t.detach(), setting.bits, setting.group_size).nbytes

    assert code(expanded[0]) == 4 * code(k)
    assert saved(q, k, v, True) == code(q) + code(k) + code(v)
    assert saved(q, *expanded, False) == code(q) + 4 * (code(k) + code(v))


def test_unpatched_llama_in_the_same_process_is_unchanged():
    a, b = _decoder("llama"), _decoder("llama")
    batch = _inputs(padded=True)

    def run(model):
        with SavedTensorMeter(model) as meter:
            logits, grads = _step(model, batch)
        return logits, grads, meter.peak_bytes

    before = run(b)
    handle = patch(a, CompressionPolicy())
    run(a)
    during = run(b)
    handle.remove()
    assert b.config._attn_implementation == "sdpa" and "forward" not in vars(b)
    torch.testing.assert_close(during[0], before[0], rtol=0, atol=0)
    for name, g in during[1].items():
        torch.testing.assert_close(g, before[1][name], rtol=0, atol=0)
    assert during[2] == before[2]
