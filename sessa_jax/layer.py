"""The gated residual block shared by Sessa and the baselines (docs/design.md, "The layer").

    y = x + W_out(mixer(gelu(a)) * g) + b_out,   (a, g) = split(W_in LayerNorm(x))

``kind`` picks the mixer: "sessa" (SessaMixer), "transformer" (forward attention only)
or "mamba" (selective SSM baseline); everything around the mixer is shared, so matched
comparisons differ only in the mixer.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from sessa_jax.cache import check_call
from sessa_jax.config import SessaConfig
from sessa_jax.layer_norm import LayerNorm
from sessa_jax.mamba_mixer import MambaMixer
from sessa_jax.mixer import AttentionMixer, SessaMixer
from sessa_jax.ops.rope import resolve_positions
from sessa_jax.options import LAYER_KINDS, LayerKind
from sessa_jax.sharding import DEFAULT_AXES, ActivationAxes, check_explicit_params, constrain, dense_init, norm_init


def mixer_class(kind: str):
    """Mixer module class for a block kind."""
    if kind == "sessa":
        return SessaMixer
    if kind == "transformer":
        return AttentionMixer
    if kind == "mamba":
        return MambaMixer
    raise ValueError(f"unknown block kind {kind!r}; choose one of {LAYER_KINDS}")


class SessaLayer(nn.Module):
    """One residual Sessa block on x (B, T, D) -> y (B, T, D) in x.dtype.

    Optional ``segment_ids`` (B, T) keep packed documents apart (0 = padding) and restart
    RoPE positions; ``positions`` (B, T) override them. With ``cache`` it prefills the
    decode cache and returns (y, cache); with ``decode=True`` it appends one token (at
    RoPE position cache['index'] unless ``positions`` (B, 1) are given).

    Sharding: ``axes`` (``sessa_jax.sharding.ActivationAxes``) names the logical axes of
    the activations it constrains, for the enclosing model's ``nn.logical_axis_rules``
    (``ActivationAxes(batch="activation_batch", ...)`` or ``sharding.MAXTEXT_AXES`` for
    MaxText-style rules); a name with no rule leaves that dimension to the compiler. The
    parameters' logical names (``embed``, ``mlp``, ``heads``, ``kv_heads``, ``norm``) come
    out with ``sessa_jax.sharding.param_logical_specs``. Without rules and a mesh, nothing
    is constrained.
    """

    config: SessaConfig
    kind: LayerKind = "sessa"
    axes: ActivationAxes = DEFAULT_AXES

    def setup(self):
        cfg = self.config
        dense = functools.partial(nn.Dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        # LayerNorm statistics in float32 (or wider), whatever the compute dtype.
        self.ln = LayerNorm(
            epsilon=cfg.ln_eps,
            dtype=jnp.promote_types(cfg.dtype, jnp.float32),
            param_dtype=cfg.param_dtype,
            **norm_init(),
        )
        self.W_in = dense(2 * cfg.d_model, **dense_init("embed", "mlp"))  # column-parallel
        self.mixer = mixer_class(self.kind)(cfg, axes=self.axes)
        self.W_out = dense(cfg.d_model, **dense_init("mlp", "embed"))  # row-parallel

    def _check_inputs(self, x, segment_ids, cache, decode) -> None:
        """ValueError (NotImplementedError for an unsupported cached kind) naming what is wrong
        with the inputs of ``__call__`` and how to fix it."""
        cfg = self.config
        if x.ndim != 3 or x.shape[-1] != cfg.d_model:
            raise ValueError(
                f"SessaLayer expects x of shape (batch, time, d_model={cfg.d_model}); got {tuple(x.shape)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"SessaLayer expects floating-point x (float32/bfloat16); got {x.dtype}: cast it, e.g. "
                f"x.astype(jnp.float32) (integer or bool input would truncate the output)"
            )
        b, t, _ = x.shape
        if t == 0:
            raise ValueError(f"SessaLayer got x of shape {tuple(x.shape)}: no positions (T=0); pass at least one token")
        check_call(cache, decode, t, "SessaLayer", "init_layer_cache")
        if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
            raise ValueError(f"segment_ids must have shape (batch, time) = {(b, t)}; got {tuple(segment_ids.shape)}")
        if cache is not None or decode:
            if self.kind != "sessa":
                raise NotImplementedError(f"cached decoding is implemented for kind='sessa' only; got {self.kind!r}")
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported with a decode cache (one sequence per row)")
        if not self.is_initializing():
            check_explicit_params(self.variables, "SessaLayer")

    def __call__(self, x, segment_ids=None, positions=None, *, cache=None, decode=False):
        """y = x + W_out(mixer(gelu(a)) * g) + b_out with (a, g) = split(W_in LayerNorm(x))."""
        self._check_inputs(x, segment_ids, cache, decode)
        cfg = self.config
        b, t, _ = x.shape
        btd, btw = self.axes.btd, self.axes.btw
        x = constrain(x, btd)
        xn = self.ln(x.astype(jnp.promote_types(x.dtype, jnp.float32))).astype(cfg.dtype)
        a, g = (constrain(z, btw) for z in jnp.split(self.W_in(xn), 2, axis=-1))
        a_bar = nn.gelu(a, approximate=False)
        if cache is None and not decode:
            s = self.mixer(a_bar, segment_ids, resolve_positions(segment_ids, positions, b, t))
        else:
            pos = None if decode and positions is None else resolve_positions(None, positions, b, t)
            s, cache = self.mixer(a_bar, None, pos, cache=cache, decode=decode)
        y = constrain(x + self.W_out(constrain(s, btw) * g).astype(x.dtype), btd)
        return y if cache is None else (y, cache)
