"""The Mamba baseline's two scans on this machine: forward + backward of one MambaMixer, jitted,
"chunked" (associative scan per chunk) vs "stepwise" (one rematerialised step per time step),
same run, interleaved repeats, medians. ``MambaMixer(scan="auto")`` takes "stepwise" on CPU
from this table.

    python -m benchmarks.mamba_scan                                  # the compare_models cpu shapes
    python -m benchmarks.mamba_scan --shapes 16x300x28 8x1024x64 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks import harness


def _step_fn(scan: str, batch: int, seq_len: int, d_model: int, chunk: int):
    import jax
    import jax.numpy as jnp

    from sessa_jax.config import SessaConfig
    from sessa_jax.mamba_mixer import MambaMixer

    mixer = MambaMixer(SessaConfig(d_model=d_model, n_heads=1, chunk_size=chunk), scan=scan)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, seq_len, d_model))
    params = mixer.init(jax.random.PRNGKey(1), x)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(mixer.apply(p, x) ** 2), argnums=(0, 1)))
    return lambda: jax.block_until_ready(grad(params, x))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["16x64x28", "16x150x28", "16x300x28"],
        help="BATCHxTIMExD_MODEL (E = 2 D inner width, N = 16 state)",
    )
    p.add_argument("--chunk", type=int, default=16, help="chunk of the chunked scan (config.chunk_size)")
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    print(f"# {harness.machine_line()}; chunk {a.chunk}")
    print("| B x T x D | chunked f+b ms | stepwise f+b ms | stepwise / chunked |")
    print("| --- | --- | --- | --- |")
    for shape in a.shapes:
        b, t, d = (int(v) for v in shape.split("x"))
        fns = {scan: _step_fn(scan, b, t, d, a.chunk) for scan in ("chunked", "stepwise")}
        times = harness.interleaved(fns, a.repeats)
        med = {scan: statistics.median(v["wall"]) * 1e3 for scan, v in times.items()}
        print(
            f"| {shape} | {med['chunked']:.1f} | {med['stepwise']:.1f} | {med['stepwise'] / med['chunked']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
