"""Accuracy of the bf16x3 tier on the device: XLA's dot-algorithm preset vs an explicit split.

    PYTHONPATH=$PWD python scripts/gpu_bf16x3_split_check.py

Relative Frobenius error against the float32 tier on the sharp stress case of
tests/test_recursive_solve.py. On an H100 (jax 0.11.2) the explicit split, which is what the
CPU runs, lost the low-order terms (3e-3), so the GPU uses the preset (5e-6).
"""
import sys
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp
import sessa_jax.ops.precision as P
from test_recursive_solve import _inputs, _run, _fro
q, k, g, f, ds = _inputs(jnp.float32, 512, d=64, case="sharp", gamma="pm", seed=7)
args = (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), g, f, ds)
s32, _ = _run("recursive", args, leaf=64, precision="float32", grads=False)
sx3, _ = _run("recursive", args, leaf=64, precision="bf16x3", grads=False)
print("preset bf16x3 vs fp32", _fro(sx3, s32), flush=True)
orig = P.platform_kind
P.platform_kind = lambda platform=None: "cpu"
sx3m, _ = _run("recursive", args, leaf=64, precision="bf16x3", grads=False)
print("manual-split bf16x3 vs fp32", _fro(sx3m, s32), flush=True)
