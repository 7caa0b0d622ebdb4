"""Accelerator-readiness of the feedback solve, measured on any machine (CPU included).

    python -m benchmarks.solve_work                         # T = 1024 ... 65536, D = 1024, B = 1 and 8
    python -m benchmarks.solve_work --T 1024 4096 --B 1     # a quick look
    python -m benchmarks.solve_work --T 8192 --B 8 --methods recursive --tiers bf16x3 bfloat16 --no-compile
    python -m benchmarks.solve_work --layer-compile 4096 65536   # + compile time of the whole layer

For each method, length and batch it prints the work of the solve's forward and
forward + backward, counted from the program (``benchmarks.jaxpr_work``: every dot's FLOPs times its
loop trip count, the taken ``lax.switch`` branch per step), in units of U = B T^2 D (one pass of
a matrix product over the causal half; causal attention costs 2U forward, 7U forward +
backward):
  * ``U`` raw FLOPs, ``pass-U`` bf16-pass equivalents (what an accelerator spends: a bf16x3
    product counts 3, a faithful float32 product 6);
  * ``big``: share of the FLOPs in dots whose M, N and K are all >= 256;
  * ``steps``: iterations of the outermost loops (the sequential spine; inner tile loops are
    in ``all``);
  * ``temp``: XLA's temporary buffers for the compiled forward + backward
    (``memory_analysis()``), ``largest``: the largest array in the compiled program;
  * ``compile``: seconds to compile forward + backward on this machine.
The recursive method is traced as it runs on a GPU (bf16 q, k, f; tier bf16x3, or those of
``--tiers``; the GPU's dot algorithms), the blocked scan as it runs everywhere (float32 HIGHEST).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks.jaxpr_work import count_work
from sessa_jax.ops.dispatch import recursive_tile
from sessa_jax.ops.solve.blocked import blocked_feedback_solve
from sessa_jax.ops.solve.recursive import recursive_feedback_solve


def solver(method: str, b: int, t: int, leaf: int, chunk: int, tier: str = "bf16x3"):
    seg = jnp.ones((b, t), jnp.int32)
    if method == "recursive":

        def solve(q, k, g, f):
            return recursive_feedback_solve(
                q,
                k,
                g,
                f,
                seg,
                leaf_size=leaf,
                tile=recursive_tile(t, leaf),
                tier=tier,
                platform="gpu",
                dtype=jnp.float32,
            ).astype(f.dtype)

        dtype = jnp.bfloat16
    else:

        def solve(q, k, g, f):
            return blocked_feedback_solve(q, k, g, f, seg, chunk, jnp.float32)

        dtype = jnp.float32
    return solve, dtype


def measure(method: str, b: int, t: int, d: int, leaf: int, chunk: int, compile_: bool, tier: str = "bf16x3") -> dict:
    solve, dtype = solver(method, b, t, leaf, chunk, tier)
    x = jax.ShapeDtypeStruct((b, t, d), dtype)
    g = jax.ShapeDtypeStruct((b, t), jnp.float32)

    def fwd_bwd(q, k, gam, f):
        return jax.grad(lambda *a: jnp.sum(solve(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))(q, k, gam, f)

    u = float(b) * t * t * d
    fwd, both = count_work(solve, x, x, g, x), count_work(fwd_bwd, x, x, g, x)
    row = dict(
        method=method,
        tier=tier if method == "recursive" else "float32",
        B=b,
        T=t,
        D=d,
        leaf=leaf if method == "recursive" else chunk,
        fwd_U=fwd.flops / u,
        fwd_pass_U=fwd.pass_flops / u,
        fwd_big=fwd.big_flops / max(fwd.flops, 1),
        fwd_steps=fwd.outer_steps,
        fb_U=both.flops / u,
        fb_pass_U=both.pass_flops / u,
        fb_big=both.big_flops / max(both.flops, 1),
        fb_steps=both.outer_steps,
        fb_all_steps=both.all_steps,
    )
    if compile_:
        t0 = time.perf_counter()
        compiled = jax.jit(fwd_bwd).lower(x, x, g, x).compile()
        row["compile_s"] = time.perf_counter() - t0
        row["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
        row["largest_bytes"], row["largest"] = harness.largest_array(compiled.as_text())
    return row


def layer_compile_seconds(t: int, d: int, h: int, leaf: int) -> float:
    """Seconds to compile forward + backward of a bf16 SessaLayer with the recursive solve."""
    from sessa_jax import SessaConfig, SessaLayer

    cfg = SessaConfig(d_model=d, n_heads=h, solver="recursive", leaf_size=leaf, dtype=jnp.bfloat16)
    layer = SessaLayer(cfg)
    x = jax.ShapeDtypeStruct((1, t, d), jnp.bfloat16)
    variables = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
    step = jax.jit(jax.grad(lambda v, x: jnp.sum(layer.apply(v, x).astype(jnp.float32)), argnums=(0, 1)))
    t0 = time.perf_counter()
    step.lower(variables, x).compile()
    return time.perf_counter() - t0


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def print_table(rows: list[dict]) -> None:
    head = (
        "| method | B | T | leaf/C | fwd U | fwd pass-U | fwd big | fwd steps | f+b U | f+b pass-U | f+b big "
        "| f+b steps (all) | temp | largest | compile s | tier |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['method']} | {r['B']} | {r['T']} | {r['leaf']} | {r['fwd_U']:.2f} | {r['fwd_pass_U']:.2f} | "
            f"{100 * r['fwd_big']:.1f}% | {r['fwd_steps']} | {r['fb_U']:.2f} | {r['fb_pass_U']:.2f} | "
            f"{100 * r['fb_big']:.1f}% | {r['fb_steps']} ({r['fb_all_steps']}) | {_fmt_bytes(r.get('temp_bytes'))} | "
            f"{r.get('largest', '-')} | {r.get('compile_s', float('nan')):.1f} | {r['tier']} |"
        )


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_shape_args(ap, T=[1024, 2048, 4096, 8192, 16384, 32768, 65536], D=1024, B=[1, 8])
    ap.add_argument("--methods", nargs="+", default=["recursive", "blocked"], choices=["recursive", "blocked"])
    harness.add_tier_args(ap, default=["bf16x3"])
    ap.add_argument("--leaf", type=int, default=512, help="leaf of the recursive solve")
    ap.add_argument("--chunk", type=int, default=128, help="chunk of the blocked scan")
    ap.add_argument("--no-compile", action="store_true", help="count work only (no compile time or memory)")
    ap.add_argument(
        "--layer-compile",
        type=int,
        nargs="*",
        default=[],
        help="also time compiling a SessaLayer (D, H=8, bf16) forward + backward at these T",
    )
    harness.add_output_args(ap)
    args = ap.parse_args(argv)
    print(f"# solve_work: {harness.machine_line()}; U = B T^2 D")
    rows = []
    for b in args.B:
        for t in args.T:
            for method in args.methods:
                for tier in args.tiers if method == "recursive" else ["float32"]:
                    rows.append(measure(method, b, t, args.D, args.leaf, args.chunk, not args.no_compile, tier))
                    print(json.dumps(rows[-1]), flush=True)
    print()
    print_table(rows)
    layer = {}
    for t in args.layer_compile:
        layer[t] = layer_compile_seconds(t, args.D, 8, args.leaf)
    if layer:
        print()
        print("| layer fwd+bwd compile, recursive, D=%d, H=8, bf16 | seconds |" % args.D)
        print("|---|---|")
        for t, sec in layer.items():
            print(f"| T={t} | {sec:.1f} |")
    harness.write_json(args.json, {"rows": rows, "layer_compile_s": layer})
    return rows


if __name__ == "__main__":
    main()
