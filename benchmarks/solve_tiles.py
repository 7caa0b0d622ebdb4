"""The recursive solve per (tile, leaf) on the default device (how the GPU defaults were chosen).

    python -m benchmarks.solve_tiles --B 8 --T 8192 --tiles 1024,256 2048,256 2048,512 4096,512
    python -m benchmarks.solve_tiles --B 1 --T 65536 --tiles 2048,512

bf16 q, k, f (B, T, D), float32 gamma, at one precision tier (default bf16x3). For each
tile,leaf pair it prints the row statistics pass alone, the forward and the forward + backward:
the mean of --calls calls after a warm-up (default 5, 2 for T > 8192). A pair that fails (out of
memory, a shape the kernels refuse) says why and the others go on.
"""

from __future__ import annotations

import argparse

from benchmarks import harness


def _pair(text: str) -> tuple[int, int]:
    try:
        tile, leaf = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TILE,LEAF, e.g. 2048,512") from None
    return tile, leaf


def _attempt(name: str, call, calls: int) -> None:
    try:
        print(name, "%.2f ms" % (1e3 * harness.measure(call, warmup=1, repeats=1, number=calls)), flush=True)
    except Exception as e:  # noqa: BLE001 - one pair failing does not hide the others
        print(name, "FAILED", type(e).__name__, str(e)[:500], flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--D", type=int, default=1024)
    p.add_argument("--tiles", nargs="+", type=_pair, default=[(2048, 512)], help="TILE,LEAF pairs")
    p.add_argument("--tier", default="bf16x3", choices=["float32", "bf16x3", "bfloat16"])
    p.add_argument("--calls", type=int, default=None, help="timed calls (default 5, 2 for T > 8192)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from sessa_jax.ops.solve.precision import platform_kind
    from sessa_jax.ops.solve.recursive import RecursivePlan, recursive_feedback_solve
    from sessa_jax.ops.solve.row_stats import row_statistics

    b, t, d, tier = args.B, args.T, args.D, args.tier
    calls = args.calls or (5 if t <= 8192 else 2)
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, f = (jax.random.normal(ks[i], (b, t, d), jnp.bfloat16) for i in range(3))
    g = 0.9 * jnp.tanh(jax.random.normal(ks[3], (b, t)))
    ones = jnp.ones((b, t), jnp.int32)
    print(f"# {harness.machine_line()}; B={b} T={t} D={d} bf16, tier {tier}, mean of {calls} calls")
    for tile, leaf in args.tiles:

        def solve(q, k, g, f, tile=tile, leaf=leaf):
            return recursive_feedback_solve(
                q, k, g, f, ones, leaf_size=leaf, tile=tile, tier=tier, platform=platform_kind(), dtype=jnp.float32
            )

        fwd = jax.jit(solve)
        fb = jax.jit(jax.grad(lambda *a: jnp.sum(solve(*a)), argnums=(0, 1, 2, 3)))
        plan = RecursivePlan.make(t, leaf, tile, tier, platform_kind(), d**-0.5)
        seg = jnp.ones((b, plan.padded_len), jnp.int32)
        qp = jnp.pad(q, ((0, 0), (0, plan.padded_len - t), (0, 0)))
        stats = jax.jit(
            lambda q, k, plan=plan, seg=seg: row_statistics(
                q, k, seg, leaf=plan.leaf, scale=plan.scale, tier=tier, schedule=plan.schedule, platform=plan.platform
            )
        )
        name = f"B={b} T={t} tile={tile} leaf={leaf}"
        _attempt(f"{name} stats", harness.blocking(stats, qp, qp), calls)
        _attempt(f"{name} fwd", harness.blocking(fwd, q, k, g, f), calls)
        _attempt(f"{name} f+b", harness.blocking(fb, q, k, g, f), calls)


if __name__ == "__main__":
    main()
