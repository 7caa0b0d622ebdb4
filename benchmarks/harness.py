"""The parts every benchmark shares: timing, memory, the machine line, table and JSON output,
array sizes read off HLO text, and the argument shapes the benchmarks have in common.

Timing. A *call* is a zero-argument function that returns when its result is ready
(``blocking(fn, *args)`` makes one of a jitted function). ``time_calls`` gives the mean wall and
process-CPU seconds of a few calls in a row; ``measure`` warms up and reduces ``repeats`` such
samples to one number (median, min or mean); ``interleaved`` times several calls in turn, one
sample each per repeat, so that a slow phase of a shared machine hits all of them alike.
Process CPU time (``time.process_time``) counts every compute thread: on a loaded machine it is
the steadier figure of the work itself.

Memory. ``compiled_memory`` is XLA's own view of a compiled program (arguments, outputs and
temporaries, ``memory_analysis()``); ``device_peak_bytes`` the device allocator's peak where
the backend reports one; ``peak_rss_mib`` the process's peak resident memory.

Nothing here imports JAX at module level: the deviceless compile benchmarks set environment
variables before JAX starts its backends.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import resource
import statistics
import time
from typing import Callable, Iterable, Sequence

Call = Callable[[], object]
STATS = {"median": statistics.median, "min": min, "mean": statistics.fmean}


# ----------------------------------------------------------------------------- timing
def blocking(fn, *args) -> Call:
    """A call of ``fn(*args)`` that returns once every array of its result is ready."""
    import jax

    return lambda: jax.block_until_ready(fn(*args))


def time_calls(call: Call, number: int = 1) -> tuple[float, float]:
    """Mean (wall, process CPU) seconds of ``number`` calls of ``call`` in a row."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(number):
        call()
    return (time.perf_counter() - t0) / number, (time.process_time() - c0) / number


def calls_for(seconds_per_call: float, sample_s: float, most: int | None = None) -> int:
    """How many calls of ``seconds_per_call`` fill a sample of about ``sample_s`` seconds (>= 1)."""
    n = max(1, round(sample_s / max(seconds_per_call, 1e-6)))
    return n if most is None else min(most, n)


def measure(call: Call, *, warmup: int = 1, repeats: int = 5, number: int = 1, stat: str = "median") -> float:
    """Seconds per call of ``call``: ``warmup`` calls first (the first one compiles), then
    ``repeats`` samples of ``number`` calls each, reduced by ``stat`` ("median", "min", "mean")."""
    for _ in range(warmup):
        call()
    return STATS[stat]([time_calls(call, number)[0] for _ in range(max(1, repeats))])


def interleaved(
    calls: dict[str, Call], repeats: int, *, sample_s: float | None = None, number: int = 1, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """{name: {"wall": [...], "cpu": [...]}}: mean seconds per call of every call in ``calls``,
    one sample each per repeat, the calls taking turns. After ``warmup`` calls each (compiles),
    a sample is ``number`` calls, or with ``sample_s`` as many calls as last about that long
    (counted once per call, from one timed call)."""
    per_sample = {}
    for name, call in calls.items():
        for _ in range(warmup):
            call()
        per_sample[name] = number if sample_s is None else calls_for(time_calls(call)[0], sample_s)
    out = {name: {"wall": [], "cpu": []} for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            wall, cpu = time_calls(call, per_sample[name])
            out[name]["wall"].append(wall)
            out[name]["cpu"].append(cpu)
    return out


def matmul_rate(n: int, dtype="float32", repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` jitted (n, n) @ (n, n) products in ``dtype`` on the
    default device (float32 accumulation): the machine's matrix-product ceiling, same run."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    fn = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return 2.0 * n**3 / measure(blocking(fn, a, a), warmup=2, repeats=repeats, stat="min")


# ----------------------------------------------------------------------------- memory
def compiled_memory(compiled) -> dict | None:
    """{"argument", "output", "temp", "total"} bytes of a compiled program, as XLA plans them
    (None where the backend gives no analysis)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    out = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes, "temp": mem.temp_size_in_bytes}
    out["total"] = sum(out.values())
    return out


def device_peak_bytes() -> int | None:
    """The default device allocator's peak bytes in use (None where the backend keeps no count)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices may not implement memory_stats
        return None
    return stats.get("peak_bytes_in_use")


def peak_rss_mib() -> float:
    """This process's peak resident memory (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fmt_mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


# ----------------------------------------------------------------------------- output
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_line() -> str:
    """One line naming the machine and the software: device, CPU, cores, versions."""
    import jax

    dev = jax.devices()[0]
    return (
        f"{dev.device_kind} x{jax.device_count()} ({jax.default_backend()}); {cpu_model()}, "
        f"{os.cpu_count()} cores; python {platform.python_version()}, jax {jax.__version__}"
    )


def load_line(when: str) -> str:
    return f"# load average {when}: {' '.join(f'{v:.2f}' for v in os.getloadavg())}"


def markdown_row(cells: Iterable) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence] = ()) -> str:
    """A markdown table (header, separator, rows) as one string."""
    lines = [markdown_row(header), "|" + "---|" * len(header)]
    return "\n".join(lines + [markdown_row(r) for r in rows])


def write_json(path, obj) -> None:
    """Writes ``obj`` as indented JSON (no-op when ``path`` is None)."""
    if path:
        pathlib.Path(path).write_text(json.dumps(obj, indent=1))


# ----------------------------------------------------------------------------- arguments
def auto_or_int(text: str):
    """argparse ``type`` of an option that takes "auto" or an integer (chunk_size, leaf_size)."""
    return text if text == "auto" else int(text)


def add_shape_args(
    p: argparse.ArgumentParser, *, T: Sequence[int], D: int, B: Sequence[int] | int | None = None, H: int | None = None
) -> None:
    """--T (one or more lengths), --D and, where given, --B (one or more batches when ``B`` is a
    sequence) and --H (heads)."""
    p.add_argument("--T", type=int, nargs="+", default=list(T), help="sequence lengths")
    p.add_argument("--D", type=int, default=D, help="width")
    if B is not None:
        many = not isinstance(B, int)
        p.add_argument("--B", type=int, nargs="+" if many else None, default=list(B) if many else B, help="batch")
    if H is not None:
        p.add_argument("--H", type=int, default=H, help="heads")


def add_tier_args(p: argparse.ArgumentParser, *, default: Sequence[str], extra: Sequence[str] = ()) -> None:
    """--tiers: precision tiers of the recursive solve (``sessa_jax.ops.solve.precision.TIERS``, and ``extra``)."""
    from sessa_jax.ops.solve.precision import TIERS

    p.add_argument(
        "--tiers",
        nargs="+",
        default=list(default),
        choices=tuple(TIERS) + tuple(extra),
        help="precision tiers of the recursive solve",
    )


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="also write the results to this file")


# ----------------------------------------------------------------------------- HLO text
HLO_BYTES = {
    "f64": 8,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "bf16": 2,
    "f16": 2,
    "s8": 1,
    "u8": 1,
    "pred": 1,
    "s64": 8,
    "u64": 8,
    "s16": 2,
    "u16": 2,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
_ARRAY = re.compile(r"\b(" + "|".join(HLO_BYTES) + r")\[([0-9,]*)\]")


def _size(match) -> int:
    n = HLO_BYTES[match.group(1)]
    for d in match.group(2).split(","):
        n *= int(d) if d else 1
    return n


def nbytes(type_text: str) -> int:
    """Bytes of every array named in an HLO type (tuples summed)."""
    return sum(_size(m) for m in _ARRAY.finditer(type_text))


def dims(type_text: str) -> list[int]:
    """Dimensions of the first array named in an HLO type ([] if none)."""
    m = _ARRAY.search(type_text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def largest_array(hlo_text: str) -> tuple[int, str]:
    """(bytes, shape) of the largest array named in HLO text."""
    return max(((_size(m), m.group(0)) for m in _ARRAY.finditer(hlo_text)), default=(0, ""))
