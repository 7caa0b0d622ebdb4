"""The bf16x3 tier on the device: the explicit bit-rounded split (GPU default) vs XLA's preset.

    PYTHONPATH=$PWD python scripts/gpu_bf16x3_split_check.py

Accuracy: relative Frobenius error against the float32 tier on the sharp stress case of
tests/test_recursive_solve.py (the tier's bound is 1e-5). Speed: the recursive solve's forward +
backward at B=8, T=8192, D=1024, bf16 (mean of 5 calls after a warm-up), each mode in turn.
History: on an H100 (jax 0.11.2) a split written as bf16(x - float32(bf16(x))) lost its low
parts (3e-3) because XLA's GPU compiler drops the round trip; the split now rounds on the bits
(``precision.bf16_round_bits``), and ``benchmarks/gpu_compile.py --dump`` shows the low parts
survive compilation. This script is what confirms it on a device.
"""
import sys
import time

sys.path.insert(0, "tests")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import sessa_jax.ops.solve.precision as P  # noqa: E402
from sessa_jax.ops import feedback_solve  # noqa: E402
from test_recursive_solve import _fro, _inputs, _run  # noqa: E402

q, k, g, f, ds = _inputs(jnp.float32, 512, d=64, case="sharp", gamma="pm", seed=7)
args = (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), g, f, ds)
s32, _ = _run("recursive", args, leaf=64, precision="float32", grads=False)
B, T, D = 8, 8192, 1024
ks = jax.random.split(jax.random.PRNGKey(0), 4)
big = [jax.random.normal(ks[i], (B, T, D), jnp.bfloat16) for i in range(3)]
gam = 0.9 * jnp.tanh(jax.random.normal(ks[3], (B, T)))
for mode in ("split", "preset"):
    P.GPU_BF16X3 = mode
    sx3, _ = _run("recursive", args, leaf=64, precision="bf16x3", grads=False)
    fb = jax.jit(jax.grad(lambda q, k, g, f: jnp.sum(feedback_solve(q, k, g, f, method="recursive")
                                                     .astype(jnp.float32)), argnums=(0, 1, 2, 3)))
    jax.block_until_ready(fb(big[0], big[1], gam, big[2]))
    t0 = time.perf_counter()
    for _ in range(5):
        out = fb(big[0], big[1], gam, big[2])
    jax.block_until_ready(out)
    print(f"{mode}: bf16x3 vs fp32 {_fro(sx3, s32):.2e} (bound 1e-5); solve f+b B={B} T={T} D={D} "
          f"{(time.perf_counter() - t0) / 5 * 1e3:.2f} ms", flush=True)
