import sys, time
import jax, jax.numpy as jnp
import sessa_jax.ops.dispatch as dispatch
from sessa_jax.ops import feedback_solve
from sessa_jax.ops._recursive import RecursivePlan
from sessa_jax.ops.row_stats import row_statistics
def timeit(fn, *a, n=5):
    out = fn(*a); jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(n): out = fn(*a)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n
def attempt(name, fn, *a, n=5):
    try:
        print(name, "%.2f ms" % (1e3 * timeit(fn, *a, n=n)), flush=True)
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:500], flush=True)
B, T = int(sys.argv[1]), int(sys.argv[2]); D = 1024
ks = jax.random.split(jax.random.PRNGKey(0), 5)
q, k, f = (jax.random.normal(ks[i], (B, T, D), jnp.bfloat16) for i in range(3))
g = 0.9 * jnp.tanh(jax.random.normal(ks[3], (B, T)))
for spec in sys.argv[3:]:
    tile, leaf = (int(x) for x in spec.split(","))
    dispatch.RECURSIVE_TILE = tile
    fwd = jax.jit(lambda q, k, g, f: feedback_solve(q, k, g, f, method="recursive", leaf_size=leaf))
    fb = jax.jit(jax.grad(lambda q, k, g, f: jnp.sum(feedback_solve(q, k, g, f, method="recursive", leaf_size=leaf).astype(jnp.float32)), argnums=(0, 1, 2, 3)))
    plan = RecursivePlan.make(T, leaf, tile, "bf16x3", "gpu", D ** -0.5)
    seg = jnp.ones((B, plan.padded_len), jnp.int32)
    qp = jnp.pad(q, ((0, 0), (0, plan.padded_len - T), (0, 0)))
    st = jax.jit(lambda q, k: row_statistics(q, k, seg, leaf=plan.leaf, scale=plan.scale, tier="bf16x3", schedule=plan.schedule, platform="gpu"))
    n = 5 if T <= 8192 else 2
    attempt(f"B={B} T={T} tile={tile} leaf={leaf} stats", st, qp, qp, n=n)
    attempt(f"B={B} T={T} tile={tile} leaf={leaf} fwd", fwd, q, k, g, f, n=n)
    attempt(f"B={B} T={T} tile={tile} leaf={leaf} f+b", fb, q, k, g, f, n=n)
