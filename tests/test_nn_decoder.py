"""Decoder-model Functions (RMSNorm, gated MLP product) against plain PyTorch, and how patch() recognises them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP, LlamaRMSNorm

from slimfit.memory import SavedTensorMeter
from slimfit.nn import GatedProductFunction, RMSNormFunction, gated_product, is_gated_mlp, rms_norm, rms_norm_form
from slimfit.policy import Quantize, TopK

# --- plain PyTorch references ----------------------------------------------------------------------------


def rms_ref(x: torch.Tensor, w: torch.Tensor | None, eps: float, form: str, n_norm: int = 1) -> torch.Tensor:
    """What LlamaRMSNorm ("scale"), GemmaRMSNorm ("offset") and F.rms_norm ("torch") compute."""
    if form == "torch":
        return F.rms_norm(x, x.shape[x.dim() - n_norm :], w, eps)
    up = x if x.dtype == torch.float64 else x.float()
    n = up * torch.rsqrt(up.pow(2).mean(-1, keepdim=True) + eps)
    if form == "scale":
        return w * n.to(x.dtype)
    return (n * (1.0 + (w if w.dtype == torch.float64 else w.float()))).to(x.dtype)


GATED_REF = {
    "silu": lambda g, u: F.silu(g) * u,
    "gelu": lambda g, u: F.gelu(g) * u,
    "gelu_tanh": lambda g, u: F.gelu(g, approximate="tanh") * u,
    "sigmoid": lambda g, u: torch.sigmoid(g) * u,
    "tanh": lambda g, u: torch.tanh(g) * u,
}


def _f64(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _grads(fn, *inputs, seed: int = 1234):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


def _saved_bytes(fn, *inputs, params=()) -> int:
    """Bytes ``fn(*inputs)`` keeps for backward, the inputs included (in a model they are activations too)."""
    with SavedTensorMeter(params) as meter:
        out = fn(*inputs)
    live = meter.live_bytes
    del out
    return live


# --- gradcheck with compression off (float64) --------------------------------------------------------------


@pytest.mark.parametrize("form", ["scale", "offset", "torch"])
def test_rms_norm_gradcheck(form):
    x, w = _f64(3, 4, 6), _f64(6)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1, 1e-5, form, None), (x, w))
    assert torch.autograd.gradcheck(lambda x: RMSNormFunction.apply(x, None, 1, 1e-5, form, None), (x,))
    x2, w2 = _f64(2, 3, 4), _f64(3, 4)  # two normalised dims, as nn.RMSNorm((3, 4)) takes
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 2, 1e-5, form, None), (x2, w2))


@pytest.mark.parametrize("name", sorted(GATED_REF))
def test_gated_product_gradcheck(name):
    gate, up = _f64(3, 5, 7), _f64(3, 5, 7)
    assert torch.autograd.gradcheck(lambda g, u: GatedProductFunction.apply(g, u, name, None), (gate, up))


# --- forward equals the models' own; compression bounds the gradient error ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_forward_is_the_modules_own(dtype):
    torch.manual_seed(0)
    x = (torch.randn(4, 9, 64) * 3).to(dtype).requires_grad_(True)
    llama, gemma, plain = LlamaRMSNorm(64, eps=1e-6), GemmaRMSNorm(64, eps=1e-6), nn.RMSNorm(64, eps=1e-6)
    for m in (llama, gemma, plain):
        nn.init.normal_(m.weight)
        m.to(dtype)
    for module, form in ((llama, "scale"), (gemma, "offset"), (plain, "torch")):
        expected = module(x)
        assert torch.equal(rms_norm(x, module.weight, 1, 1e-6, form, Quantize(8)), expected), form
        assert torch.equal(rms_ref(x, module.weight, 1e-6, form), expected), form


@pytest.mark.parametrize("form", ["scale", "offset", "torch"])
@pytest.mark.parametrize("setting, tol", [(Quantize(8), 0.01), (Quantize(4), 0.1), (TopK(0.5), 0.1)])
def test_rms_norm_compressed_gradient_error(form, setting, tol):
    torch.manual_seed(0)
    x, w = torch.randn(8, 32, 128) * 2 + 0.5, torch.rand(128) + 0.5
    out_ref, g_ref = _grads(lambda x, w: rms_ref(x, w, 1e-6, form), x, w)
    out, g = _grads(lambda x, w: rms_norm(x, w, 1, 1e-6, form, setting), x, w)
    assert torch.equal(out, out_ref)
    assert _rel_err(g[0], g_ref[0]) < tol
    if isinstance(setting, Quantize):  # TopK serves frozen weights: only dx is meant to be accurate
        assert _rel_err(g[1], g_ref[1]) < tol


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])  # the gates of Llama, Qwen2, Mistral, Gemma, ...
@pytest.mark.parametrize("bits, tol", [(8, 0.01), (4, 0.2)])  # measured: 8 bits <= 0.009, 4 bits <= 0.15
def test_gated_product_compressed_gradient_error(name, bits, tol):
    torch.manual_seed(0)
    gate, up = torch.randn(4, 32, 256) * 2, torch.randn(4, 32, 256)
    out_ref, g_ref = _grads(GATED_REF[name], gate, up)
    out, g = _grads(lambda g, u: gated_product(g, u, name, Quantize(bits)), gate, up)
    assert torch.allclose(out, out_ref, atol=1e-6)
    for got, ref in zip(g, g_ref, strict=True):
        assert _rel_err(got, ref) < tol


def test_bfloat16_keeps_dtypes():
    x = torch.randn(4, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    w = nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    up = torch.randn(4, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    y = gated_product(rms_norm(x, w, 1, 1e-6, "offset", Quantize(8)), up, "gelu_tanh", Quantize(8))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == up.grad.dtype == torch.bfloat16


# --- what is saved -------------------------------------------------------------------------------------------


def test_rms_norm_saves_code_and_rstd_only():
    x = torch.randn(8, 16, 128, requires_grad=True)
    trainable, frozen = nn.Parameter(torch.ones(128)), nn.Parameter(torch.ones(128), requires_grad=False)
    rows = 8 * 16
    # 1 byte per element + bf16 scale and offset per 128-group, and fp32 1/rms per row; PyTorch keeps fp32 x and n.
    assert _saved_bytes(lambda x: rms_norm(x, trainable, 1, 1e-6, "scale", Quantize(8)), x, params=[trainable]) == (
        x.numel() + 4 * rows + 4 * rows
    )
    assert _saved_bytes(lambda x: rms_ref(x, trainable, 1e-6, "scale"), x, params=[trainable]) > 8 * x.numel()
    sparse = _saved_bytes(lambda x: rms_norm(x, frozen, 1, 1e-6, "scale", TopK(0.1)), x, params=[frozen])
    assert sparse == rows * 13 * (4 + 2) + rows * 4  # 13 kept fp32 values + uint16 offsets, fp32 1/rms
    no_grad_input = torch.randn(8, 16, 128)
    assert _saved_bytes(lambda x: rms_norm(x, frozen, 1, 1e-6, "scale", Quantize(8)), no_grad_input) == 0
    # Only the weight trains (nothing below does): dweight needs the code, not 1/rms.
    only_weight = _saved_bytes(lambda x: rms_norm(x, trainable, 1, 1e-6, "scale", Quantize(8)), no_grad_input)
    assert only_weight == x.numel() + 4 * rows


def test_gated_product_saves_two_codes():
    gate, up = torch.randn(4, 32, 256, requires_grad=True), torch.randn(4, 32, 256, requires_grad=True)
    code = gate.numel() + 4 * gate.numel() // 128
    assert _saved_bytes(lambda g, u: gated_product(g, u, "silu", Quantize(8)), gate, up) == 2 * code
    assert _saved_bytes(GATED_REF["silu"], gate, up) == 3 * 4 * gate.numel()  # gate, silu(gate), up in fp32
    # Only up needs grad (gate_proj frozen, nothing below trains): d_up = g * act(gate) needs the gate alone.
    assert _saved_bytes(lambda g, u: gated_product(g, u, "silu", Quantize(8)), gate.detach(), up) == code
    with torch.no_grad():
        assert _saved_bytes(lambda g, u: gated_product(g, u, "silu", Quantize(8)), gate, up) == 0


# --- the reference ops path gives the same results as the compiled kernels --------------------------------------

_REFERENCE_SCRIPT = """
import json, torch
import slimfit._extension as ext
from slimfit.nn import gated_product, rms_norm
from slimfit.policy import Quantize
g = torch.Generator().manual_seed(0)
x, w = torch.randn(4, 16, 128, generator=g).requires_grad_(), torch.randn(128, generator=g).requires_grad_()
gate, up = torch.randn(4, 16, 96, generator=g).requires_grad_(), torch.randn(4, 16, 96, generator=g).requires_grad_()
y = rms_norm(x, w, 1, 1e-6, "offset", Quantize(8)).sum() + gated_product(gate, up, "gelu_tanh", Quantize(4)).sum()
y.backward()
print(json.dumps({"loaded": ext.STATUS.loaded, "grads": [t.grad.flatten().tolist() for t in (x, w, gate, up)]}))
"""


def _run(force_reference: bool) -> dict:
    env = {**os.environ, "SLIMFIT_FORCE_REFERENCE": "1" if force_reference else "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _REFERENCE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_reference_path_matches_compiled_kernels():
    reference, compiled = _run(True), _run(False)
    assert reference["loaded"] is False
    for got, want in zip(reference["grads"], compiled["grads"], strict=True):
        assert got == want


# --- recognising RMSNorm forms and gated MLPs by their forward ---------------------------------------------------


class CustomRMSNorm(nn.Module):
    """A family slimfit never names: Llama's formula, written differently, eps under another attribute name."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class CenteredRMSNorm(CustomRMSNorm):
    def forward(self, x):
        return super().forward(x - x.mean(-1, keepdim=True))


class EpsIgnoredRMSNorm(CustomRMSNorm):
    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))


class GatedRMSNorm(CustomRMSNorm):
    def forward(self, x, gate=None):
        return super().forward(x if gate is None else x * F.silu(gate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_form_by_probe(dtype):
    assert rms_norm_form(LlamaRMSNorm(32).to(dtype)) == "scale"
    assert rms_norm_form(GemmaRMSNorm(32).to(dtype)) == "offset"  # zero-initialised weight: the probe uses its own
    assert rms_norm_form(CustomRMSNorm(32).to(dtype)) == "scale"
    for module in (CenteredRMSNorm(32), EpsIgnoredRMSNorm(32), GatedRMSNorm(32), nn.LayerNorm(32)):
        assert rms_norm_form(module.to(dtype)) is None, type(module).__name__


class SumMLP(LlamaMLP):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


class ScaledMLP(LlamaMLP):
    def forward(self, x, scale=1.0):
        return super().forward(x) * scale


def test_is_gated_mlp_by_probe():
    sizes = dict(hidden_size=16, intermediate_size=40, num_attention_heads=2)
    config = LlamaConfig(hidden_act="silu", **sizes)
    assert is_gated_mlp(LlamaMLP(config))
    assert is_gated_mlp(GemmaMLP(LlamaConfig(hidden_act="gelu_pytorch_tanh", **sizes)))
    assert not is_gated_mlp(SumMLP(config))
    assert not is_gated_mlp(ScaledMLP(config))
    assert not is_gated_mlp(nn.Linear(4, 4))


def test_probe_leaves_weights_and_rng_alone():
    module = GemmaRMSNorm(32)
    before = module.weight.detach().clone()
    state = torch.get_rng_state()
    assert rms_norm_form(module) == "offset"
    assert torch.equal(module.weight, before) and torch.equal(torch.get_rng_state(), state)
    assert math.isclose(module.eps, 1e-6)
