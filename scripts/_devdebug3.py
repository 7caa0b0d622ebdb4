import sys, time
import jax, jax.numpy as jnp
import sessa_jax.ops.dispatch as dispatch
from sessa_jax.ops import feedback_solve
def timeit(fn, *a, n=5):
    out = fn(*a); jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(n): out = fn(*a)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n
B, T, D = 8, 8192, 1024
ks = jax.random.split(jax.random.PRNGKey(0), 5)
q, k, f = (jax.random.normal(ks[i], (B, T, D), jnp.bfloat16) for i in range(3))
g = 0.9 * jnp.tanh(jax.random.normal(ks[3], (B, T)))
for mode in ("preset", "manual"):
    if mode == "manual":
        dispatch.platform_kind = lambda platform=None: "cpu"
    for prec in ("bf16x3", "bfloat16"):
        fb = jax.jit(jax.grad(lambda q, k, g, f: jnp.sum(feedback_solve(q, k, g, f, method="recursive", precision=prec).astype(jnp.float32)), argnums=(0, 1, 2, 3)))
        fwd = jax.jit(lambda q, k, g, f: feedback_solve(q, k, g, f, method="recursive", precision=prec))
        print(mode, prec, "fwd %.2f ms" % (1e3 * timeit(fwd, q, k, g, f)), "f+b %.2f ms" % (1e3 * timeit(fb, q, k, g, f)), flush=True)
