"""slimfit.memory: saved-for-backward bytes are measured exactly; byte counts by category."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from slimfit.memory import (
    DecodeMeter,
    SavedTensorMeter,
    cuda_peak_bytes,
    gradient_bytes,
    measure_saved_bytes,
    optimizer_state_bytes,
    parameter_bytes,
)


def test_counts_saved_inputs_once_per_storage():
    a = torch.randn(100, requires_grad=True)
    b = torch.randn(100, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = a * b  # saves a and b
        z = a * a  # saves a twice more: same storage, counted once
    assert meter.live_bytes == 2 * 100 * 4
    del y, z
    assert meter.live_bytes == 0


def test_views_count_their_whole_storage():
    base = torch.randn(10, 10, requires_grad=True)
    with SavedTensorMeter() as meter:
        view = base[:2]
        y = view.exp()  # saves its output, a fresh [2, 10] storage
        w = base.t().sin()  # saves its input: a view of base's 400-byte storage
    assert meter.live_bytes == 2 * 10 * 4 + 10 * 10 * 4
    del y, w


def test_parameters_and_their_views_are_excluded():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with SavedTensorMeter(lin) as meter:
        out = lin(x)  # saves x and the weight (parameter)
    assert meter.live_bytes == x.numel() * 4
    del out
    lin.weight.requires_grad_(False)
    assert measure_saved_bytes(lambda: lin(x), exclude=lin) == 0  # frozen weight: only the weight is saved


def test_graph_freed_by_backward_drops_to_zero_and_peak_is_kept():
    x = torch.randn(1000, requires_grad=True)
    with SavedTensorMeter() as meter:
        loss = (x.exp() * x).sum()
    assert meter.live_bytes > 0
    peak = meter.peak_bytes
    loss.backward()
    assert meter.live_bytes == 0
    assert meter.peak_bytes == peak >= 2 * 1000 * 4


def test_meter_does_not_change_results():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 1))
    x = torch.randn(4, 5)
    lin(x).sum().backward()
    ref = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    with SavedTensorMeter(lin):
        out = lin(x).sum()
    out.backward()
    for p, r in zip(lin.parameters(), ref, strict=True):
        assert torch.equal(p.grad, r)


def test_live_by_shape_groups_tensors():
    x = torch.randn(4, 6, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = x.sin()
    assert meter.live_by_shape() == {((4, 6), torch.float32): 96}
    del y


def test_reentry_and_bad_exclude_are_errors():
    meter = SavedTensorMeter()
    with meter, pytest.raises(RuntimeError, match="already active"):
        meter.__enter__()
    with pytest.raises(TypeError, match="exclude must be an nn.Module or an iterable of tensors"):
        SavedTensorMeter(["weight"])


def test_bytes_by_category():
    model = nn.Linear(10, 4)  # 40 + 4 floats
    assert parameter_bytes(model) == 44 * 4
    assert gradient_bytes(model) == 0
    model(torch.randn(2, 10)).sum().backward()
    assert gradient_bytes(model) == 44 * 4
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    # exp_avg and exp_avg_sq per parameter, plus a scalar step tensor per parameter
    assert optimizer_state_bytes(opt) == 2 * 44 * 4 + 2 * 4
    assert optimizer_state_bytes(opt, device="cpu") == optimizer_state_bytes(opt)
    if not torch.cuda.is_available():
        assert cuda_peak_bytes() is None
        assert optimizer_state_bytes(opt, device="cuda") == 0


def test_decode_meter_counts_what_one_backward_call_decodes_at_once():
    """Two compressed Linears: each backward decodes its 8-bit input (fp32, 4 bytes an element) and frees it on
    return, so the peak is the larger decode, not the sum; a GELU with a 4-bit derivative code adds its uint8
    code, int32 indices and fp32 derivative in one call."""
    from slimfit.nn.activation import activation
    from slimfit.nn.linear import linear
    from slimfit.policy import DerivativeCode, Quantize

    torch.manual_seed(0)
    x = torch.randn(4, 16, 256, requires_grad=True)
    w1, w2 = torch.randn(512, 256, requires_grad=True), torch.randn(64, 512, requires_grad=True)
    with DecodeMeter() as meter:
        linear(linear(x, w1, None, Quantize(8)), w2, None, Quantize(8)).sum().backward()
    assert meter.peak_bytes == 4 * 16 * 512 * 4  # the second Linear's input, the larger of the two
    with DecodeMeter() as meter:
        activation(x, "gelu", DerivativeCode(4)).sum().backward()
    assert meter.peak_bytes == x.numel() * (1 + 4 + 4)
    with DecodeMeter() as meter:  # nothing compressed, nothing decoded
        torch.nn.functional.gelu(x).sum().backward()
    assert meter.peak_bytes == 0
    with DecodeMeter(), pytest.raises(RuntimeError, match="do not nest"), DecodeMeter():
        pass


def test_derivative_code_decoded_in_chunks(monkeypatch):
    """A GELU of 2.3 chunks plus a tail that is not a whole byte: at most one chunk decoded at a time (9 bytes an
    element), and the same gradient, bit for bit, as decoding it whole."""
    from slimfit.policy import DerivativeCode

    module = importlib.import_module("slimfit.nn.activation")  # slimfit.nn.activation is also a function

    torch.manual_seed(0)
    x = torch.randn(int(2.3 * module.DECODE_CHUNK) + 5, requires_grad=True)
    upstream = torch.randn_like(x)
    grads = {}
    for chunk in (module.DECODE_CHUNK, 2 * x.numel()):
        monkeypatch.setattr(module, "DECODE_CHUNK", chunk)
        with DecodeMeter() as meter:
            (grads[chunk],) = torch.autograd.grad(module.activation(x, "gelu", DerivativeCode(4)), x, upstream)
        assert meter.peak_bytes == min(chunk, x.numel()) * (1 + 4 + 4)
    assert torch.equal(*grads.values())


def test_decode_profile_of_one_example_predicts_a_larger_batch():
    """A Linear whose dequantized input grows with the batch, and a GELU whose derivative code is decoded in
    chunks: profiled on one example, the peak predicted for 4 is the one measured on 4 (the Linear's input,
    4x; the GELU's chunks stop growing at a chunk)."""
    from slimfit.memory import DecodeProfile
    from slimfit.nn.activation import activation
    from slimfit.nn.linear import linear
    from slimfit.policy import DerivativeCode, Quantize

    torch.manual_seed(0)
    w1, w2 = torch.randn(1536, 512, requires_grad=True), torch.randn(64, 1536, requires_grad=True)

    def backward(batch: int, profile: DecodeProfile | None = None) -> int:
        x = torch.randn(batch, 200, 512)
        hidden = activation(linear(x, w1, None, Quantize(8)), "gelu", DerivativeCode(4))
        with DecodeMeter(profile) as meter:
            linear(hidden, w2, None, Quantize(8)).sum().backward()
        return meter.peak_bytes

    profile = DecodeProfile()
    one = backward(1, profile)
    assert profile.peak(1) == one
    assert profile.peak(4) == backward(4) == 4 * 200 * 1536 * 4  # the second Linear's dequantized input
    assert one == 9 * importlib.import_module("slimfit.nn.activation").DECODE_CHUNK  # a full GELU chunk
