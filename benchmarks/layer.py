"""Layer benchmark: Sessa layer per feedback solver vs a same-shape causal-attention
Transformer layer, over sequence lengths.

For every T and every solver it reports forward and forward+backward wall time, tokens/s,
memory (XLA's compiled memory analysis: arguments + outputs + temporaries, plus the device's
peak_bytes_in_use where the backend reports it) and achieved TFLOP/s, next to
`SessaLayer(cfg, kind="transformer")` with solver="auto" (the yardstick: cuDNN / splash attention
where available, else the blocked attention) and the device's bf16/f32 matmul peak
measured in the same run (a jitted N x N @ N x N).

FLOP formula (model FLOPs of one layer, matmuls only, causal halves counted once):
    projections  = 2 B T D * (2D [W_in] + D [W_q] + 2 Hkv d [W_k, W_v] + D [W_o, if H > 1] + D [W_out])
    sessa extra  = 2 B T D * 2D [W_fb]  +  2 B T^2 D [feedback logits + A s, strict past]
    attention    = 2 B T^2 D [q k^T + p v over heads, causal half]
    fwd+bwd      = 3 x forward (the usual convention; the feedback backward really costs
                   ~3.5x its forward: seven products over the causal half against two, so this
                   understates its work).
Achieved TFLOP/s = FLOPs / time; "% peak" divides by the matmul peak measured here.

GPU run (scripts/accelerator_check.sh runs it):
    python -m benchmarks.layer --T 1024 2048 4096 8192 --B 8 --D 1024 --H 8 --dtype bfloat16 \
        --solvers recursive
CPU smoke run:
    python -m benchmarks.layer --T 512 1024 --B 1 --D 64 --H 4 --dtype float32 --solvers dense blocked
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import harness
from sessa_jax import SessaConfig, SessaLayer


def layer_flops(b, t, d, h, hkv, kind):
    """Forward model FLOPs of one layer (see the module docstring)."""
    hd = d // h
    proj = 2 * b * t * d * (2 * d + d + 2 * hkv * hd + (d if h > 1 else 0) + d)
    attn = 2 * b * t * t * d
    if kind == "sessa":
        return proj + 2 * b * t * d * 2 * d + attn + 2 * b * t * t * d
    return proj + attn


def run_case(cfg, kind, t, args):
    """Times forward and forward+backward of one layer; returns a result dict."""
    layer = SessaLayer(cfg, kind=kind)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (args.B, t, cfg.d_model), jnp.float32).astype(cfg.dtype)
    # init at 16 tokens in XLA (the opt-in feedback kernels need whole leaves); the parameters are the same
    init_cfg = cfg.replace(feedback_kernels="xla") if getattr(cfg, "feedback_kernels", "xla") != "xla" else cfg
    params = jax.jit(SessaLayer(init_cfg, kind=kind).init)(key, x[:, : min(t, 16)])
    fwd = jax.jit(lambda p, x: layer.apply(p, x))
    loss = lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2)
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    flops = layer_flops(args.B, t, cfg.d_model, cfg.n_heads, cfg.kv_heads, kind)
    out = {"kind": kind, "solver": cfg.solver if kind == "sessa" else "-", "T": t, "flops_fwd": flops}
    for name, fn, mult in (("fwd", fwd, 1), ("fwd_bwd", fwd_bwd, 3)):
        sec = harness.measure(harness.blocking(fn, params, x), warmup=args.warmup, repeats=args.iters)
        out[f"{name}_s"] = sec
        out[f"{name}_tok_s"] = args.B * t / sec
        out[f"{name}_tflops"] = mult * flops / sec / 1e12
        mem = harness.compiled_memory(fn.lower(params, x).compile())
        out[f"{name}_bytes"] = None if mem is None else mem["total"]
    out["device_peak_bytes"] = harness.device_peak_bytes()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_shape_args(p, T=[1024, 2048, 4096, 8192, 16384, 32768, 65536], D=1024, B=8, H=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--solvers",
        nargs="+",
        default=["blocked", "recursive", "auto"],
        choices=["dense", "blocked", "recursive", "auto"],
    )
    p.add_argument("--chunk", type=harness.auto_or_int, default="auto", help="chunk_size: auto or an integer")
    p.add_argument(
        "--leaf",
        type=harness.auto_or_int,
        default="auto",
        help="leaf_size of the recursive solve: auto (the library's rule) or an integer",
    )
    p.add_argument("--precision", default="auto", help="feedback_precision of the recursive solve")
    p.add_argument("--kernels", default="xla", help="feedback_kernels of the recursive solve (xla, pallas, gpu_gemm)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-transformer", action="store_true", help="skip the causal-attention yardstick")
    p.add_argument(
        "--dense-max-bytes",
        type=float,
        default=4 * 2**30,
        help="skip the dense solver when B*T*T*4 exceeds this (it materialises T x T)",
    )
    p.add_argument(
        "--peak-n", type=int, default=None, help="matmul size for the peak (default 8192 on GPU/TPU, 1024 on CPU)"
    )
    harness.add_output_args(p)
    args = p.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    platform = jax.default_backend()
    peak_n = args.peak_n or (1024 if platform == "cpu" else 8192)
    peak = harness.matmul_rate(peak_n, dtype, max(3, args.iters)) / 1e12
    print(f"# {harness.machine_line()}")
    print(f"# measured {args.dtype} matmul peak ({peak_n}^3): {peak:.2f} TFLOP/s")
    print(f"# B={args.B} D={args.D} H={args.H} Hkv={args.kv_heads or args.H} dtype={args.dtype} chunk={args.chunk}")
    header = (
        "kind",
        "solver",
        "T",
        "fwd ms",
        "fwd tok/s",
        "fwd TF/s",
        "fwd %pk",
        "f+b ms",
        "f+b tok/s",
        "f+b TF/s",
        "f+b %pk",
        "fwd mem",
        "f+b mem",
    )
    print(" | ".join(header))
    results = []
    runs = [("sessa", s) for s in args.solvers] + ([] if args.no_transformer else [("transformer", "auto")])
    for t in args.T:
        for kind, solver in runs:
            cfg = SessaConfig(
                d_model=args.D,
                n_heads=args.H,
                n_kv_heads=args.kv_heads,
                solver=solver,
                chunk_size=args.chunk,
                leaf_size=args.leaf,
                feedback_precision=args.precision,
                **({} if args.kernels == "xla" else {"feedback_kernels": args.kernels}),
                dtype=dtype,
                max_len=max(t, 16),
            )
            label = (kind, solver if kind == "sessa" else "-", str(t))
            if kind == "sessa" and solver == "dense" and args.B * t * t * 4 > args.dense_max_bytes:
                print(" | ".join(label + ("skipped: dense T x T above --dense-max-bytes",)))
                continue
            try:
                r = run_case(cfg, kind, t, args)
            except Exception as err:  # noqa: BLE001 - report and continue (OOM, NotImplementedError, ...)
                msg = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                print(" | ".join(label + (f"failed: {msg}",)))
                results.append({"kind": kind, "solver": solver, "T": t, "error": msg})
                continue
            r["peak_tflops"] = peak
            results.append(r)
            print(
                " | ".join(
                    label
                    + (
                        f"{r['fwd_s'] * 1e3:.2f}",
                        f"{r['fwd_tok_s']:.0f}",
                        f"{r['fwd_tflops']:.3f}",
                        f"{100 * r['fwd_tflops'] / peak:.1f}",
                        f"{r['fwd_bwd_s'] * 1e3:.2f}",
                        f"{r['fwd_bwd_tok_s']:.0f}",
                        f"{r['fwd_bwd_tflops']:.3f}",
                        f"{100 * r['fwd_bwd_tflops'] / peak:.1f}",
                        harness.fmt_mib(r["fwd_bytes"]),
                        harness.fmt_mib(r["fwd_bwd_bytes"]),
                    )
                ),
                flush=True,
            )
    harness.write_json(
        args.json,
        {
            "device": jax.devices()[0].device_kind,
            "platform": platform,
            "peak_tflops": peak,
            "args": vars(args),
            "results": results,
        },
    )
    return results


if __name__ == "__main__":
    main()
