"""Compiles the recursive feedback solve for a TPU without a TPU: XLA and the Mosaic kernels.

    pip install "jax[tpu]"             # libtpu; no TPU needed to compile
    python -m benchmarks.tpu_compile                         # v5e, B=8 T=8192 and B=1 T=65536, D=1024, bf16
    python -m benchmarks.tpu_compile --topology v5p:2x2x1 --shapes 8,4096,1024

Builds a deviceless topology (``jax.experimental.topologies``, as MaxText's ``train_compile``
does) and compiles the solve's forward + backward (``jax.grad``) ahead of time with libtpu, once
with the pushes and statistics in XLA (``kernels="xla"``) and once with the Pallas TPU kernels of
``ops/solve/row_stats_tpu.py`` and ``ops/solve/block_product_tpu.py`` (``kernels="pallas"``: libtpu runs the
Mosaic compiler on each kernel while
compiling the program; a first check compiles a kernel too large for VMEM, which libtpu must
refuse). Per run it prints whether it compiled, the compile time on this machine,
the program's HBM temporaries (``memory_analysis()``), the fusions in the compiled program's
text (each a kernel; loop bodies counted once: libtpu's loops carry no trip count to weigh
them by) and the number of Mosaic kernel calls in it. The solve gets segment ids None
(an unpacked batch) unless ``--packed``. Compiling proves the kernels fit the chip's VMEM and layouts; it says
nothing about speed, which only a TPU measures.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from benchmarks.gpu_compile import add_solve_options, compile_only_cuda, optimized_hlo, solve_tier, static_span_rule


def parse_shape(text: str) -> tuple[int, int, int]:
    b, t, d = (int(x) for x in text.split(","))
    return b, t, d


def vmem_check(sharding) -> str:
    """Compiles a Pallas kernel whose one (8192, 8192) float32 block (256 MiB) cannot fit VMEM:
    libtpu must refuse it, which shows that compiling here runs the Mosaic compiler for real."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    n = 8192

    def double(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2.0

    spec = pl.BlockSpec((n, n), lambda i: (0, 0))
    fn = pl.pallas_call(
        double, out_shape=jax.ShapeDtypeStruct((n, n), jnp.float32), grid=(1,), in_specs=[spec], out_specs=spec
    )
    try:
        jax.jit(fn).lower(jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=sharding)).compile()
    except Exception as err:  # noqa: BLE001 - the refusal is the expected outcome
        return f"an ({n}, {n}) float32 block is refused: {str(err).splitlines()[0][:120]}"
    return f"an ({n}, {n}) float32 block compiled: VMEM limits are NOT being checked here"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5e:1x1", help="a jax.experimental.topologies name")
    p.add_argument(
        "--shapes", nargs="+", type=parse_shape, default=[(8, 8192, 1024), (1, 65536, 1024)], help="B,T,D of each run"
    )
    p.add_argument("--kernels", nargs="+", default=["xla", "pallas"], choices=["xla", "pallas"])
    p.add_argument("--leaf", type=int, default=512)
    add_solve_options(p, "the solve")
    p.add_argument("--dump", type=pathlib.Path, default=None, help="write each optimized HLO here")
    args = p.parse_args(argv)

    # libtpu looks for a TPU host on start-up unless told what it is compiling for.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    compile_only_cuda()
    import jax
    import jax.numpy as jnp

    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
    except Exception as err:  # noqa: BLE001 - say why, do not pretend
        sys.exit(
            f"tpu_compile: no deviceless TPU compiler here ({type(err).__name__}: {str(err)[:300]}); "
            f"install libtpu: pip install 'jax[tpu]'"
        )
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from sessa_jax.ops.dispatch import recursive_tile
    from sessa_jax.ops.solve.recursive import recursive_feedback_solve

    sharding = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), PartitionSpec())  # one chip
    tier = solve_tier(args.precision, "tpu")
    print(f"# VMEM check: {vmem_check(sharding)}")
    print(
        f"# deviceless TPU compile, topology {args.topology} ({topo.devices[0].device_kind}), jax {jax.__version__}, "
        f"solve forward + backward, bf16 q/k/f, precision {args.precision} ({tier}), leaf {args.leaf}, segment ids: "
        f"{'one segment (masked)' if args.packed else 'None'}, "
        f"static span: {'default' if args.static_span is None else args.static_span}"
    )
    print("| B | T | D | kernels | compiled | compile s | HBM temp | fusions | Mosaic kernel calls |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b, t, d in args.shapes:
        for kernels in args.kernels:

            def loss(q, k, g, f, kernels=kernels, t=t):
                seg = jnp.zeros(g.shape, jnp.int32) if args.packed else None
                s = recursive_feedback_solve(
                    q,
                    k,
                    g,
                    f,
                    seg,
                    leaf_size=args.leaf,
                    tile=recursive_tile(t, args.leaf),
                    tier=tier,
                    platform="tpu",
                    dtype=jnp.float32,
                    kernels=kernels,
                )
                return jnp.sum(s)

            x = jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16, sharding=sharding)
            g = jax.ShapeDtypeStruct((b, t), jnp.float32, sharding=sharding)
            t0 = time.perf_counter()
            try:
                with static_span_rule(args.static_span):
                    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, x, g, x).compile()
            except Exception as err:  # noqa: BLE001 - report and go on to the next run
                print(
                    f"| {b} | {t} | {d} | {kernels} | no: {type(err).__name__}: {str(err)[:200]} | | | | |", flush=True
                )
                continue
            seconds = time.perf_counter() - t0
            temp = compiled.memory_analysis().temp_size_in_bytes
            text = optimized_hlo(compiled)
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                (args.dump / f"solve-f+b-{b}-{t}-{d}-{kernels}.hlo.txt").write_text(text)
            calls = text.count('custom_call_target="tpu_custom_call"')
            fusions = sum(1 for line in text.splitlines() if " fusion(" in line)
            print(
                f"| {b} | {t} | {d} | {kernels} | yes | {seconds:.1f} | {temp / 2**30:.2f} GiB | {fusions} | {calls} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
