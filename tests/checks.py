"""Assertions shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import torch


def bits_of(t: torch.Tensor, any_nan: bool = False) -> torch.Tensor:
    """Bit pattern of a tensor on CPU; with ``any_nan`` every NaN made one NaN (for formats that leave NaN payloads
    open)."""
    t = t.detach().cpu().contiguous()
    if not t.is_floating_point():
        return t
    if any_nan:
        t = t.masked_fill(t.isnan(), float("nan"))
    return t.view(torch.uint8) if t.dim() else t.view(1).view(torch.uint8)


def assert_same(a, b, any_nan: bool = False) -> None:
    """Each pair of tensors has the same dtype, shape and bits (NaN payloads aside with ``any_nan``)."""
    for u, v in zip(a, b, strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert torch.equal(bits_of(u, any_nan), bits_of(v, any_nan))


def expect_cli_error(capsys, argv: list[str], *fragments: str, output: Path | None = None) -> str:
    """The command line refuses ``argv`` with exit status 2 and one line naming every fragment, writing no output."""
    from slimfit import cli  # here, not at the top: the op tests that share this module need no transformers

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    if output is not None:
        assert not output.exists()
    return err
