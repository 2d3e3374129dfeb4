"""update_norms: compiled kernels against slimfit.reference, NaN isolation, zero tensors, arguments."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfit import ops, reference
from slimfit._extension import STATUS, has_kernel

CUDA = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("update_norms", "CUDA")), reason="no CUDA kernels or GPU"
)
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not STATUS.loaded, reason="extension not loaded")),
    pytest.param("cuda", marks=CUDA),
]
API_DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
METRICS = list(ops.NORM_EPS)


def pairs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(768, 768), (3072,), (7, 5, 3), (1,), (0,), (200_003,), (64, 1)]
    before = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    after = [b + (0.01 * torch.randn(b.shape, generator=g)).to(dtype) for b in before]
    return before, after


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_reference(device, metric, dtype):
    before, after = pairs(dtype=dtype)
    eps = ops.NORM_EPS[metric]
    got = torch.ops.slimfit.update_norms([b.to(device) for b in before], [a.to(device) for a in after], metric, eps)
    assert got.dtype == torch.float32 and got.shape == (len(before),) and got.device.type == device
    torch.testing.assert_close(got.cpu(), reference.update_norms(before, after, metric, eps), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_mixed_dtypes_and_non_contiguous(device):
    g = torch.Generator().manual_seed(1)
    before = [torch.randn(40, 30, generator=g).t(), torch.randn(100, generator=g).half(), torch.randn(9)[::2]]
    after = [(b.float() * 1.01).to(b.dtype) for b in before]
    for metric, eps in ops.NORM_EPS.items():
        got = torch.ops.slimfit.update_norms([b.to(device) for b in before], [a.to(device) for a in after], metric, eps)
        torch.testing.assert_close(got.cpu(), reference.update_norms(before, after, metric, eps), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_non_finite_only_affects_its_entry(device, metric):
    before, after = pairs(seed=2)
    clean = ops.update_norms(before, after, metric)
    after[0] = after[0].clone()
    after[0][3, 4] = float("nan")
    before[2] = before[2].clone()
    before[2][0, 0, 0] = float("inf")
    got = ops.update_norms([b.to(device) for b in before], [a.to(device) for a in after], metric).cpu()
    assert got[0].isnan() and not got[2].isfinite()
    keep = [i for i in range(len(before)) if i not in (0, 2)]
    assert torch.equal(got[keep], clean[keep])


@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_zero_and_empty_tensors_are_finite(device, metric):
    before = [torch.zeros(10, 10, device=device), torch.zeros(0, device=device), torch.zeros(5, device=device)]
    after = [torch.zeros(10, 10, device=device), torch.zeros(0, device=device), torch.full((5,), 1e-3, device=device)]
    got = ops.update_norms(before, after, metric)
    assert got.isfinite().all()
    assert got[0] == 0 and got[1] == 0 and got[2] > 0


def test_values():
    before = [torch.tensor([3.0, 4.0]), torch.tensor([2.0, -1.0, 0.0])]
    after = [torch.tensor([3.0, 4.5]), torch.tensor([2.5, -1.0, 1e-8])]
    torch.testing.assert_close(ops.update_norms(before, after), torch.tensor([0.1, 0.5 / 5**0.5]))
    torch.testing.assert_close(ops.update_norms(before, after, "rel_l1_mean"), torch.tensor([0.0625, 1.25 / 3]))


def test_empty_list_and_autograd_inputs():
    assert ops.update_norms([], []).shape == (0,)
    w = torch.nn.Parameter(torch.ones(3))
    out = ops.update_norms([w], [w.detach() * 2])
    assert not out.requires_grad and out.item() == pytest.approx(1.0)


@pytest.mark.skipif(not STATUS.loaded, reason="extension not loaded")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_opcheck(device):
    before, after = pairs(seed=3)
    before = [b.to(device) for b in before[:4]]
    after = [a.to(device) for a in after[:4]]
    for metric, eps in ops.NORM_EPS.items():
        torch.library.opcheck(torch.ops.slimfit.update_norms.default, (before, after, metric, eps))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.floats(-1e3, 1e3, width=32), max_size=50), min_size=1, max_size=5),
    st.floats(-1.0, 1.0),
    st.sampled_from(METRICS),
)
def test_property_scaling(rows, factor, metric):
    before = [torch.tensor(r, dtype=torch.float32) for r in rows]
    after = [b * (1 + factor) for b in before]
    got = ops.update_norms(before, after, metric)
    assert got.isfinite().all() and (got >= 0).all()
    for g, b in zip(got, before, strict=True):
        if metric == "rel_l2" and b.abs().sum() > 1e-3:
            assert g.item() == pytest.approx(abs(factor), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    ("before", "after", "metric", "match"),
    [
        ([torch.ones(2)], [torch.ones(2)], "l2", r"metric must be one of \['rel_l1_mean', 'rel_l2'\], got 'l2'"),
        ([torch.ones(2)], [], "rel_l2", "before and after must have the same length, got 1 and 0"),
        ([torch.ones(2)], [torch.ones(3)], "rel_l2", r"before\[0\] and after\[0\] must have the same shape"),
        ([torch.ones(2, dtype=torch.int32)], [torch.ones(2)], "rel_l2", r"before\[0\] must have dtype float32"),
        (torch.ones(2), [torch.ones(2)], "rel_l2", "before must be a list or tuple of tensors, got Tensor"),
    ],
)
def test_bad_arguments(before, after, metric, match):
    with pytest.raises(ValueError, match=match):
        ops.update_norms(before, after, metric)
