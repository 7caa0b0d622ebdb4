"""SessaLM: token embedding -> n_layers gated blocks -> final LayerNorm -> logits.

``kind`` selects the blocks' mixer ("sessa", "transformer", "mamba"); embedding, norms,
head and block wrapper are shared so baselines are matched. ``config.scan_layers`` runs
the blocks under ``nn.scan`` (params stacked on a leading layer axis, one compiled
block); ``config.remat`` rematerialises each block in the backward pass.

Token ids outside [0, vocab_size) would make every logit NaN (the embedding lookup fills
them with NaN, and attention spreads them). Eager calls raise ``ValueError`` naming the id
and the vocabulary size. Under ``jax.jit`` ids cannot be inspected; wrap the function with
``with_token_checks`` (``jax.experimental.checkify``) to get the same error from ``err.throw()``:

    err, logits = jax.jit(with_token_checks(model.apply))(params, tokens)
    err.throw()
"""

from __future__ import annotations

import contextvars
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from sessa_jax.cache import check_call, check_model_cache
from sessa_jax.config import SessaConfig
from sessa_jax.layer import SessaLayer
from sessa_jax.layer_norm import LayerNorm
from sessa_jax.ops.rope import resolve_positions
from sessa_jax.sharding import (
    DEFAULT_AXES,
    ActivationAxes,
    check_explicit_params,
    constrain,
    dense_init,
    explicit_mesh,
    logical,
    norm_init,
)

_CHECKIFY_TOKENS = contextvars.ContextVar("sessa_checkify_tokens", default=False)


def check_token_ids(tokens, vocab_size: int) -> None:
    """Checks that every id of ``tokens`` (any shape, integer) lies in [0, vocab_size).

    Concrete arrays: ValueError naming the first bad id, its position and the vocabulary
    size. Traced arrays: a ``checkify.check`` when called inside ``with_token_checks``,
    otherwise nothing (a plain ``jit`` cannot raise on values).
    """
    if isinstance(tokens, jax.core.Tracer):
        if _CHECKIFY_TOKENS.get():
            ok = (tokens >= 0) & (tokens < vocab_size)
            first = jnp.reshape(tokens, -1)[jnp.argmin(jnp.reshape(ok, -1))]
            checkify.check(
                jnp.all(ok),
                "token id {id} is outside the vocabulary [0, {v}) of this model",
                id=first,
                v=jnp.int32(vocab_size),
            )
        return
    t = np.asarray(tokens)
    bad = (t < 0) | (t >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"token id {int(t[where])} at position {where} is outside the vocabulary [0, {vocab_size}) of this "
            f"model ({int(bad.sum())} bad ids in all); ids must come from the tokenizer/task the model was built for"
        )


def with_token_checks(fn):
    """``checkify``-ed ``fn`` (e.g. ``model.apply``) whose SessaLM calls check token ids:
    returns ``(err, out)``; ``err.throw()`` raises with the first bad id. Works under jit."""

    def traced(*args, **kwargs):
        flag = _CHECKIFY_TOKENS.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _CHECKIFY_TOKENS.reset(flag)

    return checkify.checkify(functools.wraps(fn)(traced))


class _StackedLayer(SessaLayer):
    """SessaLayer with the (carry, per-layer input) -> (carry, per-layer output) signature
    that ``nn.scan`` needs; the same parameter names as SessaLayer."""

    decode: bool = False

    def __call__(self, x, cache, segment_ids, positions):
        if cache is None:
            return super().__call__(x, segment_ids, positions), None
        return super().__call__(x, segment_ids, positions, cache=cache, decode=self.decode)


class SessaLM(nn.Module):
    """Decoder LM on int tokens (B, T) -> float32 logits (B, T, V).

    ``segment_ids`` (B, T) pack documents (0 = padding); ``positions`` override RoPE
    positions. With ``cache`` (``sessa_jax.decoding.init_cache``) it prefills and returns
    (logits, cache); with ``decode=True`` tokens is (B, 1) and one step is appended.
    ``return_hidden=True`` (no cache) returns the final-norm hidden states (B, T, D) instead
    of logits; ``SessaLM.logits`` maps them to logits (used by the chunked loss).
    ``axes`` names the activations' logical axes (``sessa_jax.sharding.ActivationAxes``,
    passed on to every block).
    """

    config: SessaConfig
    kind: str = "sessa"
    axes: ActivationAxes = DEFAULT_AXES

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=logical(nn.initializers.normal(stddev=cfg.d_model**-0.5), ("vocab", "embed")),
        )
        self.norm_f = LayerNorm(
            epsilon=cfg.ln_eps,
            dtype=jnp.promote_types(cfg.dtype, jnp.float32),
            param_dtype=cfg.param_dtype,
            **norm_init(),
        )
        if not cfg.tie_embeddings:
            self.head = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                **dense_init("embed", "vocab"),
            )

    def _blocks(self, decode: bool):
        cfg = self.config
        block = _StackedLayer
        if cfg.remat:
            block = nn.remat(block, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return scanned(cfg, self.kind, self.axes, decode=decode, name="layers")
        return [block(cfg, self.kind, self.axes, decode=decode, name=f"layers_{i}") for i in range(cfg.n_layers)]

    def _check_inputs(self, tokens, cache, decode) -> None:
        """ValueError naming what is wrong with the inputs of ``__call__`` and how to fix it."""
        cfg = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"SessaLM expects integer tokens of shape (batch, time); got {tokens.dtype} {tuple(tokens.shape)}"
            )
        b, t = tokens.shape
        if t == 0:
            raise ValueError(
                f"SessaLM got tokens of shape {(b, t)}: no positions (T=0); pass at least one token per row"
            )
        check_token_ids(tokens, cfg.vocab_size)
        if cache is not None:
            check_model_cache(cache, cfg)
        check_call(cache, decode, t, "SessaLM", "init_cache")
        if not self.is_initializing():
            check_explicit_params(self.variables, "SessaLM")

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None, *, cache=None, decode=False, return_hidden=False):
        """logits = head(LayerNorm(layers(embed(tokens)))); (logits, cache) with ``cache``."""
        self._check_inputs(tokens, cache, decode)
        cfg = self.config
        b, t = tokens.shape
        if not decode and cache is None:
            positions = resolve_positions(segment_ids, positions, b, t)
        x = constrain(self._embed(tokens), self.axes.btd)
        blocks = self._blocks(decode)
        if cfg.scan_layers:
            x, new_cache = blocks(x, cache, segment_ids, positions)
        else:
            outs = [None] * cfg.n_layers
            for i, block in enumerate(blocks):
                x, outs[i] = block(x, None if cache is None else cache[i], segment_ids, positions)
            new_cache = None if cache is None else outs
        x = self.norm_f(x.astype(jnp.promote_types(x.dtype, jnp.float32))).astype(cfg.dtype)
        if return_hidden:  # the chunked loss applies the head itself, a slice of T at a time
            return x
        logits = self.logits(x)
        return logits if cache is None else (logits, new_cache)

    def _embed(self, tokens):
        """Token embeddings (B, T, D) in the compute dtype; ids outside the table give NaN."""
        if explicit_mesh() is None:
            return self.embed(tokens)
        # On an Explicit mesh the gather must say how its result is split: as the token rows are.
        spec = tuple(jax.typeof(tokens).sharding.spec) + (None,) * (tokens.ndim + 1)
        table = jnp.asarray(self.embed.embedding, self.config.dtype)
        return table.at[tokens].get(
            mode="fill", fill_value=jnp.nan, out_sharding=jax.sharding.PartitionSpec(*spec[: tokens.ndim + 1])
        )

    def logits(self, x):
        """Final hidden states (B, T, D) -> float32 logits (B, T, V): the (tied) output head."""
        logits = self.embed.attend(x) if self.config.tie_embeddings else self.head(x)
        return constrain(logits.astype(jnp.float32), self.axes.btv)
