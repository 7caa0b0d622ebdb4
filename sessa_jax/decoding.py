"""Autoregressive decoding for SessaLM: cache, prefill, single steps and ``generate``.

Per layer the cache holds the roped forward keys/values k_f, v_f (B, L, Hkv, K), the
feedback keys k_b (B, L, D), the solved states s (B, L, D, float32) and ``index``, the
number of cached tokens. A step costs O(L D) per layer.

``generate`` works with any model that has the ``DecodableModel`` interface: ``SessaLM``,
or a user's own Flax module built from ``SessaLayer`` blocks.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sessa_jax.cache import (  # noqa: F401  (interface)
    cache_full_error,
    cache_index,
    cache_length,
    check_empty,
    check_room,
    init_cache,
    init_layer_cache,
)
from sessa_jax.config import SessaConfig
from sessa_jax.model import check_token_ids  # noqa: F401  (part of this module's interface)


class DecodableModel(Protocol):
    """What ``generate`` needs of a model (``SessaLM`` has it; so can a user's own module).

    ``config``
        any object with ``vocab_size`` (V, the logits' width) and ``max_len`` (L, the
        cache length: prompt + new tokens must fit). With no ``init_cache`` method it must
        be a ``SessaConfig`` describing the model's layers (``decoding.init_cache`` builds
        the cache from it).
    ``apply(variables, tokens, cache=cache)``
        prefill: int32 tokens (B, P) into an empty cache -> (logits (B, P, V), cache).
    ``apply(variables, token, cache=cache, decode=True)``
        one step: int32 token (B, 1) appended at the cache's next position ->
        (logits (B, 1, V), cache).
    ``init_cache(batch_size, max_len)`` (optional)
        the empty cache, any pytree of arrays that ``apply`` returns with the same
        structure, shapes and dtypes. Without it: ``decoding.init_cache(config, batch_size,
        max_len)`` (a list of ``SessaLayer`` caches, stacked with ``scan_layers``).

    A Flax module gets ``apply`` from ``nn.Module``: its ``__call__(tokens, *, cache=None,
    decode=False)`` returns ``(logits, cache)`` when given a cache. The model is a static
    argument of a jitted function, so it must be hashable (Flax modules with hashable
    fields are). A ``kind`` attribute other than "sessa" is refused (no cached decoding).
    """

    config: Any

    def apply(self, variables, tokens, *, cache, decode: bool = False) -> tuple: ...


def prefill(model, params, tokens, cache):
    """Runs the prompt tokens (B, P) from an empty cache: returns (logits (B, P, V), cache)."""
    check_empty(cache, "prefill")
    # The room for P tokens is a static shape check in SessaMixer (it holds under jit too).
    return model.apply(params, tokens, cache=cache)


def decode_step(model, params, token, cache):
    """Appends one token per row (B,) or (B, 1): returns (logits (B, V), cache)."""
    token = jnp.asarray(token)
    if token.ndim == 1:
        token = token[:, None]
    check_room(cache, 1, "decode_step")
    logits, cache = model.apply(params, token, cache=cache, decode=True)
    return logits[:, 0], cache


def sample_logits(logits, rng, temperature: float, top_k: int | None, top_p: float | None):
    """Samples token ids (B,) from logits (B, V); temperature 0 is greedy argmax."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:  # top_p = 1 keeps every token (float32 cumsums can miss 1)
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest set of top tokens whose mass reaches top_p (always >= 1 token).
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def empty_cache(model, batch_size: int):
    """The empty cache of ``model`` (a ``DecodableModel``) for ``batch_size`` rows of
    ``model.config.max_len`` positions: its ``init_cache`` or ``init_cache(model.config, ...)``."""
    own = getattr(model, "init_cache", None)
    if callable(own):
        return own(batch_size, model.config.max_len)
    if not isinstance(model.config, SessaConfig):
        raise TypeError(
            f"generate: {type(model).__name__} has no init_cache(batch_size, max_len) method and its config is a "
            f"{type(model.config).__name__}, not a SessaConfig, so its cache layout is unknown; give the model an "
            f"init_cache method (see sessa_jax.decoding.DecodableModel)"
        )
    return init_cache(model.config, batch_size)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(model, params, prompt, rng, max_new_tokens, temperature, top_k, top_p):
    b, p = prompt.shape
    cache = empty_cache(model, b)
    logits, cache = model.apply(params, prompt, cache=cache)
    first = sample_logits(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k, top_p)

    def step(carry, i):
        token, cache = carry
        logits, cache = model.apply(params, token[:, None], cache=cache, decode=True)
        nxt = sample_logits(logits[:, 0], jax.random.fold_in(rng, i), temperature, top_k, top_p)
        return (nxt, cache), token

    (last, _), tokens = jax.lax.scan(step, (first, cache), jnp.arange(1, max_new_tokens))
    new = jnp.concatenate([tokens.T, last[:, None]], axis=1)
    return jnp.concatenate([prompt.astype(jnp.int32), new], axis=1)


def _is_int(value) -> bool:
    """A Python or NumPy integer (not a bool): what a user passes as a count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_sampling(max_new_tokens, temperature, top_k, top_p, vocab_size: int) -> None:
    """ValueError naming the setting for any sampling argument outside its range.

    Python and NumPy scalars are accepted (``np.int64(8)`` as well as ``8``); callers
    convert them with ``int``/``float`` before using them as static arguments."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    if not (_is_real(temperature) and 0 <= temperature < float("inf")):
        raise ValueError(f"generate: temperature must be a finite number >= 0 (0 = greedy); got {temperature!r}")
    if top_k is not None and not (_is_int(top_k) and 1 <= top_k <= vocab_size):
        raise ValueError(
            f"generate: top_k must be in [1, vocab_size={vocab_size}]; got {top_k!r}"
            + ("" if _is_int(top_k) else ", not an integer")
        )
    if top_p is not None and not (_is_real(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(
            f"generate: top_p must be in (0, 1]; got {top_p!r}" + ("" if _is_real(top_p) else ", not a number")
        )


def check_rng(rng, what: str = "generate"):
    """``rng`` as a JAX PRNG key: a typed key (``jax.random.key(0)``) or a raw uint32 (2,)
    key (``jax.random.PRNGKey(0)``); anything else is a ValueError naming it and the fix."""
    fix = "pass a key such as jax.random.key(0) or jax.random.PRNGKey(0)"
    if _is_int(rng):
        raise ValueError(
            f"{what}: rng must be a JAX PRNG key, not the integer {int(rng)}; {fix} (the integer is its seed)"
        )
    try:
        key = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    except TypeError as e:
        raise ValueError(f"{what}: rng must be a JAX PRNG key; got {type(rng).__name__}; {fix}") from e
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{what}: rng must be a single PRNG key; got keys of shape {key.shape}; {fix}")
        return key
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise ValueError(
            f"{what}: rng must be a JAX PRNG key (a typed key, or uint32 of shape (2,)); got "
            f"{key.dtype} of shape {tuple(key.shape)}; {fix}"
        )
    return key


def generate(
    model,
    params,
    prompt,
    max_new_tokens: int,
    rng,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
):
    """Samples ``max_new_tokens`` tokens after each prompt row: (B, P) -> (B, P + new) int32.

    ``model``: a ``DecodableModel`` (``SessaLM`` or a user's module with that interface);
    ``params``: its variables; ``prompt``: integer ids (B, P), P >= 1; ``rng``: a PRNG key
    (``jax.random.key(0)`` or ``jax.random.PRNGKey(0)``). One compiled program per (model,
    shapes, sampling settings): prefill, then a ``lax.scan`` of decode steps.
    temperature=0 is greedy. Raises ValueError when P + max_new_tokens exceeds
    ``model.config.max_len`` (the cache length) and for arguments out of range.
    """
    cfg = getattr(model, "config", None)
    missing = [name for name in ("vocab_size", "max_len") if not hasattr(cfg, name)]
    if missing or not callable(getattr(model, "apply", None)):
        raise TypeError(
            f"generate: {type(model).__name__} lacks the decoding interface (config.vocab_size, config.max_len and "
            f"apply(variables, tokens, cache=..., decode=...)); missing: {missing or ['apply']}; see "
            f"sessa_jax.decoding.DecodableModel"
        )
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"generate: prompt must be (batch, length >= 1) token ids; got shape {tuple(prompt.shape)}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"generate: prompt must hold integer token ids; got dtype {prompt.dtype}")
    check_sampling(max_new_tokens, temperature, top_k, top_p, cfg.vocab_size)
    rng = check_rng(rng)
    check_token_ids(prompt, cfg.vocab_size)
    if getattr(model, "kind", "sessa") != "sessa":
        raise NotImplementedError(f"generate: cached decoding exists for kind='sessa' only; got {model.kind!r}")
    max_new_tokens = int(max_new_tokens)
    top_k = None if top_k is None else int(top_k)
    top_p = None if top_p is None else float(top_p)
    total = prompt.shape[1] + max_new_tokens
    if total > cfg.max_len:
        raise ValueError(
            f"generate: prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"the cache length max_len={cfg.max_len}; lower max_new_tokens or set config max_len >= {total}"
        )
    return _generate(model, params, prompt, rng, max_new_tokens, float(temperature), top_k, top_p)
