"""The decode cache: its layout, and every check on it (the layer, the mixer, the model and
``decoding`` call these instead of checking themselves).

A layer's cache is a dict of zero-initialised buffers of length L: ``k_f``, ``v_f``
(B, L, Hkv, K) and ``k_b`` (B, L, D) in the compute dtype, ``s`` (B, L, D) in float32 or wider,
and ``index`` (int32 scalar: tokens already cached). A model's cache is a list of n_layers such
dicts, or with ``scan_layers`` one dict whose entries are stacked on a leading axis of n_layers.
"""

from __future__ import annotations

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


def _first_layer(cache) -> dict:
    """The (first) layer dict of a cache built by ``init_cache`` or ``init_layer_cache``."""
    first = cache if isinstance(cache, dict) else cache[0] if isinstance(cache, (list, tuple)) and cache else None
    if not isinstance(first, dict) or "index" not in first or "k_f" not in first:
        raise ValueError(
            f"expected a decode cache built by sessa_jax.decoding.init_cache (a list of layer dicts, "
            f"or one stacked dict) or init_layer_cache; got {type(cache).__name__}"
            f"{' of ' + str(len(cache)) + ' entries' if isinstance(cache, (list, tuple)) else ''}"
        )
    return first


def cache_length(cache) -> int:
    """L, the number of positions a cache can hold."""
    return _first_layer(cache)["k_f"].shape[-3]


def cache_index(cache):
    """Number of tokens already cached (a scalar array)."""
    idx = _first_layer(cache)["index"]
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


def check_room(cache, needed: int, what: str) -> None:
    """ValueError from ``what`` when ``needed`` more tokens do not fit (concrete index only)."""
    length = cache_length(cache)
    idx = cache_index(cache)
    if isinstance(idx, jax.core.Tracer):
        return  # under jit the caller (generate) has checked the lengths statically
    if int(idx) + needed > length:
        raise ValueError(
            f"{what}: the cache holds {length} positions and {int(idx)} are used, so {needed} more "
            f"do not fit; build the cache (or the config) with max_len >= {int(idx) + needed}"
        )


def check_empty(cache, what: str) -> None:
    """ValueError from ``what`` unless the cache holds no token yet (concrete index only)."""
    idx = cache_index(cache)
    if not isinstance(idx, jax.core.Tracer) and int(idx) != 0:
        raise ValueError(
            f"{what} writes from position 0 but the cache already holds {int(idx)} tokens; "
            f"start from decoding.init_cache(...) or continue with decode_step"
        )


def check_call(cache, decode: bool, length: int, who: str, builder: str) -> None:
    """The checks every cached call makes before it runs: ``decode`` needs a cache, appends one
    token (``length`` == 1) and needs room in it (concrete index only; under jit a step past
    the end yields NaN, ``SessaMixer``). ``who`` names the caller, ``builder`` the function that
    builds its cache (e.g. "init_layer_cache")."""
    if decode and cache is None:
        raise ValueError(
            f"{who}: decode=True appends to a decode cache: pass cache=sessa_jax.decoding.{builder}("
            "config, batch_size) (prefilled by a call with cache=... and decode=False)"
        )
    if decode and length != 1:
        raise ValueError(f"{who}: decode=True appends one token: the input must have time length 1; got {length}")
    if decode:
        err = cache_full_error(cache)
        if err is not None:
            raise err


def check_layer_cache(cache, cfg: SessaConfig, batch: int, new: int) -> None:
    """Static checks of one layer's cache: it matches ``cfg`` and ``batch`` and has room for
    ``new`` tokens written from position 0 (prefill; 0 for a decode step)."""
    if not isinstance(cache, dict):
        raise ValueError(
            "decode=True appends to a decode cache (and prefill fills one): pass cache=sessa_jax.decoding."
            f"init_layer_cache(config, batch_size), a dict; got {type(cache).__name__}"
        )
    length = cache["k_f"].shape[1] if getattr(cache.get("k_f"), "ndim", 0) >= 2 else None
    kv = (batch, length, cfg.kv_heads, cfg.head_dim)
    wide = (batch, length, cfg.d_model)
    for name, expected in (("k_f", kv), ("v_f", kv), ("k_b", wide), ("s", wide)):
        got = tuple(getattr(cache.get(name), "shape", ()))
        if got != expected:
            raise ValueError(
                f"cache entry {name!r} has shape {got}; this input needs {expected} (batch={batch}, "
                f"d_model={cfg.d_model}, kv_heads={cfg.kv_heads}, head_dim={cfg.head_dim}); build the "
                f"cache with sessa_jax.decoding.init_layer_cache(config, batch_size={batch}) for this config"
            )
    if new > length:
        raise ValueError(
            f"prefill of {new} tokens: the cache holds {length} positions; build the cache (or the "
            f"config) with max_len >= {new}"
        )


def check_model_cache(cache, cfg: SessaConfig) -> None:
    """A model's cache has one entry per layer, in the layout ``init_cache`` builds for ``cfg``:
    a list of n_layers layer dicts, or (scan_layers) one dict stacked on a leading axis of
    n_layers. Each layer checks its entries' shapes (``check_layer_cache``)."""
    n = cfg.n_layers
    fix = (
        f"build it with sessa_jax.decoding.init_cache(config, batch_size) for this config (n_layers={n}, "
        f"scan_layers={cfg.scan_layers})"
    )
    if cfg.scan_layers:
        lead = {k: getattr(v, "shape", ())[:1] for k, v in cache.items()} if isinstance(cache, dict) else None
        if lead is None or not lead or any(shape != (n,) for shape in lead.values()):
            got = (
                f"a {type(cache).__name__}"
                if lead is None
                else "leading axes " + ", ".join(f"{k}: {v[0] if v else 'none'}" for k, v in lead.items())
            )
            raise ValueError(
                f"SessaLM (scan_layers=True) takes a cache stacked over its {n} layers: one dict "
                f"whose entries have a leading axis of {n}; got {got}; {fix}"
            )
        return
    if not isinstance(cache, (list, tuple)) or len(cache) != n or not all(isinstance(c, dict) for c in cache):
        got = f"{len(cache)} entries" if isinstance(cache, (list, tuple)) else f"a {type(cache).__name__}"
        raise ValueError(f"SessaLM takes a cache with one dict per layer, a list of {n}; got {got}; {fix}")
