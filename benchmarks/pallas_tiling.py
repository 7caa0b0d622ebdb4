"""Tuning sweep of the Pallas feedback-solve kernel: forward and forward+backward time of
`pallas_feedback_solve` for each (chunk, block_d) at one problem size, next to the blocked scan.

GPU run at the issue's feedback width (the layer's solve is one (B, T, D) problem):
    python benchmarks/pallas_tiling.py --B 8 --T 8192 --D 1024 --dtype bfloat16
CPU smoke run (interpret mode: checks the plumbing; its timings mean nothing):
    python benchmarks/pallas_tiling.py --B 1 --T 64 --D 32 --chunks 8 16 --block-d 16 32 --interpret

FLOP model (useful work, causal half, as in benchmarks/feedback_solve.py): forward 2 B T^2 D,
forward+backward 7 B T^2 D. On the GPU kernel every program of block_d output columns
recomputes the C x C logits over all D, so the logits are executed D_pad / block_d times
("recompute" column): fewer, wider programs trade parallelism for less repeated work.
"% peak" divides by a bf16/f32 matmul timed in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import jax
import jax.numpy as jnp
from layer import bench, matmul_peak

from sessa_jax.ops import feedback_solve
from sessa_jax.ops.pallas import pallas_feedback_solve


def problem(b, t, d, dtype):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, f = (jax.random.normal(kk, (b, t, d), jnp.float32).astype(dtype) for kk in ks[:3])
    gamma = 0.9 * jnp.tanh(jax.random.normal(ks[3], (b, t), jnp.float32))
    return q, k, gamma, f


def timed(solve, args, iters, warmup):
    """(forward seconds, forward+backward seconds) of s = solve(q, k, gamma, f)."""
    fwd = jax.jit(solve)
    loss = lambda *a: jnp.sum(solve(*a).astype(jnp.float32) ** 2)
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    return bench(fwd, args, iters, warmup), bench(fwd_bwd, args, iters, warmup)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--D", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--block-d", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--blocked-chunk", type=int, default=128, help="chunk of the blocked-scan reference row")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--interpret", action="store_true", help="GPU kernel in interpret mode (CPU smoke test)")
    p.add_argument("--json", default=None, help="write all results to this file")
    args = p.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    b, t, d = args.B, args.T, args.D
    inputs = problem(b, t, d, dtype)
    peak = matmul_peak(1024 if jax.default_backend() == "cpu" else 8192, dtype, max(3, args.iters))
    flops = {"fwd": 2 * b * t * t * d, "fwd_bwd": 7 * b * t * t * d}
    print(f"# device: {jax.devices()[0].device_kind} ({jax.default_backend()}); jax {jax.__version__}")
    print(f"# feedback solve B={b} T={t} D={d} {args.dtype}; measured matmul peak {peak:.2f} TFLOP/s")
    print(" | ".join(("solver", "chunk", "block_d", "recompute", "fwd ms", "fwd %pk", "f+b ms", "f+b %pk")))

    def report(row, fwd_s, fwd_bwd_s):
        pct = {k: 100 * flops[k] / s / 1e12 / peak for k, s in (("fwd", fwd_s), ("fwd_bwd", fwd_bwd_s))}
        print(" | ".join(row + (f"{fwd_s * 1e3:.2f}", f"{pct['fwd']:.1f}", f"{fwd_bwd_s * 1e3:.2f}",
                                f"{pct['fwd_bwd']:.1f}")), flush=True)
        return {"fwd_s": fwd_s, "fwd_bwd_s": fwd_bwd_s, "fwd_pct_peak": pct["fwd"], "fwd_bwd_pct_peak": pct["fwd_bwd"]}

    results = []
    blocked = lambda *a: feedback_solve(*a, method="blocked", chunk_size=args.blocked_chunk)
    results.append({"solver": "blocked", "chunk": args.blocked_chunk,
                    **report(("blocked", str(args.blocked_chunk), "-", "-"), *timed(blocked, inputs, args.iters,
                                                                                      args.warmup))})
    d_pad = max(16, 1 << (d - 1).bit_length())
    for chunk, block_d in itertools.product(args.chunks, args.block_d):
        row = ("pallas", str(chunk), str(block_d), f"{d_pad // block_d}x" if block_d <= d_pad else "-")
        solve = lambda *a, c=chunk, bd=block_d: pallas_feedback_solve(*a, chunk_size=c, block_d=bd,
                                                                       backend="gpu" if args.interpret else None,
                                                                       interpret=args.interpret)
        try:
            res = report(row, *timed(solve, inputs, args.iters, args.warmup))
        except Exception as err:  # noqa: BLE001 - an unsupported tiling or an OOM is a result too
            msg = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            print(" | ".join(row + (f"failed: {msg}",)), flush=True)
            res = {"error": msg}
        results.append({"solver": "pallas", "chunk": chunk, "block_d": block_d, **res})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "peak_tflops": peak, "args": vars(args),
                       "results": results}, fh, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
