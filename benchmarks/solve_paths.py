"""The recursive solve's forward + backward per path, on the default device.

    python -m benchmarks.solve_paths                                  # B=8, T=8192, D=1024, leaf 512
    python -m benchmarks.solve_paths --B 1 --T 256 --D 32 --leaf 32  # a toy size (CPU)

Four paths: segment ids None (no segment mask, only causality) or one segment (the masked path),
each with the loop schedule and with the wide blocks static (``schedule.auto_static_span``; the
default for the bf16x3 tier and the Mosaic GPU kernels, ``recursive.default_static_span``). bf16
q, k, f, float32 gamma, at the library's tier for bf16 compute on this platform (or --tier). Each
path is timed (mean of --calls calls after a warm-up), and its s and gradients are compared with
the first path's (relative Frobenius error, the largest over the four gradients). With ``--kernels
xla gpu_gemm`` each listed kernel set other than "xla" is then timed at the default schedule,
segment ids None (and one segment with --kernel-segments), and compared with the first path in the
same way.
"""

from __future__ import annotations

import argparse

from benchmarks import harness


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--D", type=int, default=1024)
    p.add_argument("--leaf", type=int, default=512)
    p.add_argument(
        "--tier",
        default=None,
        choices=["float32", "bf16x3", "bfloat16"],
        help="precision tier (default: the library's rule for bf16 compute here)",
    )
    p.add_argument("--calls", type=int, default=5)
    p.add_argument(
        "--kernels",
        nargs="+",
        default=["xla"],
        choices=["xla", "pallas", "gpu_gemm"],
        help="the solve's kernels to time after the XLA paths (the kernels need leaves of 128 or more)",
    )
    p.add_argument(
        "--kernel-segments",
        action="store_true",
        help="also time each non-XLA kernel set with one segment (the masked path)",
    )
    harness.add_output_args(p)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from sessa_jax.ops.dispatch import recursive_tile
    from sessa_jax.ops.solve.precision import platform_kind, resolve_precision
    from sessa_jax.ops.solve.recursive import RecursivePlan, recursive_feedback_solve
    from sessa_jax.ops.solve.schedule import auto_static_span

    b, t, d, leaf = args.B, args.T, args.D, args.leaf
    tile = recursive_tile(t, leaf)
    plan = RecursivePlan.make(t, leaf, tile, "bf16x3", "cpu", 1.0)
    static = auto_static_span(plan.num_leaves, plan.tile_leaves)
    platform = platform_kind()
    tier = args.tier or resolve_precision("auto", platform, jnp.bfloat16)
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, f = (jax.random.normal(ks[i], (b, t, d), jnp.bfloat16) for i in range(3))
    gam = 0.99 * jnp.tanh(jax.random.normal(ks[3], (b, t)))
    ds = jax.random.normal(ks[4], (b, t, d), jnp.float32)
    print(
        f"# solve paths on {harness.machine_line()}: B={b} T={t} D={d} leaf {leaf}, tile {tile}, tier {tier}, "
        f"static span of the wide blocks: {static}"
    )
    print(harness.markdown_table(("segment ids", "schedule", "kernels", "f+b ms", "s vs first", "grads vs first")))
    cases = [(packed, span, "xla") for packed in (False, True) for span in (None, static)]
    kernel_packing = (False, True) if args.kernel_segments else (False,)
    cases += [(packed, static, kern) for kern in args.kernels if kern != "xla" for packed in kernel_packing]
    first, rows = None, []
    for packed, span, kern in cases:
        seg = jnp.ones((b, t), jnp.int32) if packed else None

        def loss(q, k, g, f, seg=seg, span=span, kern=kern):
            s = recursive_feedback_solve(
                q,
                k,
                g,
                f,
                seg,
                leaf_size=leaf,
                tile=tile,
                tier=tier,
                platform=platform,
                dtype=jnp.float32,
                kernels=kern,
                static_span=span,
            )
            return jnp.sum(s * ds), s

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
        call = harness.blocking(fn, q, k, gam, f)
        try:
            call()
        except Exception as err:  # an opt-in kernel that fails on this device: say so, keep the other rows
            if kern == "xla":
                raise
            note = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            rows.append(
                {
                    "segment_ids": "one segment" if packed else "None",
                    "schedule": f"static span {span}",
                    "kernels": kern,
                    "failed": note,
                }
            )
            print(harness.markdown_row((rows[-1]["segment_ids"], rows[-1]["schedule"], kern, note, "", "")), flush=True)
            continue
        ms = 1e3 * harness.measure(call, warmup=1, repeats=1, number=args.calls)
        (_, s), grads = call()
        flat = [s] + list(grads)
        first = first or flat
        err = [
            float(jnp.linalg.norm((a - r).astype(jnp.float32)) / jnp.linalg.norm(r.astype(jnp.float32)))
            for a, r in zip(flat, first)
        ]
        rows.append(
            {
                "segment_ids": "one segment" if packed else "None",
                "schedule": "loop" if span is None else f"static span {span}",
                "kernels": kern,
                "ms": ms,
                "s_err": err[0],
                "grad_err": max(err[1:]),
            }
        )
        r = rows[-1]
        print(
            harness.markdown_row(
                (r["segment_ids"], r["schedule"], kern, f"{ms:.2f}", f"{err[0]:.1e}", f"{max(err[1:]):.1e}")
            ),
            flush=True,
        )
    harness.write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
