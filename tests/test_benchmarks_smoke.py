"""The accelerator benchmarks run end to end at toy sizes on CPU, so that a GPU session spends
its time measuring, not debugging the scripts (scripts/accelerator_check.sh runs them)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        import layer
        import pallas_tiling

        yield layer, pallas_tiling
    finally:
        sys.path.remove(str(BENCH))


def test_layer_benchmark_runs(bench_modules, tmp_path):
    layer, _ = bench_modules
    out = tmp_path / "layer.json"
    results = layer.main(["--T", "24", "--B", "1", "--D", "32", "--H", "2", "--dtype", "float32", "--solvers",
                          "dense", "blocked", "--iters", "1", "--warmup", "0", "--peak-n", "64", "--json", str(out)])
    assert [(r["kind"], r["solver"]) for r in results] == [("sessa", "dense"), ("sessa", "blocked"),
                                                           ("transformer", "-")]
    for r in results:
        assert "error" not in r and r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 and r["fwd_bwd_bytes"] > 0
    # The Sessa layer counts the feedback solve on top of the Transformer layer's work.
    assert results[0]["flops_fwd"] > results[2]["flops_fwd"]
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(results))


def test_tiling_sweep_runs_in_interpret_mode(bench_modules):
    _, pallas_tiling = bench_modules
    results = pallas_tiling.main(["--B", "1", "--T", "16", "--D", "16", "--dtype", "float32", "--chunks", "8",
                                  "--block-d", "8", "32", "--iters", "1", "--warmup", "0", "--interpret"])
    assert [r["solver"] for r in results] == ["blocked", "pallas", "pallas"]
    assert results[1]["fwd_s"] > 0 and results[1]["fwd_bwd_s"] > 0
    assert "block_d" in results[2]["error"]  # 32 > D_pad = 16: reported, not fatal
