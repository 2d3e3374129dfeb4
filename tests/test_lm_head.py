"""Chunked language-model head + cross-entropy (slimfit.nn.lm_head) and its use in causal LMs under slimfit."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from slimfit.memory import SavedTensorMeter
from slimfit.models import hf, patch
from slimfit.nn.lm_head import LinearCrossEntropyFunction, linear_cross_entropy
from slimfit.policy import CompressionPolicy, Quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(n: int, h: int, v: int, dtype=torch.float32, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) / math.sqrt(h)).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels, reduction="mean"):
    return F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(reduction, bias):
    hidden, weight, b, labels = _case(13, 5, 7, torch.float64, bias)
    labels[[0, 4, 5, 6, 12]] = -100  # a whole chunk of 3 ignored, and single tokens
    inputs = (hidden, weight) + ((b,) if bias else ())

    def fn(hidden, weight, b=None):
        return linear_cross_entropy(hidden, weight, b, labels, reduction=reduction, chunk_size=3)

    assert torch.autograd.gradcheck(fn, inputs)
    torch.testing.assert_close(fn(*inputs), _reference(hidden, weight, b, labels, reduction))


@pytest.mark.parametrize("chunk_size", [1, 64, 100, 10_000])
def test_float32_matches_cross_entropy(chunk_size):
    hidden, weight, bias, labels = _case(600, 32, 2000)
    labels[100:300] = -100  # several whole chunks ignored
    labels[-1] = -100
    inputs = (hidden, weight, bias)
    loss = linear_cross_entropy(hidden, weight, bias, labels, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss, inputs)
    ref = _reference(hidden, weight, bias, labels)
    ref_grads = torch.autograd.grad(ref, inputs)
    torch.testing.assert_close(loss, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_every_label_ignored():
    hidden, weight, bias, labels = _case(10, 4, 6)
    labels[:] = -100
    assert torch.isnan(linear_cross_entropy(hidden, weight, bias, labels))  # as PyTorch's mean: 0 / 0
    assert torch.isnan(_reference(hidden, weight, bias, labels))
    total = linear_cross_entropy(hidden, weight, bias, labels, reduction="sum")
    assert total.item() == 0.0
    grads = torch.autograd.grad(total, (hidden, weight, bias))
    assert all(not g.any() for g in grads)


def test_leading_dimensions_and_custom_ignore_index():
    hidden, weight, bias, labels = _case(24, 8, 11)
    labels[:5] = 3
    got = linear_cross_entropy(hidden.view(2, 12, 8), weight, bias, labels.view(2, 12), ignore_index=3, chunk_size=5)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=3)
    torch.testing.assert_close(got, ref)


def test_only_the_weight_needs_grad_keeps_a_code_of_the_hidden_states():
    hidden, weight, bias, labels = _case(512, 128, 1000, bias=False)
    hidden = hidden.detach()

    def run(setting):
        with SavedTensorMeter([weight]) as meter:
            loss = linear_cross_entropy(hidden, weight, None, labels, chunk_size=128, setting=setting)
        saved = meter.live_bytes
        return saved, torch.autograd.grad(loss, weight)[0]

    exact_saved, exact = run(None)
    coded_saved, coded = run(Quantize(8))
    ref = torch.autograd.grad(_reference(hidden, weight, None, labels), weight)[0]
    torch.testing.assert_close(exact, ref)
    assert F.cosine_similarity(coded.flatten(), ref.flatten(), dim=0) >= 0.999
    per_token = 8 + 8 + 4  # row index, label, log-sum-exp
    count = 8  # the token count the mean divides by
    assert exact_saved == 512 * (128 * 4 + per_token) + count
    assert coded_saved == 512 * (128 + per_token) + 512 * 4 + count  # 8-bit codes, bf16 scale + offset per group


def test_hidden_states_that_need_grad_are_kept_exact():
    """Their gradient needs the softmax recomputed from them: a code would change it, so the setting is not used."""
    hidden, weight, bias, labels = _case(300, 128, 500)
    inputs = (hidden, weight, bias)
    got = torch.autograd.grad(linear_cross_entropy(*inputs, labels, chunk_size=64, setting=Quantize(2)), inputs)
    ref = torch.autograd.grad(_reference(*inputs, labels), inputs)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def _saved_bytes(fn, hidden, labels) -> int:
    with SavedTensorMeter() as meter:
        loss = fn(hidden, labels)
    live = meter.live_bytes
    del loss
    return live


def test_saved_bytes_grow_with_hidden_states_not_logits():
    """What is kept per token is the hidden state and 20 bytes, whatever the vocabulary (plain head + cross-entropy:
    at least the V floats of the log-softmax)."""
    h = 64
    for v in (1000, 4000):
        weight = torch.randn(v, h, requires_grad=True)

        def chunked(hidden, labels, weight=weight):
            return linear_cross_entropy(hidden, weight, None, labels, chunk_size=32)

        def plain(hidden, labels, weight=weight):
            return _reference(hidden, weight, None, labels)

        sizes = {}
        for n in (256, 512):
            hidden, _, _, labels = _case(n, h, v, bias=False)
            sizes[n] = _saved_bytes(chunked, hidden, labels), _saved_bytes(plain, hidden, labels)
        chunked_growth = (sizes[512][0] - sizes[256][0]) / 256
        plain_growth = (sizes[512][1] - sizes[256][1]) / 256
        assert chunked_growth == h * 4 + 20
        assert plain_growth >= v * 4


class _LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("n", [256, 1024])
def test_temporaries_grow_with_the_chunk_not_the_tokens(n):
    """Forward and backward never build more than chunk x V logits at once (nor the N x V ones)."""
    h, v, chunk = 16, 4000, 32
    hidden, weight, _, labels = _case(n, h, v, bias=False)
    with _LargestTensor() as mode:
        loss = linear_cross_entropy(hidden, weight, None, labels, chunk_size=chunk)
        loss.backward()
    assert mode.largest == max(chunk * v * 4, v * h * 4, n * h * 4)


def test_bad_arguments():
    hidden, weight, bias, labels = _case(6, 4, 5)
    with pytest.raises(ValueError, match="labels must have the leading shape of hidden"):
        linear_cross_entropy(hidden, weight, bias, labels[:5])
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        linear_cross_entropy(hidden, weight, bias, labels, reduction="none")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_cross_entropy(hidden, weight, bias, labels, chunk_size=0)
    with pytest.raises(ValueError, match="lm_head_chunk must be None or a positive int"):
        CompressionPolicy(lm_head_chunk=1.5)


# --- causal LMs under patch() ---------------------------------------------------------------------------------

SMALL = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _causal_lm(family: str, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    settings = {**SMALL, **overrides}
    if family == "gpt2":  # ties its head to the input embedding
        cfg = dict(vocab_size=settings["vocab_size"], n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, **overrides))
    else:
        configs = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
            "qwen3": transformers.Qwen3Config,
            "gemma": transformers.GemmaConfig,
            "phi3": transformers.Phi3Config,
            "olmo2": transformers.Olmo2Config,
        }
        if family == "gemma":
            settings["head_dim"] = 8
        if family == "phi3":
            settings["pad_token_id"] = 0
        config = configs[family](num_key_value_heads=2, **settings)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.train()
    return model


def _lm_batch(length: int = 10) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # a prompt left out of the loss
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _run(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # GPT-2's dropout draws the same masks each run
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, ref):
    torch.testing.assert_close(got[0].loss, ref[0].loss, rtol=1e-5, atol=1e-6)
    assert got[1].keys() == ref[1].keys()
    for name, g in got[1].items():
        torch.testing.assert_close(g, ref[1][name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", sorted(hf.CHUNKED_LM_HEAD_TYPES))
def test_patched_causal_lm_matches_its_own_loss(family):
    """Every family the head is chunked for: loss and gradients equal the model's own (exact saving), and the
    training output has no logits."""
    model = _causal_lm(family)
    batch = _lm_batch()
    ref = _run(model, batch)
    handle = patch(model, CompressionPolicy.exact())
    assert handle.chunked_lm_head
    got = _run(model, batch)
    handle.remove()
    assert got[0].logits is None and ref[0].logits is not None
    _assert_same(got, ref)


def test_tied_embedding_gradients_accumulate_into_one_parameter():
    model = _causal_lm("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = _lm_batch()
    ref = _run(model, batch)
    handle = patch(model, CompressionPolicy.exact())
    got = _run(model, batch)
    handle.remove()
    _assert_same(got, ref)
    assert "model.embed_tokens.weight" in got[1]  # the one tensor, with both contributions


def test_num_items_in_batch_and_shift_labels():
    """Trainer's gradient accumulation divides the summed loss by the tokens of all micro-batches."""
    model = _causal_lm("llama")
    batch = _lm_batch()
    handle = patch(model, CompressionPolicy.exact())
    got = _run(model, batch, num_items_in_batch=torch.tensor(40))
    handle.remove()
    ref = _run(model, batch, num_items_in_batch=torch.tensor(40))
    _assert_same(got, ref)
    shifted = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    handle = patch(model, CompressionPolicy.exact())
    got = _run(model, batch, shift_labels=shifted, num_items_in_batch=17)
    handle.remove()
    ref = _run(model, batch, shift_labels=shifted, num_items_in_batch=17)
    _assert_same(got, ref)


def test_logits_to_keep_with_labels_of_the_kept_positions():
    model = _causal_lm("qwen2")
    batch = _lm_batch()
    batch["labels"] = batch["labels"][:, -4:]
    ref = _run(model, batch, logits_to_keep=4)
    handle = patch(model, CompressionPolicy.exact())
    got = _run(model, batch, logits_to_keep=4)
    handle.remove()
    _assert_same(got, ref)


def test_logits_are_kept_in_eval_without_labels_and_without_grad():
    model = _causal_lm("llama")
    batch = _lm_batch()
    handle = patch(model, CompressionPolicy())
    assert model(**batch).logits is None
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert model(**no_labels).logits.shape == (3, 10, 300)
    with torch.no_grad():
        assert model(**batch).logits.shape == (3, 10, 300)
    model.eval()
    out = model(**batch)
    assert out.logits.shape == (3, 10, 300) and out.loss is not None
    model.train()
    loss, *rest = model(**batch, return_dict=False)
    assert loss.ndim == 0 and all(not (torch.is_tensor(r) and r.shape[-1] == 300) for r in rest)
    handle.remove()


def test_default_policy_gradients_close():
    model = _causal_lm("llama", hidden_size=128, intermediate_size=256, vocab_size=300)
    batch = _lm_batch(length=32)
    ref = _run(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = patch(model, CompressionPolicy())
    got = _run(model, batch)
    handle.remove()
    torch.testing.assert_close(got[0].loss, ref[0].loss, rtol=1e-5, atol=1e-6)  # forward is exact
    got_all = torch.cat([g.flatten() for g in got[1].values()])
    ref_all = torch.cat([ref[1][n].flatten() for n in got[1]])
    assert F.cosine_similarity(got_all, ref_all, dim=0) >= 0.99
    for name in ("lm_head.weight", "model.norm.weight"):
        assert F.cosine_similarity(got[1][name].flatten(), ref[1][name].flatten(), dim=0) >= 0.99


def test_saved_bytes_of_a_causal_lm_do_not_hold_the_logits():
    """The patched model keeps nothing of vocabulary size: from 16 to 32 tokens per row its saved bytes grow by much
    less than the logits and log-softmax the unpatched head keeps."""
    model = _causal_lm("llama", vocab_size=8000)

    def saved(length):
        batch = _lm_batch(length)
        batch["input_ids"] = batch["input_ids"] % 8000
        with SavedTensorMeter(model) as meter:
            out = model(**batch)
        live = meter.live_bytes
        del out
        return live

    plain = saved(32) - saved(16)
    handle = patch(model, CompressionPolicy())
    chunked = saved(32) - saved(16)
    handle.remove()
    logits = 3 * 16 * 8000 * 4
    assert plain >= logits  # the log-softmax of the logits
    assert chunked < logits / 10


def test_unpatched_model_in_the_same_process_is_unchanged():
    a, b = _causal_lm("llama"), _causal_lm("llama")
    batch = _lm_batch()
    before = _run(b, batch)
    handle = patch(a, CompressionPolicy())
    _run(a, batch)
    during = _run(b, batch)
    handle.remove()
    assert "forward" not in vars(b) and during[0].logits is not None
    torch.testing.assert_close(during[0].logits, before[0].logits, rtol=0, atol=0)
    _assert_same(during, before)


def test_remove_restores_forward_and_keeps_an_earlier_wrapper():
    """A forward wrapped before patching (accelerate's autocast does this) still runs, and comes back on remove."""
    model = _causal_lm("llama")
    calls = []
    inner = model.forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    model.forward = wrapper
    handle = patch(model, CompressionPolicy())
    out = model(**_lm_batch())
    assert calls == [1] and out.logits is None
    handle.remove()
    assert model.forward is wrapper
    del model.forward
    handle = patch(model, CompressionPolicy())
    handle.remove()
    handle.remove()
    assert "forward" not in vars(model)


@pytest.mark.parametrize(
    "model",
    [
        lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(**SMALL)),  # scales its logits
        lambda: transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**SMALL)),
    ],
)
def test_other_models_keep_their_head(model):
    model = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = patch(model, CompressionPolicy())
    assert not handle.chunked_lm_head and "forward" not in vars(model)
    handle.remove()
    llama = _causal_lm("llama")
    assert not patch(llama, CompressionPolicy(lm_head_chunk=None)).chunked_lm_head


def test_logits_changed_before_the_loss_are_refused():
    """A listed family whose forward started transforming the logits would fail loudly, not train on the wrong loss."""
    model = _causal_lm("llama")
    handle = patch(model, CompressionPolicy())
    model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(RuntimeError, match="changes its logits between the head and the loss"):
        model(**_lm_batch())
    handle.remove()


def test_trainer_with_slimfit_callback(tmp_path, monkeypatch):
    """A few Trainer steps on a tiny Llama: the loss comes from the chunked head, is finite and falls, and the
    head's gradient flows through it."""
    from slimfit.integrations.hf import SlimFitCallback

    backward_calls = []
    original_backward = LinearCrossEntropyFunction.backward

    def counted(ctx, grad):
        backward_calls.append(ctx.needs_input_grad[:2])
        return original_backward(ctx, grad)

    monkeypatch.setattr(LinearCrossEntropyFunction, "backward", staticmethod(counted))
    model = _causal_lm("llama")
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 300, (16,), generator=g) for _ in range(8)]
    dataset = [dict(input_ids=r, labels=r) for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = SlimFitCallback(freeze_ratio=0.5, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert len(backward_calls) == 16  # every micro-batch's loss went through the chunked head
    assert all(needs_hidden for needs_hidden, _ in backward_calls)
    assert "forward" not in vars(model)  # SlimFit removed at the end of training


def test_causal_lm_left_with_its_full_logits_is_named():
    """A causal LM the chunked head does not cover (Granite scales its logits) is named in the one warning."""
    model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**SMALL))
    with pytest.warns(UserWarning, match=r"lm_head \(GraniteForCausalLM: keeps the full logits, model type 'granite'"):
        handle = patch(model, CompressionPolicy())
    assert any(entry.startswith("lm_head (GraniteForCausalLM") for entry in handle.unsupported)
    handle.remove()
