"""Every option of the package, defined once: a ``Literal`` type for annotations and the tuple of
its values for validation and error messages (``typing.get_args`` of the type, so the two cannot
drift apart). ``SessaConfig``, the ops, the run config and the baselines import them from here.
"""

from __future__ import annotations

from typing import Literal, get_args

AUTO = "auto"

SolveMethod = Literal["dense", "blocked", "recursive", "auto"]
"""The feedback solve: "dense" oracle (T x T), "blocked" scan (CPU), "recursive" known-statistics
solve (GPU/TPU), "auto" (``ops.dispatch.PLATFORM_PATHS``)."""
SOLVE_METHODS: tuple[str, ...] = get_args(SolveMethod)

AttentionMethod = Literal["dense", "blocked", "vendor", "auto"]
"""Causal attention: "dense" oracle, "blocked" (pure JAX), "vendor" (cuDNN on GPU, splash
attention on TPU, else blocked), "auto" (``ops.dispatch.PLATFORM_PATHS``)."""
ATTENTION_METHODS: tuple[str, ...] = get_args(AttentionMethod)

PrecisionTier = Literal["float32", "bf16x3", "bfloat16"]
"""Precision tier of the recursive solve's products (``ops.solve.precision``)."""
PRECISION_TIERS: tuple[str, ...] = get_args(PrecisionTier)

FeedbackPrecision = Literal["auto", "float32", "bf16x3", "bfloat16"]
"""A tier, or "auto": the tier ``ops.solve.precision.auto_precision`` picks."""
FEEDBACK_PRECISIONS: tuple[str, ...] = get_args(FeedbackPrecision)

Kernels = Literal["xla", "pallas", "gpu_gemm"]
"""Implementation of the recursive solve's statistics pass and pushes: "xla" (portable),
"pallas" (the Mosaic kernels, ``ops.solve.*_tpu`` / ``*_gpu``) or "gpu_gemm" (the pushes' P and dL
tiles in the Mosaic GPU GEMM-with-epilogue kernels, ``ops.solve.block_product_gpu``)."""
KERNELS: tuple[str, ...] = get_args(Kernels)

BlockedSchedule = Literal["loop", "panels"]
"""Schedule of the blocked solve and attention: chunk loops, or panels unrolled (short T)."""
BLOCKED_SCHEDULES: tuple[str, ...] = get_args(BlockedSchedule)

LayerKind = Literal["sessa", "transformer", "mamba"]
"""The mixer of a residual block (``layer.SessaLayer.kind``)."""
LAYER_KINDS: tuple[str, ...] = get_args(LayerKind)

LrSchedule = Literal["cosine", "linear", "constant", "wsd"]
"""Learning-rate schedule of the run config (``optim.schedule``)."""
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)

TokenizerKind = Literal["bytes", "sentencepiece", "tokenizers"]
"""Tokenizer of the run config (``data.tokenizer.kind``)."""
TOKENIZER_KINDS: tuple[str, ...] = get_args(TokenizerKind)

# The attention method each solve method runs in a Sessa mixer's forward branch.
ATTENTION_OF_SOLVE: dict[str, str] = {"dense": "dense", "blocked": "blocked", "recursive": "vendor", "auto": "auto"}


def is_leaf_size(value) -> bool:
    """Whether ``value`` is a valid leaf_size of the recursive solve: "auto" or an integer >= 1."""
    return is_chunk_size(value)


def is_chunk_size(value) -> bool:
    """Whether ``value`` is a valid chunk_size of the blocked paths: "auto" or an integer >= 1."""
    return value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def check_option(name: str, value, choices: tuple[str, ...], hint: str = "") -> None:
    """ValueError naming ``name``, the bad ``value`` and the ``choices`` (plus ``hint``)."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {choices}{' ' + hint if hint else ''}")
