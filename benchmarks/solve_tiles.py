"""The recursive solve per (tile, leaf) on the default device (how the GPU defaults were chosen).

    python benchmarks/solve_tiles.py 8 8192 1024,256 2048,256 2048,512 4096,512
    python benchmarks/solve_tiles.py 1 65536 2048,512

Arguments: B, T, then tile,leaf pairs. D=1024, bf16 inputs, tier bf16x3. Prints the row
statistics pass alone, the forward and the forward + backward (mean of 5 calls, 2 for T > 8192).
"""
import sys, time
import jax, jax.numpy as jnp
from sessa_jax.ops.solve.recursive import RecursivePlan, recursive_feedback_solve
from sessa_jax.ops.solve.precision import platform_kind
from sessa_jax.ops.solve.row_stats import row_statistics
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
    ones = jnp.ones((B, T), jnp.int32)

    def solve(q, k, g, f, tile=tile, leaf=leaf):
        return recursive_feedback_solve(q, k, g, f, ones, leaf_size=leaf, tile=tile, tier="bf16x3",
                                        platform=platform_kind(), dtype=jnp.float32)

    fwd = jax.jit(solve)
    fb = jax.jit(jax.grad(lambda *a: jnp.sum(solve(*a)), argnums=(0, 1, 2, 3)))
    plan = RecursivePlan.make(T, leaf, tile, "bf16x3", platform_kind(), D ** -0.5)
    seg = jnp.ones((B, plan.padded_len), jnp.int32)
    qp = jnp.pad(q, ((0, 0), (0, plan.padded_len - T), (0, 0)))
    st = jax.jit(lambda q, k: row_statistics(q, k, seg, leaf=plan.leaf, scale=plan.scale, tier="bf16x3", schedule=plan.schedule, platform=plan.platform))
    n = 5 if T <= 8192 else 2
    attempt(f"B={B} T={T} tile={tile} leaf={leaf} stats", st, qp, qp, n=n)
    attempt(f"B={B} T={T} tile={tile} leaf={leaf} fwd", fwd, q, k, g, f, n=n)
    attempt(f"B={B} T={T} tile={tile} leaf={leaf} f+b", fb, q, k, g, f, n=n)
