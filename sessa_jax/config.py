"""SessaConfig: the frozen model configuration, its validation and named presets.

Dimension legend used across the package: B batch, T time, D d_model, H forward heads,
G query heads per key/value head (H // Hkv), K head width (D // H), C chunk, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np

from sessa_jax.options import (
    FEEDBACK_PRECISIONS,
    KERNELS,
    SOLVE_METHODS,
    FeedbackPrecision,
    Kernels,
    SolveMethod,
    is_chunk_size,
    is_leaf_size,
)


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class SessaConfig:
    """Configuration of a Sessa layer and of the language model built from it.

    Layer fields: ``d_model`` (D), ``n_heads`` (H forward heads), ``n_kv_heads`` (Hkv, None
    means H; grouped-query attention when smaller), ``rope``/``rope_base`` (interleaved RoPE
    on the forward branch), ``gamma_max`` (bound on |gamma_t|, in (0, 1)), ``ln_eps``,
    ``solver`` (feedback solve and forward attention: "dense" oracle, "blocked" scan,
    "recursive" known-statistics solve, "auto" = recursive on GPU/TPU and
    blocked on CPU), ``chunk_size`` (C of the blocked paths: an integer, or "auto", the
    default, which picks C per call from the batch, heads and length, and for short
    sequences attention's panel schedule: ``sessa_jax.ops.dispatch``), ``leaf_size`` (Cs, the leaf of
    the recursive solve: an integer, or "auto", the default: 1024 on a GPU with feedback_kernels
    "xla" or "gpu_gemm" from T = 4096 on, else 512, ``sessa_jax.ops.dispatch.recursive_leaf``),
    ``feedback_precision`` (tier of the recursive solve's products,
    ``sessa_jax.ops.solve.precision``: "float32", "bf16x3", "bfloat16", or "auto": float32 on CPU; on
    GPU/TPU "bfloat16" for bf16 ``dtype`` (its gradients within 2x of bf16 attention's own error,
    s within 2x of what f's bf16 rounding does to it) and "bf16x3" for float32 ``dtype``),
    ``feedback_kernels`` ("xla", the portable default, or "pallas": the TPU Mosaic kernels for
    the recursive solve's statistics pass and pushes; on GPU a Mosaic GPU kernel for its
    statistics pass only, head width a multiple of 64; or "gpu_gemm": that statistics kernel and
    the solve's P and dL tiles in Mosaic GPU GEMM-with-epilogue kernels, docs/kernels.md; opt-in until
    measured on a device; needs leaf_size a multiple of 128),
    ``dtype`` (compute) and ``param_dtype`` (parameters, float32 by default).

    LM fields: ``vocab_size``, ``n_layers``, ``max_len`` (decode cache length),
    ``tie_embeddings``, ``scan_layers`` (``nn.scan`` over layers), ``remat``.
    """

    d_model: int
    n_heads: int
    n_kv_heads: int | None = None
    rope: bool = True
    rope_base: float = 10000.0
    gamma_max: float = 0.999
    ln_eps: float = 1e-5
    solver: SolveMethod = "auto"
    chunk_size: int | str = "auto"
    leaf_size: int | str = "auto"
    feedback_precision: FeedbackPrecision = "auto"
    feedback_kernels: Kernels = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    vocab_size: int = 256
    n_layers: int = 2
    max_len: int = 2048
    tie_embeddings: bool = True
    scan_layers: bool = False
    remat: bool = False

    def __post_init__(self):
        self.validate()

    # Derived sizes -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """Hkv: number of key/value heads of the forward branch."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        """K = D // H, the forward-branch head width."""
        return self.d_model // self.n_heads

    def replace(self, **changes: Any) -> "SessaConfig":
        """Returns a copy with ``changes`` applied (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(
                f"SessaConfig has no field(s) {unknown}; known fields: {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-friendly dict (dtypes as names); inverse of ``from_dict``."""
        out = dataclasses.asdict(self)
        out["dtype"] = _dtype_name(self.dtype)
        out["param_dtype"] = _dtype_name(self.param_dtype)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SessaConfig":
        """Builds a config from ``to_dict`` output; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SessaConfig key(s) {unknown}; known keys: {sorted(known)}")
        d = dict(d)
        for key in ("dtype", "param_dtype"):
            if key in d and isinstance(d[key], str):
                try:
                    d[key] = jnp.dtype(d[key])
                except TypeError as e:
                    raise ValueError(f"SessaConfig.{key}={d[key]!r} is not a dtype") from e
        return cls(**d)

    # Validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raises ValueError naming the field and the rule it breaks."""

        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SessaConfig.{name} must be a positive integer; got {v!r}")

        for name in ("d_model", "n_heads", "vocab_size", "n_layers", "max_len"):
            positive_int(name)
        if not is_chunk_size(self.chunk_size):
            raise ValueError(
                f"SessaConfig.chunk_size must be 'auto' or an integer >= 1 (e.g. 128); got {self.chunk_size!r}"
            )
        if not is_leaf_size(self.leaf_size):
            raise ValueError(
                f"SessaConfig.leaf_size must be 'auto' or an integer >= 1 (the recursive solve's leaf, e.g. 512); "
                f"got {self.leaf_size!r}"
            )
        if self.feedback_precision not in FEEDBACK_PRECISIONS:
            raise ValueError(
                f"SessaConfig.feedback_precision={self.feedback_precision!r} is unknown; choose one of "
                f"{FEEDBACK_PRECISIONS} ('auto' = float32 on CPU; on GPU/TPU bfloat16 for bf16 dtype, "
                "bf16x3 for float32)"
            )
        if self.feedback_kernels not in KERNELS:
            raise ValueError(
                f"SessaConfig.feedback_kernels={self.feedback_kernels!r} is unknown; choose one of "
                f"{KERNELS} ('xla' everywhere, 'pallas' = TPU kernels, on GPU the stats kernel, "
                "'gpu_gemm' = GPU GEMM-with-epilogue kernels)"
            )
        if self.feedback_kernels != "xla" and self.leaf_size != "auto" and self.leaf_size % 128:
            raise ValueError(
                f"SessaConfig.feedback_kernels={self.feedback_kernels!r} needs leaf_size a multiple of 128; "
                f"got leaf_size="
                f"{self.leaf_size} (use 512 or 'auto', or feedback_kernels='xla')"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"SessaConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                f"(d_model % n_heads == 0); pick n_heads among the divisors of d_model"
            )
        if self.n_kv_heads is not None:
            if isinstance(self.n_kv_heads, bool) or not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1:
                raise ValueError(f"SessaConfig.n_kv_heads must be None or a positive integer; got {self.n_kv_heads!r}")
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"SessaConfig.n_heads={self.n_heads} must be divisible by n_kv_heads="
                    f"{self.n_kv_heads} (n_heads % n_kv_heads == 0) for grouped-query attention"
                )
        if self.rope and self.head_dim % 2:
            raise ValueError(
                f"SessaConfig: RoPE needs an even head width, but d_model/n_heads = "
                f"{self.d_model}/{self.n_heads} = {self.head_dim} is odd; change n_heads or set rope=False"
            )
        for name in ("rope", "tie_embeddings", "scan_layers", "remat"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"SessaConfig.{name} must be a bool; got {getattr(self, name)!r}")

        def real(v):
            return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))

        if not (real(self.gamma_max) and 0.0 < float(self.gamma_max) < 1.0):
            raise ValueError(
                f"SessaConfig.gamma_max must satisfy 0 < gamma_max < 1 (it bounds |gamma_t| so the "
                f"feedback solve stays well conditioned); got {self.gamma_max!r}"
            )
        for name in ("ln_eps", "rope_base"):
            v = getattr(self, name)
            if not (real(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"SessaConfig.{name} must be a finite number > 0; got {v!r}")
        if self.solver not in SOLVE_METHODS:
            raise ValueError(f"SessaConfig.solver={self.solver!r} is unknown; choose one of {SOLVE_METHODS}")
        for name in ("dtype", "param_dtype"):
            try:
                dt = jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"SessaConfig.{name}={getattr(self, name)!r} is not a dtype") from e
            if not jnp.issubdtype(dt, jnp.floating):
                raise ValueError(f"SessaConfig.{name} must be a floating dtype; got {dt.name}")


# Presets sized like the paper's models (GPT-2-style widths); vocab set by the run config.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_heads=4, n_layers=2, max_len=256, chunk_size=32),
    "125m": dict(d_model=768, n_heads=12, n_layers=12, max_len=2048, vocab_size=50304),
    "350m": dict(d_model=1024, n_heads=16, n_layers=24, max_len=2048, vocab_size=50304),
}


def preset(name: str, **overrides: Any) -> SessaConfig:
    """Returns the named preset (``PRESETS``) with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return SessaConfig(**PRESETS[name]).replace(**overrides)
