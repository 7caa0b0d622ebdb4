"""Worst relative errors against the published fixtures, as quoted in the README.

    python benchmarks/parity.py

Runs every fixture in tests/fixtures through the same computations as
tests/test_core_fixtures.py (dense and blocked; float32 and float64) and prints the
worst error over outputs (y, s, prefill + decode) and over gradients (x and every weight;
each weight gradient relative to max(its own scale, 1e-3 x the largest weight gradient)).
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import test_core_fixtures as fixtures  # noqa: E402
from _parity import FIXTURES, load_fixture, rel_err  # noqa: E402


def main() -> None:
    print("| precision | outputs (y, s, prefill+decode) | gradients (x and every weight) |")
    print("| --- | --- | --- |")
    for precision in ("float32", "float64"):
        out_err = grad_err = 0.0
        for name in FIXTURES:
            arrays, _ = load_fixture(name)
            for solver in ("dense", "blocked"):
                r = fixtures._results(name, solver, precision)
                out_err = max(out_err, rel_err(r["y"], arrays["y"]), rel_err(r["s"], arrays["s"]),
                              rel_err(r["y_decode"], arrays["y_prefill_decode"]))
                largest = max(float(np.max(np.abs(arrays[f"grad/w/{k}"]))) for k in r["grad_w"])
                grads = [rel_err(v, arrays[f"grad/w/{k}"], floor=1e-3 * largest) for k, v in r["grad_w"].items()]
                grad_err = max(grad_err, rel_err(r["grad_x"], arrays["grad/x"]), *grads)
        print(f"| {precision} | {out_err:.2g} | {grad_err:.2g} |")


if __name__ == "__main__":
    main()
