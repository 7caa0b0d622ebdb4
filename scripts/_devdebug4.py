import sys, time
import jax, jax.numpy as jnp
from sessa_jax.ops import feedback_solve
def timeit(fn, *a, n=5):
    out = fn(*a); jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(n): out = fn(*a)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n
for B, T, D in ((8, 4096, 1024), (1, 4096, 256), (8, 8192, 1024)):
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, f = (jax.random.normal(ks[i], (B, T, D), jnp.bfloat16) for i in range(3))
    g = 0.9 * jnp.tanh(jax.random.normal(ks[3], (B, T)))
    for method in ("recursive", "pallas"):
        if method == "pallas" and T > 4096: continue
        try:
            fwd = jax.jit(lambda q, k, g, f: feedback_solve(q, k, g, f, method=method))
            fb = jax.jit(jax.grad(lambda q, k, g, f: jnp.sum(feedback_solve(q, k, g, f, method=method).astype(jnp.float32)), argnums=(0, 1, 2, 3)))
            print(f"B={B} T={T} D={D} {method} fwd {1e3 * timeit(fwd, q, k, g, f):.2f} ms f+b {1e3 * timeit(fb, q, k, g, f):.2f} ms", flush=True)
        except Exception as e:
            print(f"B={B} T={T} D={D} {method} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
