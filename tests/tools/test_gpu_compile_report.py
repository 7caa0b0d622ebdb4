"""benchmarks.gpu_compile: its HLO walk (trip counts, switch-branch histograms, bytes, FLOPs),
checked on a program compiled for this CPU, whose answers are known by construction; and the
messages of it and of benchmarks.tpu_compile where the CUDA plugin or libtpu they need is
not installed."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu_compile
from tests.support.processes import TIMEOUT_S

ROOT = pathlib.Path(__file__).resolve().parents[2]

TABLE = [0, 1, 2, 1, 1, 0]  # the switch index of each scan step: branch 0 twice, 1 three times, 2 once
N = 64


def _program(x):
    def body(c, i):
        return lax_switch(i, c), None

    return jax.lax.scan(body, x, jnp.array(TABLE, jnp.int32))[0]


def lax_switch(i, c):
    return jax.lax.switch(i, [lambda c: c, lambda c: jnp.exp(c) * 2.0, lambda c: jnp.sin(c) + c @ c.T], c)


@pytest.fixture(scope="module")
def walk():
    text = gpu_compile.optimized_hlo(jax.jit(_program).lower(jnp.ones((N, N), jnp.float32)).compile())
    return gpu_compile.Walk(text).run()


def _kernels_in(walk, comp):
    return sum(1 for inst in walk.comps[comp] if inst.op not in gpu_compile._FREE)


def test_switch_branches_run_as_often_as_the_index_table_says(walk):
    (cond,) = [i for insts in walk.comps.values() for i in insts if i.op == "conditional"]
    branches = [b.strip().lstrip("%") for b in cond.attrs.split("branch_computations={")[1].split("}")[0].split(",")]
    launches = {comp: 0.0 for comp in branches}
    for (comp, _), times in walk.kernels.items():
        if comp in launches:
            launches[comp] += times
    for index, comp in enumerate(branches):
        assert launches[comp] == TABLE.count(index) * _kernels_in(walk, comp), (index, comp, launches)
    assert walk.unresolved == 0 and walk.dynamic_loops == 0


def test_loop_body_counts_its_trips_and_flops_count_each_executed_dot(walk):
    (loop,) = [i for insts in walk.comps.values() for i in insts if i.op == "while"]
    body = loop.attr("body")
    assert sum(t for (c, _), t in walk.kernels.items() if c == body) == len(TABLE) * _kernels_in(walk, body)
    table = walk.table(launch_us=0.0)
    assert table["gemm_flops"] == 2.0 * N**3 * TABLE.count(2)  # c @ c.T runs once
    assert table["launches"] == sum(walk.kernels.values()) and table["roofline_s"] > 0


def test_self_subtractions_are_found():
    text = "%a = f32[2]{0} subtract(%p.1, %p.1)\n%b = f32[2]{0} subtract(%p.1, %q.2)\n"
    assert gpu_compile.self_subtractions(text) == 1


def test_dot_passes_charge_presets_and_cuda_core_float32():
    x6 = "lhs_contracting_dims={2}, algorithm=dot_bf16_bf16_f32_x6"
    highest = "lhs_contracting_dims={2}, operand_precision={highest,highest}"
    assert gpu_compile.dot_passes(x6, "f32[8,16,16]{2,1,0}") == 6.0
    assert gpu_compile.dot_passes(highest, "f32[8,16,16]{2,1,0}") == 989e12 / 67e12
    assert gpu_compile.dot_passes(highest, "bf16[8,16,16]{2,1,0}") == 1.0  # bf16 runs on the tensor cores
    assert gpu_compile.dot_passes("lhs_contracting_dims={2}", "f32[8,16,16]{2,1,0}") == 1.0


def test_sizes_of_hlo_types():
    assert gpu_compile.nbytes("f32[8,16]{1,0}") == 512
    assert gpu_compile.nbytes("(bf16[4,4]{1,0}, s32[], pred[3])") == 32 + 4 + 3
    assert gpu_compile._tuple_elements("((s32[16]{0}, s32[]), f32[2,2]{1,0}, u32[])") == [
        "(s32[16]{0}, s32[])",
        "f32[2,2]{1,0}",
        "u32[]",
    ]


def _mosaic_module(kernel: str, fused: bool) -> str:
    """HLO text of one Mosaic GPU custom call (B=2, P=128, K=256, D=64), as the solve's
    GEMM-with-epilogue kernels compile: alone, or inside XLA's dynamic-slice fusion."""
    call = (
        'custom-call(%p0, %p1), custom_call_target="mosaic_gpu_v2", '
        f'metadata={{op_name="jit(f)/while/body/{kernel}/mpmd_map"}}'
    )
    out = "(bf16[2,128,256]{2,1,0}, bf16[2,128,256]{2,1,0})"
    params = "  %p0 = bf16[2,128,64]{2,1,0} parameter(0)\n  %p1 = bf16[2,256,64]{2,1,0} parameter(1)\n"
    if not fused:
        return (
            f"HloModule m\n\nENTRY %main (p0: bf16[2,128,64], p1: bf16[2,256,64]) -> {out} {{\n{params}"
            f"  ROOT %k = {out} {call}\n}}\n"
        )
    return (
        f"HloModule m\n\n%fused (p0: bf16[2,128,64], p1: bf16[2,256,64]) -> {out} {{\n{params}"
        f"  ROOT %k = {out} {call}\n}}\n\n"
        f"ENTRY %main (a: bf16[2,128,64], b: bf16[2,256,64]) -> {out} {{\n"
        "  %a = bf16[2,128,64]{2,1,0} parameter(0)\n  %b = bf16[2,256,64]{2,1,0} parameter(1)\n"
        f"  ROOT %f = {out} fusion(%a, %b), kind=kCustom, calls=%fused\n}}\n"
    )


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    "kernel,passes", [("sessa_block_probs_gpu", 1), ("sessa_block_probs_grad_gpu", 3), ("another_mosaic_kernel", 0)]
)
def test_mosaic_gemm_kernels_count_their_flops_and_exp(kernel, passes, fused):
    """The GEMM-with-epilogue kernels are opaque custom calls to XLA: their FLOPs come from the
    kernel name and shapes (2 B P K D per bf16 pass), and they count as GEMMs with an exp."""
    table = gpu_compile.Walk(_mosaic_module(kernel, fused)).run().table(launch_us=0.0)
    assert table["launches"] == 1
    assert table["gemm_flops"] == passes * 2.0 * 2 * 128 * 256 * 64
    assert table["gemm_exp"] == (1 if passes else 0)
    assert table["gemm_bytes" if passes else "other_bytes"] == 2 * (2 * 128 * 64 + 2 * 256 * 64 + 2 * 2 * 128 * 256)


@pytest.mark.parametrize("dv,rounded_s", [(128, False), (512, False), (512, True)])
def test_fused_product_kernel_counts_its_flops(dv, rounded_s):
    """The fused push (q, k, s parts -> P s float32): per Dv tile of at most 256 columns one
    logits pass over D (B=2, P=128, K=256, D=64), then three passes over Dv (P_hi s_hi, P_hi s_lo,
    P_lo s_hi), or two for the bfloat16 tier's kernel (s in one part: P_hi s, P_lo s); its bytes are its operands
    and result."""
    q, k, s = "bf16[2,128,64]{2,1,0}", "bf16[2,256,64]{2,1,0}", f"bf16[2,256,{dv}]{{2,1,0}}"
    out = f"f32[2,128,{dv}]{{2,1,0}}"
    parts = 1 if rounded_s else 2
    name = "sessa_block_product_bf16_gpu" if rounded_s else "sessa_block_product_gpu"
    params = ", ".join([f"p0: {q}", f"p1: {k}"] + [f"p{2 + i}: {s}" for i in range(parts)])
    lines = [f"  %p0 = {q} parameter(0)", f"  %p1 = {k} parameter(1)"]
    lines += [f"  %p{2 + i} = {s} parameter({2 + i})" for i in range(parts)]
    operands = ", ".join(f"%p{i}" for i in range(2 + parts))
    text = (
        f"HloModule m\n\nENTRY %main ({params}) -> {out} {{\n" + "\n".join(lines) + "\n"
        f'  ROOT %k = {out} custom-call({operands}), custom_call_target="mosaic_gpu_v2", '
        f'metadata={{op_name="jit(f)/while/body/{name}/mpmd_map"}}\n}}\n'
    )
    table = gpu_compile.Walk(text).run().table(launch_us=0.0)
    logits_passes = len(range(0, dv, 256))  # one per Dv tile: each tile recomputes the logits
    gemm = 2 * 128 * 256  # B P K
    assert table["launches"] == 1 and table["gemm_exp"] == 1
    assert table["gemm_flops"] == 2.0 * gemm * (logits_passes * 64 + (2 if rounded_s else 3) * dv)
    assert table["gemm_bytes"] == 2 * (2 * 128 * 64 + 2 * 256 * 64 + parts * 2 * 256 * dv) + 4 * 2 * 128 * dv


@pytest.mark.parametrize("fused", [False, True])
def test_a_kernel_that_declares_its_cost_is_taken_at_its_word(fused):
    """A Mosaic GPU kernel with a ``pl.CostEstimate`` (the fused push reading its block as a window
    of full-length operands, whose shapes do not tell the block) counts the FLOPs and bytes it
    declares, as the optimized HLO prints them in its backend config, not its operands' sizes."""
    flops, moved = 6442450944, 21004288
    declared = (
        'backend_config={cost_estimate_json = "{\\22flops\\22: %d, \\22transcendentals\\22: 4194304, '
        '\\22bytes_accessed\\22: %d, \\22remote_bytes_transferred\\22: 0}", kernel_hash = "~\\04"}' % (flops, moved)
    )
    text = _mosaic_module("sessa_block_product_bf16_gpu", fused).replace(
        'custom_call_target="mosaic_gpu_v2", ', f'custom_call_target="mosaic_gpu_v2", {declared}, '
    )
    assert "cost_estimate_json" in text
    table = gpu_compile.Walk(text).run().table(launch_us=0.0)
    assert table["launches"] == 1 and table["gemm_exp"] == 1
    assert table["gemm_flops"] == flops and table["gemm_bytes"] == moved


def test_an_uninitialized_buffer_is_no_kernel():
    """``lax.empty`` compiles for a GPU to XLA's "AllocateBuffer" custom call, which buffer
    assignment serves: no launch and no bytes; the kernel that then writes the buffer counts."""
    text = (
        "HloModule m\n\nENTRY %main (p: f32[4]) -> f32[1024,1024] {\n"
        '  %e = f32[1024,1024]{1,0} custom-call(), custom_call_target="AllocateBuffer"\n'
        "  ROOT %n = f32[1024,1024]{1,0} negate(%e)\n}\n"
    )
    table = gpu_compile.Walk(text).run().table(launch_us=0.0)
    assert table["launches"] == 1  # the negate
    assert table["other_bytes"] == 2 * 4 * 1024 * 1024  # its read and its write, nothing for the allocation


def _slicing_fusion(between: str) -> str:
    """A fusion that scales a (64, 1024) f32 operand by a broadcast (64,) vector ("scaled") or takes
    it as it is ("direct"), or adds it to itself ("twice"), and keeps a (64, 256) slice of the result."""
    ops = {
        "direct": ("", "%a"),
        "scaled": (
            "  %rb = f32[64,1024]{1,0} broadcast(%r), dimensions={0}\n"
            "  %ab = f32[64,1024]{1,0} bitcast(%a)\n"
            "  %m = f32[64,1024]{1,0} multiply(%rb, %ab)\n",
            "%m",
        ),
        "escapes": ("  %m = f32[64,1024]{1,0} negate(%a)\n", "%m"),
    }[between]
    root = (
        "  ROOT %t = (f32[64,256]{1,0}, f32[64,1024]{1,0}) tuple(%sl, %m)\n"
        if between == "escapes"
        else "  ROOT %sl2 = f32[64,256]{1,0} copy(%sl)\n"
    )
    out = "(f32[64,256], f32[64,1024])" if between == "escapes" else "f32[64,256]"
    return (
        "HloModule m\n\n"
        f"%fused (a: f32[64,1024], r: f32[64]) -> {out} {{\n"
        "  %a = f32[64,1024]{1,0} parameter(0)\n  %r = f32[64]{0} parameter(1)\n"
        + ops[0]
        + f"  %sl = f32[64,256]{{1,0}} slice({ops[1]}), slice={{[0:64], [256:512]}}\n"
        + root
        + "}\n\n"
        f"ENTRY %main (p: f32[64,1024], q: f32[64]) -> {out} {{\n"
        "  %p = f32[64,1024]{1,0} parameter(0)\n  %q = f32[64]{0} parameter(1)\n"
        f"  ROOT %f = {out} fusion(%p, %q), kind=kLoop, calls=%fused\n}}\n"
    )


@pytest.mark.parametrize("between", ["direct", "scaled", "escapes"])
def test_a_fusion_reads_only_the_slices_it_takes(between):
    """An operand that reaches its only use through a slice, directly or after element-for-element
    operations (the diagonal inversion's blocks of gamma A_ii; the layer's half of W_in's output),
    is read only where sliced; one whose whole elementwise result is also an output is read whole."""
    table = gpu_compile.Walk(_slicing_fusion(between)).run().table(launch_us=0.0)
    written = 4 * 64 * (256 + (1024 if between == "escapes" else 0))
    read_a = 4 * 64 * (1024 if between == "escapes" else 256)
    assert table["launches"] == 1
    assert table["other_bytes"] == read_a + 4 * 64 + written


@pytest.mark.parametrize("parts,segments", [(1, True), (2, False)])
def test_statistics_kernel_counts_its_causal_flops(parts, segments):
    """The statistics kernel (q, k parts [, seg] -> m, logl): B T (T + 64) D FLOPs per bf16 pass
    (row blocks of 64 read the key blocks through the diagonal one), three passes for hi + lo
    parts; B=2, T=256, D=128."""
    x, seg, vec = "bf16[2,256,128]{2,1,0}", "s32[2,256]{1,0}", "f32[2,256]{1,0}"
    types = [x] * (2 * parts) + ([seg] if segments else [])
    params = ", ".join(f"p{i}: {t}" for i, t in enumerate(types))
    lines = "\n".join(f"  %p{i} = {t} parameter({i})" for i, t in enumerate(types))
    operands = ", ".join(f"%p{i}" for i in range(len(types)))
    text = (
        f"HloModule m\n\nENTRY %main ({params}) -> ({vec}, {vec}) {{\n{lines}\n"
        f'  ROOT %k = ({vec}, {vec}) custom-call({operands}), custom_call_target="mosaic_gpu_v2", '
        'metadata={op_name="jit(f)/sessa_row_stats_gpu/mpmd_map"}\n}\n'
    )
    table = gpu_compile.Walk(text).run().table(launch_us=0.0)
    assert table["launches"] == 1
    assert table["gemm_flops"] == 2 * 256 * (256 + 64) * 128 * (3 if parts == 2 else 1)


def _has_cuda_plugin() -> bool:
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def _run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT
    )


@pytest.mark.skipif(_has_cuda_plugin(), reason="a CUDA plugin is installed here: the script would compile instead")
def test_without_the_cuda_plugin_the_script_says_what_to_install():
    proc = _run_script("gpu_compile", "--T", "1024")
    assert proc.returncode != 0
    assert "pip install 'jax[cuda13]'" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here: the script would compile instead"
)
def test_without_libtpu_the_tpu_script_says_what_to_install():
    proc = _run_script("tpu_compile", "--shapes", "1,1024,128")
    assert proc.returncode != 0
    assert "pip install 'jax[tpu]'" in proc.stderr, proc.stderr[-2000:]


def test_overhead_by_op_accounts_for_every_launch_and_the_time_above_the_flops(walk):
    launch_us = 4.0
    rows = walk.overhead(launch_us)
    table = walk.table(launch_us)
    assert sum(r[2] for r in rows) == pytest.approx(table["launches"])
    floor = table["gemm_flops"] / gpu_compile.PEAK_FLOPS
    assert sum(r[3] for r in rows) == pytest.approx(table["roofline_s"] - floor)
    assert [r[3] for r in rows] == sorted((r[3] for r in rows), reverse=True)
    looped = sum(r[2] for r in rows if r[1])
    assert looped == pytest.approx(walk.loop_launches) and 0 < looped < table["launches"]
