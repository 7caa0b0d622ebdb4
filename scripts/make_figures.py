"""Writes docs/influence.png (measured memory tails) and, with --long-context, the MQAR comparison.

    .venv/bin/python scripts/make_figures.py                      # docs/influence.png + fitted slopes
    .venv/bin/python scripts/make_figures.py --long-context       # + sessa/transformer/mamba on MQAR

Both call the library functions the notebooks use (sessa_jax.analysis).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import matplotlib

matplotlib.use("Agg")

from sessa_jax import analysis  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "influence.png"))
    p.add_argument("--max-lag", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=8)
    p.add_argument("--num-lags", type=int, default=20)
    p.add_argument("--skip-influence", action="store_true")
    p.add_argument("--long-context", action="store_true", help="also train the small MQAR comparison")
    p.add_argument("--seq-lens", default="32,64")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)

    if not args.skip_influence:
        t0 = time.perf_counter()
        tails = analysis.memory_tails(args.max_lag, args.d_model, args.num_lags)
        analysis.plot_memory_tails(tails, args.out)
        print(f"wrote {args.out} ({time.perf_counter() - t0:.0f}s)")
        print("| construction | fit | slope | R^2 | influence at lag 16 | at lag", args.max_lag, "|")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, c in tails.items():
            kind = "log-linear (per step)" if name == "mamba" else "log-log"
            at = dict(zip(c["lags"].tolist(), c["influence"].tolist()))
            l16 = min(at, key=lambda l: abs(l - 16))
            print(f"| {name} | {kind} | {c['fit'].slope:.4f} | {c['fit'].r2:.5f} | {at[l16]:.4g} (lag {l16}) "
                  f"| {at[max(at)]:.4g} |")

    if args.long_context:
        seq_lens = [int(s) for s in args.seq_lens.split(",")]
        with tempfile.TemporaryDirectory() as workdir:
            rows = analysis.compare_on_lengths(("sessa", "transformer", "mamba"), seq_lens, args.steps, workdir)
        print(analysis.comparison_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
