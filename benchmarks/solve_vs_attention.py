"""The feedback solve alone next to causal attention, on the default device (GPU measurements).

    python -m benchmarks.solve_vs_attention --tiers bf16x3 bfloat16 float32   # recursive solve per tier
    python -m benchmarks.solve_vs_attention --tiers --attention cudnn xla     # attention alone
    python -m benchmarks.solve_vs_attention --tiers --accuracy                # bf16x3 vs float32 on this device

B=8, T=8192, D=1024 by default (attention: H=8 heads of D/H), bf16 inputs; prints the mean wall
time of --calls calls after a warm-up, forward and forward + backward, of the recursive solve
at each tier of --tiers and of ``jax.nn.dot_product_attention`` with each implementation of
--attention.

--accuracy: the bf16x3 tier's relative Frobenius error against the float32 tier, as this
device's compiler builds both, on a sharp stress case (T=512, D=64, leaf 64, logits ~ N(0, 16^2),
gamma +-0.999, bf16 q and k; the tier's bound is 1e-5). On a GPU this is what shows the bf16x3
split's low parts survive the compiler (a split the compiler simplifies away falls to one bf16
pass's error, above 1e-4).
"""

from __future__ import annotations

import argparse

from benchmarks import harness

TIERS = ("float32", "bf16x3", "bfloat16")


def _attempt(name: str, fn, args, calls: int) -> None:
    try:
        ms = 1e3 * harness.measure(harness.blocking(fn, *args), warmup=1, repeats=1, number=calls)
        print(f"{name} {ms:.2f} ms", flush=True)
    except Exception as e:  # noqa: BLE001 - one failing cell does not hide the others
        print(name, "FAILED", type(e).__name__, str(e)[:3000], flush=True)


def _grad(fn, n: int):
    import jax
    import jax.numpy as jnp

    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=tuple(range(n))))


def _bf16x3_error() -> float:
    """bf16x3 vs float32 tier, relative Frobenius error of s on the sharp stress case."""
    import jax
    import jax.numpy as jnp

    from benchmarks.solve_accuracy import regime_inputs
    from sessa_jax.ops import feedback_solve

    q, k, g, f, _ = regime_inputs("sharp_pm", 512, d=64, seed=7)
    q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    s = {
        tier: jax.jit(
            lambda q, k, g, f, tier=tier: feedback_solve(q, k, g, f, method="recursive", leaf_size=64, precision=tier)
        )(q, k, g, f)
        for tier in ("float32", "bf16x3")
    }
    return float(jnp.linalg.norm(s["bf16x3"] - s["float32"]) / jnp.linalg.norm(s["float32"]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--D", type=int, default=1024)
    p.add_argument("--H", type=int, default=8, help="attention heads (of D/H each)")
    p.add_argument("--tiers", nargs="*", default=["bf16x3"], choices=TIERS, help="recursive solve tiers (none: skip)")
    p.add_argument(
        "--attention",
        nargs="*",
        default=[],
        choices=["cudnn", "xla"],
        help="jax.nn.dot_product_attention implementations",
    )
    p.add_argument("--accuracy", action="store_true", help="also the bf16x3 tier's error vs float32 on this device")
    p.add_argument("--calls", type=int, default=5, help="timed calls after the warm-up")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from sessa_jax.ops import feedback_solve

    b, t, d, h = args.B, args.T, args.D, args.H
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, f = (jax.random.normal(ks[i], (b, t, d), jnp.bfloat16) for i in range(3))
    g = 0.9 * jnp.tanh(jax.random.normal(ks[3], (b, t)))
    print(f"# {harness.machine_line()}; B={b} T={t} D={d} H={h} bf16, mean of {args.calls} calls")
    for tier in args.tiers:

        def solve(q, k, g, f, tier=tier):
            return feedback_solve(q, k, g, f, method="recursive", precision=tier)

        _attempt(f"recursive fwd {tier}", jax.jit(solve), (q, k, g, f), args.calls)
        _attempt(f"recursive f+b {tier}", _grad(solve, 4), (q, k, g, f), args.calls)
    heads = tuple(x.reshape(b, t, h, d // h) for x in (q, k, f))
    for impl in args.attention:

        def attention(q, k, v, impl=impl):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

        _attempt(f"attention fwd {impl}", jax.jit(attention), heads, args.calls)
        _attempt(f"attention f+b {impl}", _grad(attention, 3), heads, args.calls)
    if args.accuracy:
        print(f"bf16x3 vs float32 tier, sharp stress case: {_bf16x3_error():.2e} (bound 1e-5)", flush=True)


if __name__ == "__main__":
    main()
