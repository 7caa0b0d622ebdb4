"""Parameter counts of SessaLM per ``kind`` and width matching for fair comparisons."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sessa_jax.config import SessaConfig
from sessa_jax.model import SessaLM
from sessa_jax.options import LAYER_KINDS as KINDS


@functools.lru_cache(maxsize=256)
def count_params(config: SessaConfig, kind: str = "sessa") -> int:
    """Number of parameters of ``SessaLM(config, kind)``, from shapes only (no FLOPs)."""
    if kind not in KINDS:
        raise ValueError(f"model.kind={kind!r} is unknown; choose one of {KINDS}")
    model = SessaLM(config, kind=kind)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


def width_step(config: SessaConfig) -> int:
    """Granularity of d_model that keeps heads (and even RoPE head widths) valid."""
    return config.n_heads * (2 if config.rope else 1)


def match_width(config: SessaConfig, kind: str, reference_kind: str = "sessa") -> SessaConfig:
    """``config`` with d_model chosen so ``kind`` has the parameter count of ``reference_kind``.

    Depth, heads and vocabulary stay fixed; only the width moves, in steps that keep
    ``d_model % n_heads == 0``. Returns the candidate with the closest count.
    """
    if kind == reference_kind:
        return config
    target = count_params(config, reference_kind)
    step = width_step(config)
    # The count is a quadratic in d_model (up to rounding of the Mamba dt rank): fit it
    # on three widths, solve, then check the neighbouring valid widths exactly.
    ds = [
        config.d_model - step if config.d_model > step else config.d_model + 2 * step,
        config.d_model,
        config.d_model + step,
    ]
    coef = np.polyfit(ds, [count_params(config.replace(d_model=d), kind) for d in ds], 2)
    roots = [r.real for r in np.roots(coef - np.array([0, 0, target])) if r.real > 0 and abs(r.imag) < 1e-6]
    guess = roots[0] if roots else config.d_model
    base = max(step, int(round(guess / step)) * step)
    candidates = [c for c in (base - step, base, base + step) if c > 0]
    best = min(candidates, key=lambda d: abs(count_params(config.replace(d_model=d), kind) - target))
    return config.replace(d_model=best)
