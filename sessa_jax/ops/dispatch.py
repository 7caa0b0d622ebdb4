"""Public entry points of the ops: argument validation and method dispatch.

Solve methods (``options.SOLVE_METHODS``): "dense" (oracle, materialises T x T), "blocked"
(chunked scan with a custom VJP), "recursive" (known-statistics solve, large matrix products) and
"auto". Attention methods (``options.ATTENTION_METHODS``): "dense", "blocked", "vendor" (cuDNN /
splash attention where one applies, else blocked) and "auto". What "auto" and the other defaults
run on each platform is the table ``PLATFORM_PATHS`` (``ops.platforms``).
"""

from __future__ import annotations

import jax.numpy as jnp

from sessa_jax.ops.attention.backends import accelerated_causal_attention
from sessa_jax.ops.attention.blocked import blocked_causal_attention
from sessa_jax.ops.masks import compute_dtype, default_segment_ids
from sessa_jax.ops.platforms import PLATFORM_PATHS, PlatformPaths, platform_kind, platform_paths  # noqa: F401
from sessa_jax.ops.reference import dense_causal_attention, dense_feedback_solve
from sessa_jax.ops.solve.blocked import blocked_feedback_solve
from sessa_jax.ops.solve.precision import resolve_precision
from sessa_jax.ops.solve.recursive import recursive_feedback_solve
from sessa_jax.ops.solve.row_stats_gpu import BLOCK_D
from sessa_jax.ops.solve.row_stats_gpu import TIERS as GPU_TIERS
from sessa_jax.options import (
    ATTENTION_METHODS,
    AUTO,
    KERNELS,
    SOLVE_METHODS,
    AttentionMethod,  # noqa: F401
    FeedbackPrecision,
    Kernels,
    SolveMethod,
    is_chunk_size,
    is_leaf_size,
)

METHODS = SOLVE_METHODS  # the public name (``sessa_jax.ops.METHODS``)
KERNEL_KEY_BLOCK = 128  # the key block of the Pallas kernels: the leaf must be a multiple of it
# Rows and keys of one tile of the recursive solve's wide blocks: large enough for full-speed
# matrix products on GPU/TPU, never above T/4, so that no buffer has two axes of T/2 or more,
# and at most TILE_LEAVES leaves, which bounds the switch branches (program size) whatever T is.
RECURSIVE_TILE = 4096
TILE_LEAVES = 8
# leaf_size="auto" for the recursive solve: LEAF_LONG on a GPU with XLA's products or the Mosaic
# GPU GEMM kernels from LEAF_LONG_MIN_LENGTH tokens on (half the leaf steps, pushes and kernel
# launches for more leaf FLOPs: docs/performance.md, "Leaves of 1024 on GPU"), else LEAF. With
# kernels "pallas" on a GPU (the statistics kernel alone) and on a TPU nothing has measured it.
LEAF = 512
LEAF_LONG = 1024
LEAF_LONG_MIN_LENGTH = 4096
# chunk_size="auto" for the blocked paths: the largest C of AUTO_CHUNKS whose logits tile
# (B*H, C, C) for attention, (B, C, C) for the solve, holds at most TILE_BUDGET floats (the size
# that stays in cache for a tile's elementwise passes). Attention on at most PANEL_MAX_LEN
# tokens whose (B*H, PANEL_CHUNK, T) panels fit that budget runs the "panels" schedule; so does
# the solve on more than one chunk of SOLVE_PANEL_CHUNK and at most SOLVE_PANEL_MAX_LEN tokens
# while its (B, SOLVE_PANEL_CHUNK, T) panels fit TILE_BUDGET.
AUTO_CHUNKS = (256, 128, 64)
TILE_BUDGET = 1 << 19
PANEL_CHUNK = 64
PANEL_MAX_LEN = 512
SOLVE_PANEL_CHUNK = 128
SOLVE_PANEL_MAX_LEN = 512


def recursive_tile(length: int, leaf: int) -> int:
    """Tile of the recursive solve's wide blocks: min(RECURSIVE_TILE, T/4, TILE_LEAVES leaves)."""
    return max(1, min(RECURSIVE_TILE, length // 4, TILE_LEAVES * leaf))


def recursive_leaf(length: int, platform: str, kernels: str = "xla") -> int:
    """The recursive solve's leaf (Cs) for leaf_size="auto" at sequence length ``length`` on
    ``platform`` ("cpu", "gpu", "tpu") with feedback ``kernels``: ``LEAF_LONG`` on a GPU with
    kernels "xla" or "gpu_gemm" where length >= ``LEAF_LONG_MIN_LENGTH``, else ``LEAF``."""
    if platform == "gpu" and kernels in ("xla", "gpu_gemm") and length >= LEAF_LONG_MIN_LENGTH:
        return LEAF_LONG
    return LEAF


def resolve_leaf(leaf_size, length: int, platform: str, kernels: str = "xla") -> int:
    """``leaf_size`` as an integer: itself, or for "auto" ``recursive_leaf``."""
    return recursive_leaf(length, platform, kernels) if leaf_size == AUTO else leaf_size


def _check_leaf(leaf_size) -> None:
    if not is_leaf_size(leaf_size):
        raise ValueError(f"leaf_size must be 'auto' or an integer >= 1 (e.g. 512); got {leaf_size!r}")


def _check_method(method: str, chunk_size, methods=SOLVE_METHODS) -> None:
    if method not in methods:
        raise ValueError(f"unknown method {method!r}; choose one of {methods}")
    if not is_chunk_size(chunk_size):
        raise ValueError(f"chunk_size must be 'auto' or an integer >= 1; got {chunk_size!r}")


def tile_chunk(tile_batch: int) -> int:
    """The largest C of AUTO_CHUNKS with tile_batch * C * C <= TILE_BUDGET (else the smallest)."""
    for c in AUTO_CHUNKS:
        if tile_batch * c * c <= TILE_BUDGET:
            return c
    return AUTO_CHUNKS[-1]


def solve_schedule(chunk_size, batch: int, length: int) -> tuple[str, int]:
    """(schedule, C) of the blocked solve: ("loop", ``chunk_size``) when it is an integer; for
    "auto", ("panels", SOLVE_PANEL_CHUNK) on sequences of more than one chunk and at most
    SOLVE_PANEL_MAX_LEN tokens whose (B, SOLVE_PANEL_CHUNK, T) panels fit TILE_BUDGET, else
    ("loop", ``tile_chunk(batch)``)."""
    if chunk_size != AUTO:
        return "loop", chunk_size
    if SOLVE_PANEL_CHUNK < length <= SOLVE_PANEL_MAX_LEN and batch * SOLVE_PANEL_CHUNK * length <= TILE_BUDGET:
        return "panels", SOLVE_PANEL_CHUNK
    return "loop", tile_chunk(batch)


def attention_schedule(chunk_size, batch: int, heads: int, length: int) -> tuple[str, int]:
    """(schedule, C) of the blocked attention: ("loop", ``chunk_size``) when it is an integer;
    for "auto", ("panels", PANEL_CHUNK) on short sequences whose panels fit TILE_BUDGET, else
    ("loop", ``tile_chunk(batch * heads)``)."""
    if chunk_size != AUTO:
        return "loop", chunk_size
    if length <= PANEL_MAX_LEN and batch * heads * PANEL_CHUNK * length <= TILE_BUDGET:
        return "panels", PANEL_CHUNK
    return "loop", tile_chunk(batch * heads)


def resolve_method(method: str, platform: str | None = None) -> str:
    """The solve method ``method`` runs on ``platform`` (None: the default backend): "auto"
    becomes ``PLATFORM_PATHS[platform].solve``."""
    return platform_paths(platform).solve if method == AUTO else method


def resolve_attention(method: str, platform: str | None = None) -> str:
    """The attention method ``method`` runs on ``platform`` (None: the default backend): "auto"
    becomes ``PLATFORM_PATHS[platform].attention``."""
    return platform_paths(platform).attention if method == AUTO else method


def _check_segments(segment_ids, batch: int, length: int, op: str):
    if segment_ids is None:
        return default_segment_ids(batch, length)
    if tuple(segment_ids.shape) != (batch, length):
        raise ValueError(
            f"{op}: segment_ids must have shape (batch, time) = {(batch, length)}; got {tuple(segment_ids.shape)}"
        )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"{op}: segment_ids must be integers; got dtype {segment_ids.dtype}")
    return segment_ids


def check_gpu_kernels(width: int, tier: str, input_dtypes) -> None:
    """The Mosaic GPU stats kernel's limits (``row_stats_gpu``): D and the logits tier."""
    if width % BLOCK_D:
        raise ValueError(
            f"feedback kernels 'pallas' on GPU need the head width D a multiple of {BLOCK_D} (the Mosaic GPU "
            f"stats kernel's wgmma tile); got D={width}: use kernels='xla'"
        )
    if tier not in GPU_TIERS and any(jnp.dtype(d) != jnp.bfloat16 for d in input_dtypes):
        raise ValueError(
            f"feedback kernels 'pallas' on GPU compute float32 logits at tier {GPU_TIERS}; got precision "
            f"{tier!r} with float32 q_b/k_b: use precision='bf16x3' (or 'auto'), bf16 q_b/k_b, "
            "or kernels='xla'"
        )


def _check_kernels(kernels: str, leaf: int, dtype, platform: str) -> None:
    if kernels not in KERNELS:
        raise ValueError(f"unknown feedback kernels {kernels!r}; choose one of {KERNELS}")
    if kernels == "xla":
        return
    if platform == "tpu" and kernels == "gpu_gemm":
        raise ValueError("feedback kernels 'gpu_gemm' are Mosaic GPU kernels; on TPU use kernels='pallas' or 'xla'")
    if leaf % KERNEL_KEY_BLOCK:
        raise ValueError(
            f"feedback kernels {kernels!r} need leaf_size a multiple of {KERNEL_KEY_BLOCK} "
            f"(their key block); got leaf {leaf}: use e.g. leaf_size=512 or kernels='xla'"
        )
    if jnp.dtype(dtype) != jnp.float32:
        raise ValueError(
            f"feedback kernels {kernels!r} accumulate in float32; got {jnp.dtype(dtype)} inputs "
            "(float64 runs only with kernels='xla')"
        )


def feedback_solve(
    q_b,
    k_b,
    gamma,
    f,
    *,
    segment_ids=None,
    method: SolveMethod = "auto",
    chunk_size="auto",
    leaf_size: int | str = AUTO,
    precision: FeedbackPrecision = "auto",
    kernels: Kernels = "xla",
):
    """Solves the Sessa feedback system s = (I - diag(gamma) A)^-1 f.

    q_b, k_b, f: (B, T, D); gamma: (B, T); segment_ids: optional (B, T) integers.
    A[t, tau] = softmax over tau < t in t's segment of q_b[t] . k_b[tau] / sqrt(D), with an
    all-zero row where t has no past. Accumulates in float32 (float64 for float64 inputs)
    and returns s (B, T, D) in f.dtype. Differentiable in q_b, k_b, gamma and f.
    ``chunk_size``: C of the blocked scan (an integer, or "auto": ``solve_schedule``);
    ``leaf_size``: Cs of the recursive solve, an integer or "auto" (``recursive_leaf``: 1024 on a
    GPU with kernels "xla" from T = 4096 on, else 512);
    ``precision``: the recursive solve's tier (``sessa_jax.ops.solve.precision``): "auto" runs float32 on
    CPU; on GPU/TPU "bfloat16" when q_b, k_b and f are all bf16 (bf16 compute) and "bf16x3"
    otherwise (``precision.auto_precision``); ``kernels``: "xla",
    "pallas" (the recursive solve's statistics and pushes in TPU kernels; on GPU its
    statistics in a Mosaic GPU kernel, D a multiple of 64) or "gpu_gemm" (the statistics in that
    kernel, the pushes' P and dL tiles in Mosaic GPU GEMM-with-epilogue kernels; D a multiple of 64, precision
    "bfloat16", or "bf16x3" with bf16 q_b/k_b; docs/kernels.md).
    """
    _check_method(method, chunk_size)
    _check_leaf(leaf_size)
    platform = platform_kind()  # the one platform decision of this call
    tier = resolve_precision(precision, platform, compute_dtype=jnp.result_type(q_b, k_b, f))
    if f.ndim != 3:
        raise ValueError(f"feedback_solve: f must be (batch, time, width); got shape {tuple(f.shape)}")
    for name, x in (("q_b", q_b), ("k_b", k_b)):
        if tuple(x.shape) != tuple(f.shape):
            raise ValueError(f"feedback_solve: {name} must have the shape of f {tuple(f.shape)}; got {tuple(x.shape)}")
    b, t, _ = f.shape
    if tuple(gamma.shape) != (b, t):
        raise ValueError(f"feedback_solve: gamma must have shape (batch, time) = {(b, t)}; got {tuple(gamma.shape)}")
    if 0 in f.shape:
        empty = [name for name, n in zip(("batch", "time", "width"), f.shape) if n == 0]
        raise ValueError(
            f"feedback_solve: q_b, k_b, f have shape {tuple(f.shape)}, an empty {' and '.join(empty)} "
            f"axis; pass at least one row, one position and one width column"
        )
    for name, x in (("q_b", q_b), ("k_b", k_b), ("gamma", gamma), ("f", f)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"feedback_solve: {name} has dtype {x.dtype}; the solve takes floating-point inputs "
                f"(float32/bfloat16): cast it, e.g. {name}.astype(jnp.float32) (s comes back in f's "
                f"dtype, so integer inputs would truncate it)"
            )
    packed = _check_segments(segment_ids, b, t, "feedback_solve")
    method = resolve_method(method, platform)
    if method == "dense":
        return dense_feedback_solve(q_b, k_b, gamma, f, packed)
    dtype = compute_dtype(q_b, k_b, gamma, f)
    if method == "recursive":
        leaf_size = resolve_leaf(leaf_size, t, platform, kernels)
        _check_kernels(kernels, min(leaf_size, t), dtype, platform)
        if kernels == "pallas" and platform == "gpu":
            check_gpu_kernels(f.shape[-1], tier, (q_b.dtype, k_b.dtype))
        # Without segment ids the solve masks nothing but causality (no select in its tiles).
        segments = None if segment_ids is None else packed
        s = recursive_feedback_solve(
            q_b,
            k_b,
            gamma,
            f,
            segments,
            leaf_size=leaf_size,
            tile=recursive_tile(t, leaf_size),
            tier=tier,
            platform=platform,
            dtype=dtype,
            kernels=kernels,
        )
        return s.astype(f.dtype)
    segments = None if segment_ids is None else packed  # causality alone masks one sequence per row
    schedule, chunk = solve_schedule(chunk_size, b, t)
    return blocked_feedback_solve(q_b, k_b, gamma, f, segments, chunk, dtype, schedule).astype(f.dtype)


def causal_attention(q, k, v, *, segment_ids=None, method: AttentionMethod = "auto", chunk_size="auto"):
    """Causal multi-head attention with grouped-query heads (diagonal included).

    q: (B, T, H, K); k, v: (B, T, Hkv, K) with H % Hkv == 0; scale K^-1/2; optional
    segment_ids (B, T) keep each token inside its segment. Softmax in float32 (or wider);
    returns (B, T, H, K) in v.dtype. ``method``: "dense" is the oracle, "blocked" always the
    pure-JAX blocked path, "vendor" the vendor kernel (cuDNN, splash) where one applies and the
    blocked path elsewhere, "auto" ``PLATFORM_PATHS[platform].attention``. ``chunk_size``: C of
    the blocked path, an integer or "auto" (``attention_schedule``).
    """
    _check_method(method, chunk_size, ATTENTION_METHODS)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"causal_attention: q, k, v must be (batch, time, heads, head_dim); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, t, h, kd = q.shape
    if tuple(k.shape) != tuple(v.shape) or k.shape[0] != b or k.shape[1] != t or k.shape[3] != kd:
        raise ValueError(
            f"causal_attention: k and v must be (batch={b}, time={t}, kv_heads, head_dim={kd}); "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if h % k.shape[2]:
        raise ValueError(f"causal_attention: query heads {h} must be a multiple of kv heads {k.shape[2]}")
    packed = _check_segments(segment_ids, b, t, "causal_attention")
    method = resolve_attention(method, platform_kind())
    if method == "vendor":
        # Where no vendor kernel applies (CPU, unsupported shape), the blocked pure-JAX path.
        try:
            return accelerated_causal_attention(q, k, v, segment_ids).astype(v.dtype)
        except (NotImplementedError, ImportError):
            pass
    if method == "dense":
        return dense_causal_attention(q, k, v, packed)
    dtype = compute_dtype(q, k, v)
    # Without segment ids the blocked path masks by causality alone (cheaper than comparing ids).
    segments = None if segment_ids is None else packed
    schedule, chunk = attention_schedule(chunk_size, b, h, t)
    return blocked_causal_attention(q, k, v, segments, chunk, dtype, schedule).astype(v.dtype)
