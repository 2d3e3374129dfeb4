"""slimfit.models.patch on transformers families built from small configs, and on plain torch models."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import transformers
from tiny_bert import bypass_attention_registry
from torch import nn
from transformers.modeling_utils import AttentionInterface

from slimfit.core import SlimFit
from slimfit.memory import SavedTensorMeter
from slimfit.models import patch
from slimfit.models.hf import IMPLEMENTATION
from slimfit.policy import CompressionPolicy

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _text(cls_name: str, config):
    return getattr(transformers, cls_name)(config), "text"


def _build(family: str):
    torch.manual_seed(0)
    if family == "bert":
        return _text("BertForSequenceClassification", transformers.BertConfig(vocab_size=100, **SMALL))
    if family == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=100, max_position_embeddings=40, **SMALL)
        return _text("RobertaForSequenceClassification", cfg)
    if family == "electra":
        cfg = transformers.ElectraConfig(vocab_size=100, embedding_size=16, **SMALL)
        return _text("ElectraForSequenceClassification", cfg)
    if family == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
        return _text("DistilBertForSequenceClassification", cfg)
    vision = dict(image_size=16, patch_size=4, **SMALL)
    if family == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(**vision)), "image"
    if family == "deit":
        model = transformers.DeiTForImageClassification(transformers.DeiTConfig(**vision))
        # DeiT initialises its tokens and position embeddings to zero: the token rows are then constant, layer 0's
        # LayerNorm gives them 1/std = 1/sqrt(eps) = 1e6 and their gradients swamp every other one. Trained
        # checkpoints have non-zero values, as here.
        emb = model.deit.embeddings
        for p in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
            torch.nn.init.normal_(p, std=0.02)
        return model, "image"
    raise ValueError(family)


def _batch(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 1])
    if kind == "image":
        return dict(pixel_values=torch.randn(3, 3, 16, 16, generator=g), labels=labels)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0  # padding, so a real attention mask reaches the attention function
    return dict(input_ids=torch.randint(3, 100, (3, 12), generator=g), attention_mask=mask, labels=labels)


def _step(model: nn.Module, batch: dict, seed: int = 7):
    """Loss, logits and gradients of one forward/backward (dropout drawn from ``seed``), plus saved bytes."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with SavedTensorMeter(model) as meter:
        out = model(**batch)
    saved = meter.live_bytes
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, saved


def _is_layer(name: str, p: torch.Tensor) -> bool:
    """SlimFit's layers: weights with more than one dimension plus normalisation weights."""
    return p.dim() > 1 or ("norm" in name.lower() and name.endswith("weight"))


def _freeze_half(model: nn.Module) -> list[str]:
    """Freeze every other layer; return the trainable layer names."""
    names = [n for n, p in model.named_parameters() if _is_layer(n, p)]
    params = dict(model.named_parameters())
    for i, n in enumerate(names):
        params[n].requires_grad_(i % 2 == 0)
    return names[::2]


FAMILIES = ["bert", "roberta", "electra", "distilbert", "vit", "deit"]


def _classes(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_policy_matches_unpatched(family):
    model, kind = _build(family)
    model.train()  # dropout on: patched dropout and attention must replay the same draws
    batch = _batch(kind)
    ref_logits, ref_grads, _ = _step(model, batch)
    before = _classes(model)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the vision models' Conv2d patch embedding stays uncompressed
        for policy in (None, CompressionPolicy.exact()):
            handle = patch(model, policy)
            logits, grads, _ = _step(model, batch)
            handle.remove()
            assert torch.allclose(logits, ref_logits, atol=1e-6)
            assert grads.keys() == ref_grads.keys()
            for n, g in grads.items():
                assert torch.allclose(g, ref_grads[n], atol=1e-6), n
    assert _classes(model) == before


# At width 32 with 36 tokens, compression noise weighs far more than at real sizes (a tensor whose true gradient is
# nearly zero, e.g. a first-layer query projection under near-uniform attention, has no meaningful direction),
# so small models are held to the cosine of all trainable gradients together; per-tensor >= 0.99 is checked at
# BERT-base size (slow test).
@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_gradients_close_and_memory_smaller(family):
    model, kind = _build(family)
    model.train()
    trainable = _freeze_half(model)
    batch = _batch(kind)
    ref_logits, ref_grads, ref_saved = _step(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = patch(model, CompressionPolicy())
    logits, grads, saved = _step(model, batch)
    handle.remove()
    assert torch.allclose(logits, ref_logits, atol=1e-5)  # forward is unchanged
    got = torch.cat([grads[n].flatten() for n in trainable])
    ref = torch.cat([ref_grads[n].flatten() for n in trainable])
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) >= 0.99
    assert saved * 2 < ref_saved


def test_nothing_below_the_lowest_trainable_layer_is_saved():
    model, kind = _build("bert")
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)
    handle = patch(model, CompressionPolicy())
    _, grads, saved = _step(model, _batch(kind))
    handle.remove()
    assert list(grads) == ["classifier.weight"]
    # Only the classifier's 8-bit input [3, 32] (+ bf16 scale and offset), and the loss's log-probabilities,
    # labels and fp32 total weight.
    assert saved == (3 * 32 + 4) + (3 * 2 * 4 + 3 * 8 + 4)


def _attn_implementations(model: nn.Module) -> set[str]:
    return {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}


def test_patch_switches_attention_and_remove_restores_everything():
    model, kind = _build("bert")
    model.train()
    original_sdpa = AttentionInterface._global_mapping["sdpa"]
    before = _classes(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = patch(model, CompressionPolicy())
    assert _attn_implementations(model) == {IMPLEMENTATION}
    assert AttentionInterface._global_mapping["sdpa"] is original_sdpa  # nothing process-wide is wrapped
    assert handle.attention == [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, nn.Linear)
    assert type(model.bert.encoder.layer[0].intermediate.dense) is not nn.Linear
    assert model.state_dict().keys() == state.keys()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every attention module runs compressed: no warning
        model(**_batch(kind)).loss.backward()
    assert handle.unsupported == []
    with pytest.raises(ValueError, match="already patched"):
        patch(model, CompressionPolicy())
    handle.remove()
    handle.remove()  # idempotent
    assert _classes(model) == before
    assert _attn_implementations(model) == {"sdpa"}
    assert not any("slimfit" in k for m in model.modules() for k in vars(m))
    assert not any(m._forward_hooks for m in model.modules())


def test_attention_saves_compressed_and_other_models_keep_theirs():
    """The attention's own saved bytes shrink in the patched model; an unpatched model alive at the same time saves
    exactly what it saved before."""
    (a, kind), (b, _) = _build("bert"), _build("bert")
    a.train(), b.train()
    batch = _batch(kind)
    no_attention = CompressionPolicy(attention=None)
    _, _, b_before = _step(b, batch)
    handle = patch(a, no_attention)
    _, _, plain_attention = _step(a, batch)
    handle.remove()
    handle = patch(a, CompressionPolicy())
    _, _, compressed_attention = _step(a, batch)
    _, _, b_during = _step(b, batch)
    handle.remove()
    # fp32 q, k, v and output (4 x 3 x 12 x 32 floats per layer, 2 layers) become 8-bit q, k, v.
    assert plain_attention - compressed_attention >= 2 * (4 * 3 * 12 * 32 * 4 - 3 * 3 * 12 * 32) * 0.9
    assert b_during == b_before
    assert _attn_implementations(b) == {"sdpa"}


def test_attention_that_bypasses_the_registry_is_reported(monkeypatch):
    """A transformers release whose attention stops calling the registry is named, never silently uncompressed."""
    bypass_attention_registry(monkeypatch)
    model, kind = _build("bert")
    sf = SlimFit(model, torch.optim.AdamW(model.parameters()), freeze_ratio=0.5)
    assert sf.memory_report()["uncompressed_modules"] == 0  # not known before the first forward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = sf.memory_report(_batch(kind))
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        "slimfit: attention of 2 module(s) runs UNCOMPRESSED, keeping full q, k, v and output for backward: "
        + ", ".join(sf.uncompressed_modules)
        + " (see SlimFit.uncompressed_modules)"
    ]
    assert report["uncompressed_modules"] == 2
    assert sf.uncompressed_modules == [
        f"bert.encoder.layer.{i}.attention.self (BertSelfAttention: it does not call transformers' attention registry)"
        for i in range(2)
    ]
    sf.remove()


def test_one_warning_names_unsupported_modules():
    model, _ = _build("vit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = patch(model, CompressionPolicy())
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "vit.embeddings.patch_embeddings.projection (Conv2d)" in messages[0]
    handle.remove()


def test_eager_attention_is_reported_unsupported():
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=100, attn_implementation="eager", **SMALL))
    with pytest.warns(UserWarning, match="attn_implementation='eager'"):
        handle = patch(model, CompressionPolicy())
    assert handle.attention == []
    assert _attn_implementations(model) == {"eager"}
    handle.remove()


def test_generic_torch_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 2)
    )
    x = torch.randn(32, 16)
    model.train()

    def step():
        model.zero_grad()
        torch.manual_seed(3)
        with SavedTensorMeter(model) as meter:
            loss = model(x).square().mean()
        saved = meter.live_bytes
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], saved

    ref_loss, ref_grads, ref_saved = step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything here is supported
        handle = patch(model, CompressionPolicy())
    loss, grads, saved = step()
    handle.remove()
    assert torch.allclose(loss, ref_loss)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0) > 0.99
    assert saved * 3 < ref_saved


def test_multihead_attention_is_reported():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.warns(UserWarning, match=r"0 \(MultiheadAttention\)"):
        patch(model, CompressionPolicy()).remove()


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        patch("bert", CompressionPolicy())
    with pytest.raises(ValueError, match="policy must be a CompressionPolicy or None"):
        patch(nn.Linear(2, 2), "default")
    with pytest.raises(ValueError, match="layernorm_trainable must be None or one of"):
        CompressionPolicy(layernorm_trainable=0.1)
    with pytest.raises(ValueError, match="dropout must be one of"):
        CompressionPolicy(dropout="bytes")


def _bert_base_first_set(seed: int = 0):
    """BERT-base with SlimFit's first trainable set at freeze ratio 0.9 (default unit, ``seed``) left trainable, the
    set ``benchmarks/bench_memory.py`` measures; returns the model and the trainable parameters' names."""
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(transformers.BertConfig())
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the word embeddings are larger than the per-step budget and stay frozen
        sf = SlimFit(model, torch.optim.AdamW(model.parameters()), freeze_ratio=0.9, compression=None, seed=seed)
    chosen = {n for n, p in model.named_parameters() if p.requires_grad}
    sf.remove()
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return model, sorted(chosen)


@pytest.mark.slow
def test_bert_base_acceptance():
    """BERT-base, batch 8 x 128, SlimFit's first set at freeze ratio 0.9: README's 11.9x less saved than full
    fine-tuning (held to 11.5x, measured here against full fine-tuning of the same model and batch); gradient
    cosine >= 0.99 on every trainable tensor."""
    model, trainable = _bert_base_first_set()
    g = torch.Generator().manual_seed(0)
    batch = dict(input_ids=torch.randint(0, 30522, (8, 128), generator=g), labels=torch.tensor([0, 1] * 4))
    chosen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    with SavedTensorMeter(model) as meter:
        out = model(**batch)
    full_fine_tuning = meter.live_bytes
    del out
    for n, p in model.named_parameters():
        p.requires_grad_(chosen[n])
    _, ref_grads, _ = _step(model, batch)
    handle = patch(model, CompressionPolicy())
    _, grads, saved = _step(model, batch)
    assert handle.unsupported == []
    handle.remove()
    assert full_fine_tuning / saved >= 11.5, (full_fine_tuning / 2**20, saved / 2**20)
    for n in trainable:
        if n.endswith("attention.self.key.bias"):
            # Zero up to rounding on both sides: a key bias adds the same q . b to every score of a query's row,
            # which softmax ignores, so cosine similarity would compare rounding noise.
            scale = ref_grads[n.replace(".key.", ".value.")].norm()
            assert grads[n].norm() <= 1e-5 * scale and ref_grads[n].norm() <= 1e-5 * scale, n
            continue
        cos = torch.nn.functional.cosine_similarity(grads[n].flatten(), ref_grads[n].flatten(), dim=0)
        assert cos >= 0.99, (n, float(cos))


def test_patched_model_pickles_and_restores():
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.LayerNorm(4))
    handle = patch(model, CompressionPolicy())
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone[0]) is type(model[0]) and clone[0].slimfit_policy == CompressionPolicy()
    handle.remove()
    assert type(model[0]) is nn.Linear


def test_autocast_bfloat16():
    model, kind = _build("bert")
    model.train()
    trainable = _freeze_half(model)
    batch = _batch(kind)

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        return torch.cat([dict(model.named_parameters())[n].grad.flatten() for n in trainable])

    ref = grads()
    handle = patch(model, CompressionPolicy())
    got = grads()
    handle.remove()
    assert got.dtype == torch.float32  # gradients keep the parameters' dtype
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) >= 0.99


def test_grouped_query_attention_is_compressed():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 100, (2, 8))
    reference = model(input_ids=ids).logits
    handle = patch(model, CompressionPolicy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no attention module is reported uncompressed
        logits = model(input_ids=ids).logits
    assert handle.attention == ["model.layers.0.self_attn"]
    assert handle.unsupported == []
    torch.testing.assert_close(logits, reference)  # compression changes only what backward keeps
    handle.remove()


def test_position_bias_falls_back_and_is_named():
    """T5's learned position bias is not supported: transformers' own SDPA runs and the module is named."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    model = transformers.T5EncoderModel(config)
    model.eval()  # no dropout, so both runs compute the same
    ids = torch.randint(0, 100, (2, 8))
    reference = model(input_ids=ids).last_hidden_state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # T5LayerNorm is not compressed
        handle = patch(model, CompressionPolicy())
    with pytest.warns(RuntimeWarning, match="position bias, paged cache or softcap is not supported"):
        hidden = model(input_ids=ids).last_hidden_state
    attention = (
        "encoder.block.0.layer.0.SelfAttention (T5Attention: position bias, paged cache or softcap is not supported)"
    )
    assert [name for name in handle.unsupported if "Attention" in name] == [attention]
    torch.testing.assert_close(hidden, reference)
    handle.remove()


def test_transformers_outside_the_tested_range_warns(monkeypatch):
    from slimfit.models import hf

    monkeypatch.setattr(hf, "transformers_version", lambda: (6, 1))
    monkeypatch.setattr(hf, "_version_warned", False)
    model, _ = _build("bert")
    with pytest.warns(UserWarning, match=r"transformers .* is outside the tested range >=5\.18,<6\.0"):
        handle = patch(model, CompressionPolicy())
    handle.remove()
