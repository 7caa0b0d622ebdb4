"""Baselines for matched comparisons: the Mamba-style mixer and parameter matching.

The Transformer baseline is ``SessaLM(config, kind="transformer")`` (the forward branch
of Sessa's mixer without feedback); the Mamba baseline is ``kind="mamba"`` (``MambaMixer``).
"""

from sessa_jax.baselines.params import KINDS, count_params, match_width
from sessa_jax.mamba_mixer import MambaMixer

__all__ = ["KINDS", "MambaMixer", "count_params", "match_width"]
