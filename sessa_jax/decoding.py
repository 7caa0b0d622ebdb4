"""Autoregressive decoding for SessaLM: cache, prefill, single steps and ``generate``.

Per layer the cache holds the roped forward keys/values k_f, v_f (B, L, Hkv, K), the
feedback keys k_b (B, L, D), the solved states s (B, L, D, float32) and ``index``, the
number of cached tokens (SPEC section 3). A step costs O(L D) per layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sessa_jax.config import SessaConfig


def init_layer_cache(cfg: SessaConfig, batch_size: int, max_len: int | None = None):
    """Empty cache of one layer: dict of zero buffers of length max_len (default cfg.max_len)."""
    length = cfg.max_len if max_len is None else max_len
    if length < 1:
        raise ValueError(f"cache max_len must be >= 1; got {length}")
    kv = (batch_size, length, cfg.kv_heads, cfg.head_dim)
    return {
        "k_f": jnp.zeros(kv, cfg.dtype),
        "v_f": jnp.zeros(kv, cfg.dtype),
        "k_b": jnp.zeros((batch_size, length, cfg.d_model), cfg.dtype),
        "s": jnp.zeros((batch_size, length, cfg.d_model), jnp.promote_types(cfg.dtype, jnp.float32)),
        "index": jnp.zeros((), jnp.int32),
    }


def init_cache(cfg: SessaConfig, batch_size: int, max_len: int | None = None):
    """Cache for a SessaLM: a list of layer caches, or one stacked cache with scan_layers."""
    layers = [init_layer_cache(cfg, batch_size, max_len) for _ in range(cfg.n_layers)]
    if cfg.scan_layers:
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return layers


def cache_length(cache) -> int:
    """L, the number of positions a cache can hold."""
    first = cache if isinstance(cache, dict) else cache[0]
    return first["k_f"].shape[-3]


def cache_index(cache):
    """Number of tokens already cached (a scalar array)."""
    first = cache if isinstance(cache, dict) else cache[0]
    idx = first["index"]
    return idx.reshape(-1)[0] if idx.ndim else idx


def cache_full_error(cache) -> ValueError | None:
    """The error for a decode step into a full cache (index >= length); None when there is
    room or the index is traced (under jit a step past the end yields NaN instead)."""
    idx = cache_index(cache)
    if isinstance(idx, jax.core.Tracer):
        return None
    length = cache_length(cache)
    if int(idx) >= length:
        return ValueError(
            f"Cache is full: it holds {length} positions and all are used, so a decode step has nowhere to go; "
            f"build the cache (or the config) with a larger max_len"
        )
    return None


def _check_room(cache, needed: int, what: str) -> None:
    length = cache_length(cache)
    idx = cache_index(cache)
    if isinstance(idx, jax.core.Tracer):
        return  # under jit the caller (generate) has checked the lengths statically
    if int(idx) + needed > length:
        raise ValueError(
            f"{what}: the cache holds {length} positions and {int(idx)} are used, so {needed} more "
            f"do not fit; build the cache (or the config) with max_len >= {int(idx) + needed}"
        )


def prefill(model, params, tokens, cache):
    """Runs the prompt tokens (B, P) from an empty cache: returns (logits (B, P, V), cache)."""
    idx = cache_index(cache)
    if not isinstance(idx, jax.core.Tracer) and int(idx) != 0:
        raise ValueError(f"prefill writes from position 0 but the cache already holds {int(idx)} tokens; "
                         f"start from decoding.init_cache(...) or continue with decode_step")
    # The room for P tokens is a static shape check in SessaMixer (it holds under jit too).
    return model.apply(params, tokens, cache=cache)


def decode_step(model, params, token, cache):
    """Appends one token per row (B,) or (B, 1): returns (logits (B, V), cache)."""
    token = jnp.asarray(token)
    if token.ndim == 1:
        token = token[:, None]
    _check_room(cache, 1, "decode_step")
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


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(model, params, prompt, rng, max_new_tokens, temperature, top_k, top_p):
    cfg = model.config
    b, p = prompt.shape
    cache = init_cache(cfg, b)
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


def check_sampling(max_new_tokens, temperature, top_k, top_p, vocab_size: int) -> None:
    """ValueError naming the setting for any sampling argument outside its range."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < float("inf")):
        raise ValueError(f"generate: temperature must be a finite number >= 0 (0 = greedy); got {temperature!r}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"generate: top_k must be in [1, vocab_size={vocab_size}]; got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1]; got {top_p}")


def check_token_ids(tokens, vocab_size: int) -> None:
    """ValueError naming the first id of ``tokens`` outside [0, vocab_size) (see ``sessa_jax.model``)."""
    from sessa_jax.model import check_token_ids as check

    check(tokens, vocab_size)


def generate(model, params, prompt, max_new_tokens: int, rng, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None):
    """Samples ``max_new_tokens`` tokens after each prompt row: (B, P) -> (B, P + new) int32.

    One compiled program per (model, shapes, sampling settings): prefill, then a
    ``lax.scan`` of decode steps. temperature=0 is greedy. Raises ValueError when
    P + max_new_tokens exceeds ``model.config.max_len`` (the cache length).
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"generate: prompt must be (batch, length >= 1) token ids; got shape {tuple(prompt.shape)}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"generate: prompt must hold integer token ids; got dtype {prompt.dtype}")
    check_sampling(max_new_tokens, temperature, top_k, top_p, model.config.vocab_size)
    check_token_ids(prompt, model.config.vocab_size)
    if getattr(model, "kind", "sessa") != "sessa":
        raise NotImplementedError(f"generate: cached decoding exists for kind='sessa' only; got {model.kind!r}")
    cfg = model.config
    total = prompt.shape[1] + max_new_tokens
    if total > cfg.max_len:
        raise ValueError(
            f"generate: prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"the cache length max_len={cfg.max_len}; lower max_new_tokens or set config max_len >= {total}"
        )
    return _generate(model, params, prompt, rng, max_new_tokens, float(temperature), top_k, top_p)
