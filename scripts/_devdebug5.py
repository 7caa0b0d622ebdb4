import sys
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp
from test_recursive_solve import _inputs, _run, _fro
for qk in (jnp.bfloat16, jnp.float32):
    q, k, g, f, ds = _inputs(jnp.float32, 512, d=64, case="sharp", gamma="pm", seed=7)
    args = (q.astype(qk), k.astype(qk), g, f, ds)
    with jax.enable_x64(True):
        s64, _ = _run("dense", tuple(jnp.asarray(a, jnp.float64) for a in args), grads=False)
    for tile in (None, 128, 1024):
        s32, _ = _run("recursive", args, leaf=64, precision="float32", grads=False, tile=tile)
        print(qk.__name__, "tile", tile, "e32", _fro(s32, s64), flush=True)
    s32d, _ = _run("dense", args, grads=False)
    print(qk.__name__, "dense fp32 e32", _fro(s32d, s64))
    with jax.default_matmul_precision("highest"):
        s32h, _ = _run("recursive", args, leaf=64, precision="float32", grads=False)
        print(qk.__name__, "recursive under default_matmul_precision(highest)", _fro(s32h, s64))
