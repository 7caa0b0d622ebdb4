"""Whole SessaLayer, sessa-jax vs the published PyTorch layer, on the same CPU in the same run.

B=1, D=256, H=4, float32 by default; forward and forward + backward (loss = sum(y * r),
gradients of every weight and of x) for each T. The reference (`sessa.layer.SessaLayer` from
the published code, found at --reference or $SESSA_REFERENCE_DIR and put on the worker's
PYTHONPATH) runs in a worker subprocess with torch; if torch or the reference is missing its
columns say why and sessa-jax is measured alone.

The machine may be shared: every repeat times each (T, implementation, pass) once, interleaved
(jax fwd, ref fwd, jax f+b, ref f+b for T1, then T2, ...), so slow phases of the machine hit
both implementations alike; the table shows the median over repeats. One sample is the mean
of enough calls to last ~--sample-s. Beside wall clock it shows each process's CPU time
(time.process_time): the work itself, whatever the thread count, the steadier figure on a
loaded machine. --threads N pins both processes to N cores (os.sched_setaffinity; the
reference worker inherits it) and sets torch's thread count to N: XLA's CPU runtime keeps
its own threads whatever its flags say, so pinning is what makes the two equal. The load average
(os.getloadavg) is printed before and after.

    pip install -e '.[bench]'        # torch (CPU wheel) for the reference
    python -m benchmarks.vs_reference                       # T = 256 ... 8192
    python -m benchmarks.vs_reference --T 512 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
DEFAULT_T = [256, 512, 1024, 2048, 4096, 8192]


def _default_reference() -> str:
    """$SESSA_REFERENCE_DIR (as the interop tests read it; $SESSA_REFERENCE too), else
    shared/reference beside the checkout."""
    env = os.environ.get("SESSA_REFERENCE_DIR") or os.environ.get("SESSA_REFERENCE")
    if env:
        return env
    for cand in (REPO.parent / "shared" / "reference", REPO.parents[1] / "shared" / "reference"):
        if (cand / "sessa" / "layer.py").exists():
            return str(cand)
    return str(REPO.parent / "shared" / "reference")


# ----------------------------------------------------------------------------- reference worker
def _worker(b: int, d: int, h: int, seed: int, threads: int) -> None:
    """Reads {"T", "pass", "n"} JSON lines on stdin; answers {"s": mean seconds} per line.
    The reference's folder is on this process's PYTHONPATH (``Reference`` puts it there)."""
    import torch
    from sessa.layer import SessaLayer as RefLayer

    if threads:
        torch.set_num_threads(threads)

    torch.manual_seed(seed)
    cases = {}

    def case(t):
        if t not in cases:
            layer = RefLayer(D=d, n_heads=h, max_len=None, use_flash=False).float()
            x = torch.randn(b, t, d)
            r = torch.randn(b, t, d)

            def fwd():
                with torch.no_grad():
                    layer(x)

            def fwd_bwd():
                layer.zero_grad(set_to_none=True)
                xg = x.detach().requires_grad_(True)
                (layer(xg) * r).sum().backward()

            cases[t] = {"fwd": fwd, "fwd_bwd": fwd_bwd}
        return cases[t]

    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            fn = case(req["T"])[req["pass"]]
            wall, cpu = harness.time_calls(fn, req["n"])
            print(json.dumps({"s": wall, "cpu": cpu}), flush=True)
        except Exception as err:  # noqa: BLE001 - reported to the parent, which shows it in the table
            print(json.dumps({"error": f"{type(err).__name__}: {err}"[:200]}), flush=True)


class Reference:
    """The reference layer in a subprocess; ``time(T, pass, n)`` -> mean seconds or an error string."""

    def __init__(self, reference: str, b: int, d: int, h: int, seed: int, threads: int):
        self.why_not = None
        self.proc = None
        try:
            import importlib.util

            try:
                found = importlib.util.find_spec("torch") is not None
            except ValueError:  # a torch module without a spec (e.g. blocked in sys.modules)
                found = False
            if not found:
                raise ImportError("torch is not installed (pip install -e '.[bench]')")
            if not (Path(reference) / "sessa" / "layer.py").exists():
                raise FileNotFoundError(f"no sessa/layer.py under --reference {reference}")
        except (ImportError, FileNotFoundError) as err:
            self.why_not = str(err)
            return
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.vs_reference",
            "--worker",
            "--B",
            str(b),
            "--D",
            str(d),
            "--H",
            str(h),
            "--seed",
            str(seed),
            "--threads",
            str(threads),
        ]
        path = os.pathsep.join([reference, str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=path),
        )
        self.info = json.loads(self.proc.stdout.readline())

    def time(self, t: int, which: str, n: int):
        """(wall, CPU) mean seconds per call, or (error, error) strings."""
        self.proc.stdin.write(json.dumps({"T": t, "pass": which, "n": n}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            return reply["error"], reply["error"]
        return reply["s"], reply["cpu"]

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- sessa-jax side
def _jax_case(t: int, args):
    import jax
    import jax.numpy as jnp

    from sessa_jax import SessaConfig, SessaLayer

    cfg = SessaConfig(
        d_model=args.D, n_heads=args.H, solver=args.solver, chunk_size=args.chunk, dtype=jnp.float32, max_len=max(t, 16)
    )
    layer = SessaLayer(cfg)
    kx, kr, kp = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    x = jax.random.normal(kx, (args.B, t, args.D), jnp.float32)
    r = jax.random.normal(kr, (args.B, t, args.D), jnp.float32)
    params = layer.init(kp, x)
    fwd = jax.jit(layer.apply)

    def loss(p, x):
        return jnp.sum(layer.apply(p, x) * r)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return {
        "fwd": lambda: jax.block_until_ready(fwd(params, x)),
        "fwd_bwd": lambda: jax.block_until_ready(grad(params, x)),
    }


def _fmt_ms(v):
    return f"{v * 1e3:.1f}" if isinstance(v, float) else "-"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=DEFAULT_T)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the table shows the median")
    p.add_argument("--sample-s", type=float, default=0.3, help="target seconds of one timing sample")
    p.add_argument("--solver", default="auto", help="sessa-jax solver (auto = blocked on CPU)")
    p.add_argument(
        "--chunk",
        type=harness.auto_or_int,
        default="auto",
        help="sessa-jax chunk_size: 'auto' (the default config) or an integer",
    )
    p.add_argument("--passes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    p.add_argument("--reference", default=_default_reference(), help="folder holding the published sessa/ package")
    p.add_argument("--no-reference", action="store_true", help="time sessa-jax only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="pin both implementations to this many cores (os.sched_setaffinity, and "
        "torch.set_num_threads); 0 = each library's default on every core. On a loaded "
        "machine torch's default OpenMP team spins against other processes, so compare "
        "with equal small counts",
    )
    p.add_argument("--json", default=None, help="also write the samples to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1; got {args.repeats}")
    if any(t < 1 for t in args.T):
        p.error(f"--T values must be >= 1; got {args.T}")
    if args.worker:
        return _worker(args.B, args.D, args.H, args.seed, args.threads)
    if args.threads:
        if "jax" in sys.modules:
            raise RuntimeError("--threads must be set before jax is imported: run this script as a program")
        cores = sorted(os.sched_getaffinity(0))
        if args.threads > len(cores):
            p.error(f"--threads {args.threads}: this process may use only {len(cores)} core(s)")
        os.sched_setaffinity(0, cores[: args.threads])  # jax's pools and the torch worker inherit this

    import flax
    import jax
    import numpy as np

    ref = None if args.no_reference else Reference(args.reference, args.B, args.D, args.H, args.seed, args.threads)
    why_not = "--no-reference" if ref is None else ref.why_not
    print(
        f"# machine: {harness.cpu_model()} ({platform.machine()}), cpus={os.cpu_count()}, python "
        f"{platform.python_version()}, numpy {np.__version__}, flax {flax.__version__}"
    )
    print(
        f"# sessa-jax: jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"solver={args.solver} chunk={args.chunk} "
        f"threads={args.threads or 'default'}"
    )
    if why_not:
        print(f"# reference skipped: {why_not}")
    else:
        print(f"# reference: {args.reference} with torch {ref.info['torch']} ({ref.info['threads']} threads)")
    print(f"# B={args.B} D={args.D} H={args.H} float32; {args.repeats} interleaved repeats, median")
    print(harness.load_line("before"), flush=True)

    cases, calls = {}, {}
    for t in args.T:  # compile and warm up, and size each sample
        cases[t] = _jax_case(t, args)
        for which in args.passes:
            fn = cases[t][which]
            fn()
            calls[(t, which)] = harness.calls_for(harness.time_calls(fn)[0], args.sample_s, most=50)
            if not why_not:
                ref.time(t, which, 1)  # the reference's own warm-up
    samples = {}
    for _ in range(args.repeats):
        for t in args.T:
            for which in args.passes:
                n = calls[(t, which)]
                wall, cpu = harness.time_calls(cases[t][which], n)
                samples.setdefault(("jax", t, which, "wall"), []).append(wall)
                samples.setdefault(("jax", t, which, "cpu"), []).append(cpu)
                if not why_not:
                    wall, cpu = ref.time(t, which, n)
                    samples.setdefault(("ref", t, which, "wall"), []).append(wall)
                    samples.setdefault(("ref", t, which, "cpu"), []).append(cpu)
    if ref is not None:
        ref.close()

    def med(key):
        vals = samples.get(key, [])
        nums = [v for v in vals if isinstance(v, float)]
        if len(nums) != len(vals) or not nums:
            return next((v for v in vals if not isinstance(v, float)), None)
        return statistics.median(nums)

    names = {"fwd": "forward", "fwd_bwd": "forward + backward"}
    for which in args.passes:
        print(
            f"\n{names[which]} (median ms per call; wall clock, and the process's CPU time)\n"
            "| T | reference | sessa-jax | ratio (jax / ref) | reference CPU | sessa-jax CPU | CPU ratio |\n"
            "| --- | --- | --- | --- | --- | --- | --- |"
        )
        for t in args.T:
            row = [str(t)]
            for clock in ("wall", "cpu"):
                j, r = med(("jax", t, which, clock)), med(("ref", t, which, clock))
                ratio = f"{j / r:.2f}" if isinstance(j, float) and isinstance(r, float) else "-"
                r_txt = _fmt_ms(r) if isinstance(r, float) or r is None else f"error: {r}"
                row += [r_txt, _fmt_ms(j), ratio]
            print("| " + " | ".join(row) + " |")
    print("\n" + harness.load_line("after"))
    harness.write_json(
        args.json, {"args": vars(args), "samples": {"|".join(map(str, k)): v for k, v in samples.items()}}
    )
    return samples


if __name__ == "__main__":
    main()
