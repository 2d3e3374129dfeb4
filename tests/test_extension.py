"""The compiled extension: loading, the forced-reference path, `slimfit info`, and the build's guard rails."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimfit
from slimfit import _extension, reference

REPO = Path(__file__).resolve().parents[1]
# Subprocesses start here, not in the repo root: `python -m` / `-c` put the working directory first on sys.path,
# and the source tree's slimfit/ (no compiled _C after a non-editable install) would shadow the installed one.
NEUTRAL_CWD = Path(__file__).resolve().parent
needs_extension = pytest.mark.skipif(not _extension.STATUS.loaded, reason="compiled extension not loaded")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=NEUTRAL_CWD,
        check=False,
    )


def info_json(**env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "slimfit", "info", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=NEUTRAL_CWD,
        check=True,
    )
    return json.loads(proc.stdout)


@needs_extension
def test_info_json_reports_loaded_extension_and_ops():
    info = info_json()
    assert info["version"] == slimfit.__version__
    assert info["torch"] == torch.__version__
    assert info["extension_loaded"] is True
    assert info["extension_reason"] is None
    assert info["cuda_available"] is torch.cuda.is_available()
    assert isinstance(info["cuda_kernels_compiled"], bool)
    assert {"quantize", "dequantize"} <= set(info["ops"])
    assert "CPU" in info["kernels"]["quantize"]


@needs_extension
def test_cpu_kernel_is_the_compiled_one():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("slimfit::quantize", "CPU")
    assert slimfit.ops._kernel("quantize", torch.device("cpu")) is torch.ops.slimfit.quantize


def test_forced_reference_path_works_and_is_reported():
    env = {"SLIMFIT_FORCE_REFERENCE": "1"}
    info = info_json(**env)
    assert info["extension_loaded"] is False
    assert "SLIMFIT_FORCE_REFERENCE" in info["extension_reason"]
    assert info["ops"] == []
    proc = run_python(
        "import torch, slimfit\n"
        "from slimfit import ops, reference\n"
        "assert ops._kernel('quantize', torch.device('cpu')) is reference.quantize\n"
        "x = torch.linspace(-3, 3, 1000)\n"
        "y = ops.dequantize(ops.quantize(x, bits=8, group_size=64))\n"
        "assert (y - x).abs().max() < 0.02\n"
        "print('reference ok')",
        **env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "reference ok" in proc.stdout
    assert "warn" not in proc.stderr.lower()  # forcing the reference path is deliberate: no warning


@needs_extension
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("seed", [None, 7])
def test_compiled_quantize_matches_reference_bitwise(bits, seed):
    x = torch.randn(3, 1001) * 5 + 2
    got = torch.ops.slimfit.quantize(x, bits, 100, seed)
    want = reference.quantize(x, bits, 100, seed)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8))
    y = torch.ops.slimfit.dequantize(*got, bits, 100, list(x.shape), x.dtype)
    assert torch.equal(y, reference.dequantize(*want, bits, 100, list(x.shape), x.dtype))


@needs_extension
@pytest.mark.parametrize("seed", [None, 3])
def test_quantize_ops_pass_opcheck(seed):
    x = torch.randn(4, 130)
    torch.library.opcheck(torch.ops.slimfit.quantize, (x, 4, 64, seed))
    codes, scale, offset = torch.ops.slimfit.quantize(x, 4, 64, seed)
    torch.library.opcheck(torch.ops.slimfit.dequantize, (codes, scale, offset, 4, 64, [4, 130], torch.float32))


def test_setup_refuses_to_build_without_torch():
    # What an isolated `pip install .` runs into: setup.py stops with a message instead of a broken build.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version'];"
            "exec(open('setup.py').read())",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "--no-build-isolation" in proc.stderr
