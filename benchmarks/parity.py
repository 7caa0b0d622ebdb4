"""Worst relative errors against the published fixtures.

    python -m benchmarks.parity
    python -m benchmarks.parity --solvers dense blocked recursive --fixtures tests/fixtures

Each fixture (``reference_layer_*.npz``: the published PyTorch layer's weights, inputs, outputs
and gradients) is run through the layer here for every solver, in float32 and float64: y, the
mixer's s, prefill + token-by-token decode, the loss, and the gradients of sum(y * r) with respect to x
and every weight (converted to the reference's names). Prints, per precision, the worst error
over the outputs and over the gradients; an error is max |actual - expected| / max |expected|,
and each weight gradient's scale is at least 1e-3 x the largest weight gradient (some are
exactly zero in exact arithmetic).
"""

from __future__ import annotations

import argparse
import pathlib

from benchmarks import harness
from sessa_jax.golden import golden_errors, load_golden, run_golden

PATTERN = "reference_layer_*.npz"


def find_fixtures(folder: str | None) -> list[pathlib.Path]:
    """The fixture files in ``folder`` (default: wherever they lie under ./tests)."""
    files = sorted(pathlib.Path(folder).glob(PATTERN)) if folder else sorted(pathlib.Path("tests").rglob(PATTERN))
    if not files:
        where = folder or "tests/ (searched recursively)"
        raise SystemExit(f"parity: no {PATTERN} in {where}; run from the repository root or pass --fixtures DIR")
    return files


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", default=None, help="folder of reference_layer_*.npz (default: found under tests/)")
    p.add_argument("--solvers", nargs="+", default=["dense", "blocked"], choices=["dense", "blocked", "recursive"])
    p.add_argument("--precisions", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    harness.add_output_args(p)
    args = p.parse_args(argv)
    files = find_fixtures(args.fixtures)
    rows = []
    for precision in args.precisions:
        out_err = grad_err = 0.0
        for path in files:
            arrays, meta = load_golden(path)
            for solver in args.solvers:
                o, g = golden_errors(arrays, run_golden(arrays, meta, solver, precision))
                out_err, grad_err = max(out_err, o), max(grad_err, g)
        rows.append({"precision": precision, "outputs": out_err, "gradients": grad_err})
    print(f"# {len(files)} fixtures, solvers {' '.join(args.solvers)}")
    print(
        harness.markdown_table(
            ("precision", "outputs (y, s, prefill+decode)", "gradients (x and every weight)"),
            [(r["precision"], f"{r['outputs']:.2g}", f"{r['gradients']:.2g}") for r in rows],
        )
    )
    harness.write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
