"""The benchmarks run end to end at toy sizes on CPU, so that a GPU session spends its time
measuring, not debugging the scripts (scripts/accelerator_check.sh runs them), and the shared
harness times, sizes and prints what it says."""

from __future__ import annotations

import json

import pytest

from benchmarks import blocked_chunks, harness, jaxpr_work, layer, solve_vs_attention, solve_work, train_throughput


def test_layer_benchmark_runs(tmp_path):
    out = tmp_path / "layer.json"
    results = layer.main(
        [
            "--T",
            "24",
            "--B",
            "1",
            "--D",
            "32",
            "--H",
            "2",
            "--dtype",
            "float32",
            "--solvers",
            "dense",
            "blocked",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--peak-n",
            "64",
            "--json",
            str(out),
        ]
    )
    assert [(r["kind"], r["solver"]) for r in results] == [
        ("sessa", "dense"),
        ("sessa", "blocked"),
        ("transformer", "-"),
    ]
    for r in results:
        assert "error" not in r and r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 and r["fwd_bwd_bytes"] > 0
    # The Sessa layer counts the feedback solve on top of the Transformer layer's work.
    assert results[0]["flops_fwd"] > results[2]["flops_fwd"]
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(results))


def test_jaxpr_work_counts_loops_and_taken_branches():
    import jax
    import jax.numpy as jnp
    from jax import lax

    a = jax.ShapeDtypeStruct((300, 400), jnp.float32)
    b = jax.ShapeDtypeStruct((400, 500), jnp.bfloat16)
    one = 2.0 * 300 * 400 * 500

    def fn(a, b):
        def step(c, i):
            # branch 1 (two dots) on i = 1, 3; branch 0 (one dot) on i = 0, 2, 4
            return c + lax.switch(
                i % 2, [lambda: a @ b.astype(a.dtype), lambda: a @ b.astype(a.dtype) + a @ b.astype(a.dtype)]
            ), None

        out, _ = lax.scan(step, jnp.zeros((300, 500)), jnp.arange(5))
        out = out + lax.fori_loop(0, 3, lambda i, c: c + a.astype(jnp.bfloat16) @ b, jnp.zeros((300, 500)))
        return jnp.tanh(out) + lax.fori_loop(0, 2, lambda i, c: c + jnp.exp(a), a).sum()

    w = jaxpr_work.count_work(fn, a, b)
    assert w.flops == (3 + 4 + 3) * one  # 3 + 2 * 2 dots in the scan, 3 in the fori_loop
    assert w.pass_flops == 7 * 6 * one + 3 * one  # float32 dots count 6 bf16 passes, bf16 dots 1
    assert w.big_flops == w.flops and w.outer_steps == 5 + 3 + 2
    assert w.transcendentals == 300 * 500 + 2 * 300 * 400  # tanh once, exp in both fori_loop steps


def test_solve_work_table_runs(capsys):
    rows = solve_work.main(["--T", "256", "--B", "1", "--D", "64", "--leaf", "32", "--chunk", "32"])
    assert [r["method"] for r in rows] == ["recursive", "blocked"]
    rec, blk = rows
    # Work in units of U = B T^2 D: the recursive solve's forward is at least the stats pass,
    # the logits again and P s (>= 3U raw); its backward adds at least five more passes.
    assert rec["fwd_U"] >= 3.0 and rec["fb_U"] >= 8.0 and rec["fb_steps"] >= 2 * (256 // 32) - 1
    assert blk["fb_steps"] == 2 * (256 // 32) and blk["temp_bytes"] > 0
    assert "| recursive | 1 | 256 |" in capsys.readouterr().out


def test_train_throughput_tables_and_bound_run(capsys):
    train_throughput.main(
        ["--seq-len", "32", "--batch-size", "2", "--steps", "1", "--repeats", "1", "--warmup", "0", "--work"]
    )
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip(" |").split("|")] for line in out.splitlines() if line.startswith("| 32 |")]
    assert [r[1] for r in rows] == ["sessa", "transformer", "sessa", "transformer"]
    sessa_work, transformer_work = rows[2], rows[3]
    # Sessa's mixer is the Transformer's attention plus the feedback solve: more of both kinds of work.
    assert float(sessa_work[4]) > 1.0 and float(sessa_work[5]) > 1.0 and transformer_work[4] == "1.00"
    assert 0.0 < float(sessa_work[6]) < 1.0  # any extra work lowers the best possible ratio


def test_blocked_chunks_table_runs(capsys):
    blocked_chunks.main(["--cases", "2x8x2x96", "--repeats", "1", "--sample-s", "0.001"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| 2x8x2x96")]
    names = [r[1].strip() for r in rows]
    assert names == [
        "attention C=64",
        "attention panels",
        "attention auto",
        "solve C=64",
        "solve panels C=64",
        "solve auto",
    ]
    assert all(float(r[2]) > 0 for r in rows)
    picks = {r[1].strip(): r[3].strip() for r in rows}
    assert picks["attention auto"] == "panels C=64" and picks["solve auto"] == "loop C=256"  # T=96: one chunk
    blocked_chunks.main(["--ops", "layer", "--cases", "2x8x2x200", "--repeats", "1", "--sample-s", "0.001"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| 2x8x2x200")]
    assert [r[1].strip() for r in rows] == ["layer, solve loop", "layer auto"]
    assert rows[1][3].strip() == "solve panels C=128" and all(float(r[2]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        blocked_chunks.main(["--cases", "2x9x2x96"])  # D not a multiple of H


def test_solve_vs_attention_runs_tiers_attention_and_the_accuracy_check(capsys):
    solve_vs_attention.main(
        [
            "--B",
            "1",
            "--T",
            "64",
            "--D",
            "16",
            "--H",
            "2",
            "--tiers",
            "float32",
            "--attention",
            "xla",
            "--accuracy",
            "--calls",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "FAILED" not in out, out
    for name in ("recursive fwd float32", "recursive f+b float32", "attention fwd xla", "attention f+b xla"):
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert line.endswith(" ms") and float(line.split()[-2]) > 0, line
    (line,) = [line for line in out.splitlines() if line.startswith("bf16x3 vs float32 tier")]
    assert 0 < float(line.split(": ")[1].split()[0]) <= 1e-5, line


def test_solve_accuracy_takes_the_leaf_and_prints_the_table(capsys):
    from benchmarks import solve_accuracy

    rows = solve_accuracy.main(["--T", "64", "--D", "8", "--regimes", "hub", "--tiers", "bfloat16", "--leaf", "16"])
    assert [(r["T"], r["leaf"], r["regime"]) for r in rows] == [(64, 16, "hub")]
    assert set(rows[0]["bfloat16"]) == {"s", "dq", "dk", "dgamma", "df"}
    out = capsys.readouterr().out
    assert "| hub | 64 | 16 | bf16 attention / s floor |" in out and "| | | | bfloat16 |" in out


def test_harness_times_sizes_and_prints():
    calls = []
    timed = harness.interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, number=3, warmup=1
    )
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3  # warm-ups, then turns
    assert all(len(v["wall"]) == len(v["cpu"]) == 2 and min(v["wall"]) >= 0 for v in timed.values())
    assert harness.calls_for(0.01, 0.3) == 30 and harness.calls_for(1.0, 0.3) == 1
    assert harness.calls_for(1e-9, 1.0, most=50) == 50
    assert harness.nbytes("(bf16[4,4]{1,0}, s32[], pred[3])") == 32 + 4 + 3 and harness.dims("f32[8,16]{1,0}") == [
        8,
        16,
    ]
    assert harness.largest_array("f32[2,2] bf16[4,4] s32[]") == (32, "bf16[4,4]")
    assert harness.markdown_table(("x", "y"), [(1, 2)]).splitlines() == ["| x | y |", "|---|---|", "| 1 | 2 |"]
