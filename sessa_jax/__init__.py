"""sessa_jax: Sessa (Selective State Space Attention) in JAX/Flax Linen.

Importing has no side effects: no device queries, no distributed initialisation.
"""

from sessa_jax import convert, decoding, ops
from sessa_jax.config import PRESETS, SessaConfig, preset
from sessa_jax.layer import SessaLayer
from sessa_jax.mixer import AttentionMixer, SessaMixer
from sessa_jax.model import SessaLM

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it); tag v0.2.0

__all__ = [
    "PRESETS",
    "AttentionMixer",
    "SessaConfig",
    "SessaLM",
    "SessaLayer",
    "SessaMixer",
    "convert",
    "decoding",
    "ops",
    "preset",
]
