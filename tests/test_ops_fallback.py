"""With SLIMFIT_FORCE_REFERENCE=1 every op still works, on the pure-PyTorch reference path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, torch
import slimfit._extension as ext
from slimfit import ops
x = torch.randn(6, 70)
q = ops.quantize(x, bits=4, group_size=32, stochastic=True)
s = ops.sparsify(x, keep=0.2)
m = x > 0
out = {
    "loaded": ext.STATUS.loaded,
    "quantize_err": float((ops.dequantize(q) - x).abs().max() / (x.max() - x.min())),
    "sparse_kept": int((ops.densify(s) != 0).sum()),
    "bits_ok": bool(torch.equal(ops.unpack_bits(ops.pack_bits(m)), m)),
    "norm": ops.update_norms([x], [x * 1.5]).tolist(),
}
print(json.dumps(out))
"""


def test_forced_reference_path_works():
    env = {**os.environ, "SLIMFIT_FORCE_REFERENCE": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loaded"] is False
    assert out["quantize_err"] <= 2 / 15
    assert out["sparse_kept"] == 6 * 14
    assert out["bits_ok"]
    assert abs(out["norm"][0] - 0.5) < 1e-6
