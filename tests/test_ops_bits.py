"""pack_bits / unpack_bits: compiled kernels against slimfit.reference, layout, arguments."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfit import ops, reference
from slimfit._extension import STATUS, has_kernel

CUDA = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("pack_bits", "CUDA")), reason="no CUDA kernels or GPU"
)
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not STATUS.loaded, reason="extension not loaded")),
    pytest.param("cuda", marks=CUDA),
]
API_DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def mask(shape, p=0.3, seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (2, 3, 67), (1000, 33), (), (0,), (4, 0)])
def test_kernel_matches_reference(device, shape):
    m = mask(shape)
    packed = torch.ops.slimfit.pack_bits(m.to(device))
    assert torch.equal(packed.cpu(), reference.pack_bits(m))
    out = torch.ops.slimfit.unpack_bits(packed, list(shape))
    assert out.device.type == device and out.dtype == torch.bool
    assert torch.equal(out.cpu(), reference.unpack_bits(packed.cpu(), list(shape)))
    assert torch.equal(out.cpu(), m)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_non_contiguous(device):
    m = mask((50, 41)).to(device)
    for view in (m.t(), m[:, ::3], m[1::2]):
        assert torch.equal(torch.ops.slimfit.pack_bits(view).cpu(), reference.pack_bits(view.cpu()))


def test_layout_is_little_endian_within_a_byte():
    m = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    p = ops.pack_bits(m)
    assert p.bits.tolist() == [0b10000001, 0b10]
    assert p.nbytes == 2


@pytest.mark.parametrize("device", API_DEVICES)
def test_api_round_trip(device):
    m = mask((3, 17, 5), seed=4).to(device)
    p = ops.pack_bits(m)
    assert p.bits.device.type == device and p.nbytes == (3 * 17 * 5 + 7) // 8
    assert torch.equal(ops.unpack_bits(p), m)
    assert torch.equal(ops.unpack_bits(p.from_tensors(tuple(t.clone() for t in p.tensors()))), m)


@pytest.mark.skipif(not STATUS.loaded, reason="extension not loaded")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_opcheck(device):
    m = mask((5, 37)).to(device)
    torch.library.opcheck(torch.ops.slimfit.pack_bits.default, (m,))
    torch.library.opcheck(torch.ops.slimfit.unpack_bits.default, (torch.ops.slimfit.pack_bits(m), [5, 37]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), max_size=200), st.integers(1, 3))
def test_property_round_trip(values, rows):
    m = torch.tensor(values, dtype=torch.bool).repeat(rows, 1)
    p = ops.pack_bits(m)
    assert p.bits.numel() == (m.numel() + 7) // 8
    assert torch.equal(ops.unpack_bits(p), m)
    assert torch.equal(p.bits, reference.pack_bits(m))


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask must have dtype torch.bool, got torch.float32"):
        ops.pack_bits(torch.ones(3))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        ops.pack_bits([True, False])
    with pytest.raises(TypeError, match="p must be a PackedBits"):
        ops.unpack_bits(torch.zeros(1, dtype=torch.uint8))
