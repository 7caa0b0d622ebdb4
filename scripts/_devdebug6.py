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
