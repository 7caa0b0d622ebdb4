"""Speed and memory of the feedback solve and the forward attention, per method and length.

    python -m benchmarks.feedback_solve                        # T = 512 ... 32768, CPU, float32
    python -m benchmarks.feedback_solve --T 512 1024 --reps 2  # a quick look

Prints one table. Each (op, method, T) cell runs in a fresh subprocess so that its peak
resident memory (ru_maxrss) is its own; XLA's own view of the compiled program's memory
(``compiled.memory_analysis()``: arguments + outputs + temporaries) is reported beside it.

FLOP model (useful work, causal half only, the same for every method so rates compare):
  feedback solve, width D:    forward 2 T^2 D   (logits + A s);  fwd+bwd 7 T^2 D
                              (backward: logits again, A^T g, g s^T, dL^T q, dL k)
  causal attention, H x K:    forward 2 T^2 H K (QK^T + PV);     fwd+bwd 7 T^2 H K
                              (backward: QK^T again, dO V^T, dS K, dS^T Q, P^T dO)
The ceiling is a plain float32 matmul (2048^3) timed in the same run. Times are the best
of --reps runs after a warm-up (--reps-large for T > 4096).
A dense cell whose compiled memory would exceed --mem-limit-gib is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

from benchmarks import harness

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cell(
    op: str,
    method: str,
    t: int,
    d: int,
    heads: int,
    chunk: int,
    reps: int,
    mem_limit: float,
    leaf: int | str = "auto",
    b: int = 1,
    dtype: str = "float32",
) -> dict:
    """Measures one (op, method, T) cell in this process; returns a JSON-able dict."""
    import jax
    import jax.numpy as jnp

    from sessa_jax.ops import causal_attention, feedback_solve
    from sessa_jax.options import ATTENTION_OF_SOLVE

    key = jax.random.PRNGKey(0)
    ks = jax.random.split(key, 5)
    dt = jnp.dtype(dtype)
    if op == "feedback":
        args = (
            jax.random.normal(ks[0], (b, t, d), dt),
            jax.random.normal(ks[1], (b, t, d), dt),
            0.9 * jnp.tanh(jax.random.normal(ks[2], (b, t))),
            jax.random.normal(ks[3], (b, t, d), dt),
        )

        def fwd(q, k, g, f):
            return feedback_solve(q, k, g, f, method=method, chunk_size=chunk, leaf_size=leaf)

        flops_fwd, flops_bwd = 2 * t * t * d, 7 * t * t * d
    else:
        hd = d // heads
        args = tuple(jax.random.normal(ks[i], (b, t, heads, hd), dt) for i in range(3))

        def fwd(q, k, v):
            # A solve method names the attention its layers run with it ("recursive": the vendor kernel).
            return causal_attention(q, k, v, method=ATTENTION_OF_SOLVE.get(method, method), chunk_size=chunk)

        flops_fwd, flops_bwd = 2 * t * t * d, 7 * t * t * d
    flops_fwd, flops_bwd = b * flops_fwd, b * flops_bwd

    def fwd_bwd(*a):
        return jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32) ** 2), argnums=tuple(range(len(a))))(*a)

    row = {"op": op, "method": method, "T": t}
    for name, fn, flops in (("fwd", fwd, flops_fwd), ("fwd+bwd", fwd_bwd, flops_bwd)):
        compiled = jax.jit(fn).lower(*args).compile()
        total = harness.compiled_memory(compiled)["total"]
        row[f"{name} xla_mib"] = total / 2**20
        if total > mem_limit * 2**30:
            row[f"{name} s"] = None
            continue
        seconds = harness.measure(harness.blocking(compiled, *args), warmup=1, repeats=reps, stat="min")
        row[f"{name} s"] = seconds
        row[f"{name} gflops"] = flops / seconds / 1e9
    row["rss_mib"] = harness.peak_rss_mib()
    return row


def _fmt(v, spec):
    return "skipped" if v is None else format(v, spec)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_shape_args(p, T=[512, 1024, 2048, 4096, 8192, 16384, 32768], D=256, B=1, H=4)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument(
        "--leaf",
        type=harness.auto_or_int,
        default="auto",
        help="leaf_size of the recursive solve: auto (the library's rule) or an integer",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--methods", nargs="+", default=["dense", "blocked"])
    p.add_argument("--ops", nargs="+", default=["feedback", "attention"])
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (best of) for T <= 4096")
    p.add_argument("--reps-large", type=int, default=1, help="timed repetitions for T > 4096")
    p.add_argument("--mem-limit-gib", type=float, default=20.0)
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell, print JSON
    a = p.parse_args(argv)
    if a.cell:
        op, method, t = a.cell.split(":")
        print(
            json.dumps(run_cell(op, method, int(t), a.D, a.H, a.chunk, a.reps, a.mem_limit_gib, a.leaf, a.B, a.dtype))
        )
        return

    ceiling = harness.matmul_rate(2048) / 1e9
    print(
        f"# {harness.machine_line()}; B={a.B}, D={a.D}, H={a.H} (attention), chunk={a.chunk}, leaf={a.leaf}, {a.dtype}"
    )
    print(f"# matmul ceiling (2048^3 float32): {ceiling:.1f} GFLOP/s")
    head = ("op", "method", "T", "fwd s", "fwd GF/s", "f+b s", "f+b GF/s", "f+b %ceil", "xla f+b MiB", "peak RSS MiB")
    print(harness.markdown_table(head))
    for op in a.ops:
        for t in a.T:
            for method in a.methods:
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.feedback_solve",
                    "--cell",
                    f"{op}:{method}:{t}",
                    "--D",
                    str(a.D),
                    "--H",
                    str(a.H),
                    "--chunk",
                    str(a.chunk),
                    "--leaf",
                    str(a.leaf),
                    "--B",
                    str(a.B),
                    "--dtype",
                    a.dtype,
                    "--reps",
                    str(a.reps if t <= 4096 else a.reps_large),
                    "--mem-limit-gib",
                    str(a.mem_limit_gib),
                ]
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if res.returncode != 0:
                    print(f"| {op} | {method} | {t} | failed: {res.stderr.strip().splitlines()[-1][:80]} |")
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                fb = r.get("fwd+bwd gflops")
                cells = [
                    op,
                    method,
                    str(t),
                    _fmt(r.get("fwd s"), ".4f"),
                    _fmt(r.get("fwd gflops"), ".1f"),
                    _fmt(r.get("fwd+bwd s"), ".4f"),
                    _fmt(fb, ".1f"),
                    _fmt(None if fb is None else 100 * fb / ceiling, ".0f"),
                    f"{r['fwd+bwd xla_mib']:.0f}",
                    f"{r['rss_mib']:.0f}",
                ]
                print(harness.markdown_row(cells), flush=True)


if __name__ == "__main__":
    main()
