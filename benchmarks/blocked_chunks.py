"""The blocked paths' chunk size on this machine: forward + backward of the forward attention
(``causal_attention``, method "blocked") and of the feedback solve (``feedback_solve``,
method "blocked") for each chunk C, both "panels" schedules (per C for the solve), and what
``chunk_size="auto"`` picks (``sessa_jax.ops.dispatch.attention_schedule`` /
``solve_schedule``), same run, interleaved repeats, medians (ms). The "auto" rules were set
from this table.

    python -m benchmarks.blocked_chunks                        # the README's cases
    python -m benchmarks.blocked_chunks --cases 1x256x4x512 8x256x4x512 --repeats 5
    python -m benchmarks.blocked_chunks --ops solve --cases 32x64x4x2048
    python -m benchmarks.blocked_chunks --ops layer --cases 1x256x4x512 --repeats 7

``--ops layer`` times the whole default ``SessaLayer`` (d_model D, n_heads H, chunk "auto")
twice: as "auto" compiles it, and with the solve's panels turned off (traced with
``dispatch.SOLVE_PANEL_MAX_LEN = 0``, so its solve runs the loop): the layer-level check of
the solve's panel rule. ``--panel-max-len N`` traces the "layer auto" column with
``SOLVE_PANEL_MAX_LEN = N`` instead (what a longer panel limit would do).

A case is BxDxHxT: batch, width D (the solve's width; attention has H heads of D/H).
"""

from __future__ import annotations

import argparse
import statistics
import unittest.mock

from benchmarks import harness

CHUNKS = (64, 128, 256)
DEFAULT_CASES = ["1x256x4x256", "1x256x4x512", "1x256x4x2048", "8x256x4x512", "32x64x4x512"]


def _layer_fns(b: int, d: int, h: int, t: int, panel_max_len: int) -> dict:
    """{column: call}: forward + backward of the default SessaLayer with the solve's loop, and
    "auto" traced with ``SOLVE_PANEL_MAX_LEN = panel_max_len``."""
    import jax
    import jax.numpy as jnp

    from sessa_jax import SessaConfig, SessaLayer
    from sessa_jax.ops import dispatch

    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, d))
    layer = SessaLayer(SessaConfig(d_model=d, n_heads=h, max_len=t))
    params = layer.init(jax.random.PRNGKey(1), x)
    fns = {}
    for name, max_len in (("layer, solve loop", 0), ("layer auto", panel_max_len)):
        g = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x) ** 2), argnums=(0, 1)))
        with unittest.mock.patch.object(dispatch, "SOLVE_PANEL_MAX_LEN", max_len):
            jax.block_until_ready(g(params, x))  # traced and compiled under this rule
        fns[name] = lambda g=g: jax.block_until_ready(g(params, x))
    return fns


def _case_fns(b: int, d: int, h: int, t: int, ops, panel_max_len: int) -> dict:
    """{column: call} for one case: attention per chunk, panels, auto; solve per chunk, panels
    per chunk (when there is more than one), auto; the layer (``_layer_fns``), for the ``ops`` asked."""
    import jax
    import jax.numpy as jnp

    from sessa_jax.ops import causal_attention, feedback_solve
    from sessa_jax.ops.attention.blocked import blocked_causal_attention
    from sessa_jax.ops.solve.blocked import blocked_feedback_solve

    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    q, k, v = (jax.random.normal(kk, (b, t, h, d // h)) for kk in ks[:3])
    qb, kb, f = (jax.random.normal(kk, (b, t, d)) for kk in ks[3:6])
    gamma = 0.9 * jnp.tanh(f[..., 0])

    def grad(fn, *args):
        g = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=tuple(range(len(args)))))
        return lambda: jax.block_until_ready(g(*args))

    fns = {}
    for c in CHUNKS if "attention" in ops else ():
        if c <= t:
            fns[f"attention C={c}"] = grad(
                lambda q, k, v, c=c: causal_attention(q, k, v, method="blocked", chunk_size=c), q, k, v
            )
    if "attention" in ops:
        fns["attention panels"] = grad(
            lambda q, k, v: blocked_causal_attention(q, k, v, None, 64, q.dtype, "panels"), q, k, v
        )
        fns["attention auto"] = grad(lambda q, k, v: causal_attention(q, k, v, method="blocked"), q, k, v)
    if "layer" in ops:
        fns.update(_layer_fns(b, d, h, t, panel_max_len))
    if "solve" not in ops:
        return fns
    for c in CHUNKS:
        if c <= t:
            fns[f"solve C={c}"] = grad(
                lambda *a, c=c: feedback_solve(*a, method="blocked", chunk_size=c), qb, kb, gamma, f
            )
    for c in CHUNKS:
        if c < t:  # one chunk: the same program as the loop
            fns[f"solve panels C={c}"] = grad(
                lambda q, k, g, f, c=c: blocked_feedback_solve(q, k, g, f, None, c, q.dtype, "panels"), qb, kb, gamma, f
            )
    fns["solve auto"] = grad(lambda *a: feedback_solve(*a, method="blocked"), qb, kb, gamma, f)
    return fns


def main(argv=None) -> None:
    from sessa_jax.ops import dispatch
    from sessa_jax.ops.dispatch import attention_schedule, solve_schedule

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="BxDxHxT")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the table shows the median")
    p.add_argument("--sample-s", type=float, default=0.3, help="target seconds of one timing sample")
    p.add_argument("--ops", nargs="+", choices=["attention", "solve", "layer"], default=["attention", "solve"])
    p.add_argument(
        "--panel-max-len",
        type=int,
        default=None,
        help="--ops layer: SOLVE_PANEL_MAX_LEN for the 'layer auto' column (default: the dispatch rule's)",
    )
    args = p.parse_args(argv)
    layer_max_len = dispatch.SOLVE_PANEL_MAX_LEN if args.panel_max_len is None else args.panel_max_len
    cases = []
    for spec in args.cases:
        try:
            b, d, h, t = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            p.error(f"--cases: {spec!r} is not BxDxHxT, e.g. 1x256x4x512")
        if d % h:
            p.error(f"--cases: {spec!r}: D={d} is not a multiple of H={h}")
        cases.append((b, d, h, t))
    print(f"# {harness.machine_line()}; forward + backward ms, median of {args.repeats} interleaved repeats")
    print("| case BxDxHxT | column | ms | auto picks |")
    print("| --- | --- | --- | --- |")
    for b, d, h, t in cases:
        fns = _case_fns(b, d, h, t, args.ops, layer_max_len)
        times = {name: t["wall"] for name, t in harness.interleaved(fns, args.repeats, sample_s=args.sample_s).items()}
        with unittest.mock.patch.object(dispatch, "SOLVE_PANEL_MAX_LEN", layer_max_len):  # as "layer auto" was traced
            layer_pick = "solve {} C={}".format(*solve_schedule("auto", b, t))
        picks = {
            "attention auto": "{} C={}".format(*attention_schedule("auto", b, h, t)),
            "solve auto": "{} C={}".format(*solve_schedule("auto", b, t)),
            "layer auto": layer_pick,
        }
        for name, samples in times.items():
            print(
                f"| {b}x{d}x{h}x{t} | {name} | {statistics.median(samples) * 1e3:.1f} | {picks.get(name, '')} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
