"""Sessa ops: the feedback solve and causal attention, each with a dense oracle and faster paths."""

from sessa_jax.ops.dispatch import ATTENTION_METHODS, METHODS, PLATFORM_PATHS, causal_attention, feedback_solve
from sessa_jax.ops.rope import apply_rope, rope_inv_freq, segment_positions

__all__ = [
    "ATTENTION_METHODS",
    "METHODS",
    "PLATFORM_PATHS",
    "apply_rope",
    "causal_attention",
    "feedback_solve",
    "rope_inv_freq",
    "segment_positions",
]
