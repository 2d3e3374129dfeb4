"""sparsify / densify: compiled kernels against slimfit.reference, top-k semantics, format, arguments."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from checks import assert_same, bits_of
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfit import ops, reference
from slimfit._extension import STATUS, has_kernel

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("sparsify", "CUDA")), reason="no CUDA kernels or GPU"
)
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not STATUS.loaded, reason="extension not loaded")),
    pytest.param("cuda", marks=CUDA),
]
API_DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def sample(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if x.numel() > 8:
        flat = x.view(-1)
        flat[::5] = flat[1]  # magnitude ties
        flat[2] = -flat[1]
    return x


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 37), (3, 4, 129), (4, 1), (2, 3000), (), (3, 0), (0, 4)])
@pytest.mark.parametrize("keep", [0.01, 0.1, 0.5, 1.0])
def test_kernel_matches_reference(device, dtype, shape, keep):
    x = sample(shape, dtype)
    k = ops.keep_count(shape[-1] if shape else 1, keep)
    got = torch.ops.slimfit.sparsify(x.to(device), k)
    want = reference.sparsify(x, k)
    assert_same(got, want)
    dense = torch.ops.slimfit.densify(*got, list(shape))
    assert dense.device.type == device
    assert_same([dense], [reference.densify(*want, list(shape))])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_rows_use_block_offsets(device, dtype):
    n = 3 * 65536 + 1234
    x = sample((2, n), dtype, seed=1)
    x[0, 65536:131072] = 0  # an empty middle block
    x[1, -5:] = 1e4  # the last, short block holds the largest entries
    k = ops.keep_count(n, 0.05)
    got = torch.ops.slimfit.sparsify(x.to(device), k)
    want = reference.sparsify(x, k)
    assert_same(got, want)
    assert got[2].shape == (2, 4)
    assert_same([torch.ops.slimfit.densify(*got, [2, n])], [reference.densify(*want, [2, n])])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_non_contiguous(device):
    x = sample((40, 300), torch.float32).to(device)
    for view in (x.t(), x[:, ::3], x[::2, 1:]):
        assert_same(torch.ops.slimfit.sparsify(view, 9), reference.sparsify(view.cpu(), 9))


@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_keeps_largest_magnitudes_exactly(device, dtype):
    x = sample((6, 50), dtype, seed=2)
    x[3, 10] = float("nan")
    x[4, 20] = float("-inf")
    s = ops.sparsify(x.to(device), keep=0.1)
    assert s.values.shape == (6, 5) and s.indices.dtype == torch.int16
    dense = ops.densify(s).cpu()
    assert dense.shape == x.shape and dense.dtype == dtype
    kept = (dense != 0) | dense.isnan()
    assert (kept.sum(dim=1) <= 5).all()
    assert torch.equal(bits_of(dense[kept]), bits_of(x[kept]))
    assert dense[3, 10].isnan() and dense[4, 20] == float("-inf")
    # Every dropped entry is no larger than the smallest kept one of its row (NaN ranks highest).
    mag = x.float().abs().nan_to_num(nan=math.inf)
    smallest_kept = torch.where(kept, mag, math.inf).amin(dim=1, keepdim=True)
    assert (torch.where(kept, 0.0, mag) <= smallest_kept).all()


def test_ties_go_to_the_lower_column():
    s = ops.sparsify(torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5]), keep=0.4)
    assert s.indices.tolist() == [[1, 2]]
    assert s.values.tolist() == [[-2.0, 2.0]]


@pytest.mark.parametrize(("n", "keep", "k"), [(30, 0.1, 3), (10, 0.1, 1), (7, 0.01, 1), (768, 0.1, 77), (5, 1, 5)])
def test_keep_count(n, keep, k):
    assert ops.keep_count(n, keep) == k
    assert ops.sparsify(torch.randn(2, n), keep=keep).values.shape == (2, k)


def test_footprint():
    s = ops.sparsify(torch.randn(8, 768), keep=0.1)
    assert s.nbytes == 8 * 77 * (4 + 2)
    s = ops.sparsify(torch.randn(1, 70000, dtype=torch.float16), keep=0.1)
    assert s.nbytes == 7000 * (2 + 2) + 2 * 4
    rebuilt = s.from_tensors(tuple(t.clone() for t in s.tensors()))
    assert torch.equal(ops.densify(rebuilt), ops.densify(s))


@pytest.mark.parametrize("device", API_DEVICES)
@pytest.mark.parametrize("shape", [(0,), (4, 0), (0, 3), (2, 0, 5)])
def test_empty(device, shape):
    x = torch.empty(shape, device=device)
    s = ops.sparsify(x, keep=0.5)
    assert s.nbytes == 0
    y = ops.densify(s)
    assert y.shape == shape and y.device.type == device


@pytest.mark.skipif(not STATUS.loaded, reason="extension not loaded")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_opcheck(device):
    x = sample((5, 37), torch.float32).to(device)
    torch.library.opcheck(torch.ops.slimfit.sparsify.default, (x, 4))
    torch.library.opcheck(torch.ops.slimfit.sparsify.default, (x.t().bfloat16(), 2))
    values, indices, offsets = torch.ops.slimfit.sparsify(x, 4)
    torch.library.opcheck(torch.ops.slimfit.densify.default, (values, indices, offsets, [5, 37]))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 4),
    values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=80),
    keep=st.floats(0.001, 1.0),
)
def test_property_round_trip(rows, values, keep):
    x = torch.tensor(values, dtype=torch.float32).expand(rows, -1)
    s = ops.sparsify(x, keep=keep)
    y = ops.densify(s)
    k = ops.keep_count(len(values), keep)
    assert s.values.shape == (rows, k)
    kept = y != 0
    assert torch.equal(y[kept], x[kept])
    assert (kept.sum(dim=1) <= k).all()
    assert_same(s.tensors(), reference.sparsify(x, k))


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_keep(keep):
    with pytest.raises(ValueError, match=r"keep must be a number in \(0, 1\], got"):
        ops.sparsify(torch.randn(4), keep=keep)


def test_bad_input():
    with pytest.raises(ValueError, match="x must have dtype float32, float16 or bfloat16, got torch.int64"):
        ops.sparsify(torch.arange(4))
    with pytest.raises(TypeError, match="s must be a SparseTensor"):
        ops.densify(torch.randn(3))


@pytest.mark.skipif(not STATUS.loaded, reason="extension not loaded")
def test_parts_on_different_devices_are_refused():
    s = ops.sparsify(torch.randn(4, 30), keep=0.1)
    with pytest.raises(ValueError, match=r"s\.indices must be on the device of s\.values \(cpu\), got meta"):
        ops.densify(dataclasses.replace(s, indices=s.indices.to("meta")))
    # Called directly, a meta part sends the op to its fake kernel, which must refuse rather than invent a result.
    with pytest.raises(ValueError, match=r"block_offsets must be on the device of values \(cpu\), got meta"):
        torch.ops.slimfit.densify(s.values, s.indices, s.block_offsets.to("meta"), [4, 30])


@pytest.mark.skipif(not has_kernel("densify", "CPU"), reason="no compiled CPU kernel")
def test_kernel_refuses_parts_on_different_devices():
    # Straight into the CPU kernel with a meta part, as the dispatcher sends a CUDA kernel host indices: the
    # shared check must stop it before any data is read.
    s = ops.sparsify(torch.randn(4, 30), keep=0.1)
    cpu_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    densify = torch.ops.slimfit.densify.default
    with pytest.raises(
        RuntimeError, match=r"slimfit::densify: indices must be on the device of values \(cpu\), got meta"
    ):
        densify.redispatch(cpu_kernel, s.values, s.indices.to("meta"), s.block_offsets, [4, 30])
