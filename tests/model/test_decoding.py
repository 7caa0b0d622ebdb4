"""Cached decoding of SessaLM: prefill + steps reproduce the forward pass; generate."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax import SessaConfig, SessaLM, decoding

T = 24


@functools.lru_cache(maxsize=None)
def _model(scan_layers: bool):
    cfg = SessaConfig(
        d_model=32, n_heads=4, n_kv_heads=2, vocab_size=61, n_layers=2, max_len=T, chunk_size=8, scan_layers=scan_layers
    )
    model = SessaLM(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)  # compiled: op by op it took seconds
    return model, params, tokens


@functools.lru_cache(maxsize=None)
def _compiled(scan_layers: bool):
    """(forward logits, jitted prefill, jitted step) shared by every test of one model."""
    model, params, tokens = _model(scan_layers)
    full = jax.jit(model.apply)(params, tokens)
    prefill = jax.jit(functools.partial(decoding.prefill, model))
    step = jax.jit(functools.partial(decoding.decode_step, model))
    return full, prefill, step


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("prompt_len", [1, 2, 17, T])
def test_prefill_and_steps_reproduce_forward(scan_layers, prompt_len):
    model, params, tokens = _model(scan_layers)
    full, prefill, step = _compiled(scan_layers)
    cache = decoding.init_cache(model.config, tokens.shape[0])
    logits, cache = prefill(params, tokens[:, :prompt_len], cache)
    outs = [logits]
    for t in range(prompt_len, T):
        logits_t, cache = step(params, tokens[:, t], cache)
        outs.append(logits_t[:, None])
    decoded = jnp.concatenate(outs, axis=1)
    scale = float(jnp.max(jnp.abs(full)))
    assert float(jnp.max(jnp.abs(decoded - full))) <= 1e-5 * scale
    assert int(decoding.cache_index(cache)) == T


def test_greedy_generate_is_deterministic_and_compiles_once():
    model, params, tokens = _model(False)
    before = decoding._generate._cache_size()
    out1 = decoding.generate(model, params, tokens[:, :5], 8, jax.random.PRNGKey(0), temperature=0.0)
    out2 = decoding.generate(model, params, tokens[:, :5], 8, jax.random.PRNGKey(9), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
    np.testing.assert_array_equal(np.asarray(out1[:, :5]), np.asarray(tokens[:, :5]))
    # Each generated token is the argmax of the forward logits of the sequence so far.
    logits = jax.jit(model.apply)(params, out1)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 4:-1], -1)), np.asarray(out1[:, 5:]))
    compiled = decoding._generate._cache_size()
    new_prompt = (tokens[:, 5:10] + 1) % model.config.vocab_size
    decoding.generate(model, params, new_prompt, 8, jax.random.PRNGKey(1), temperature=0.0)
    assert decoding._generate._cache_size() == compiled == before + 1


def test_sampling_settings():
    model, params, tokens = _model(False)
    greedy = decoding.generate(model, params, tokens[:, :5], 8, jax.random.PRNGKey(0), temperature=0.0)
    top1 = decoding.generate(model, params, tokens[:, :5], 8, jax.random.PRNGKey(5), temperature=1.0, top_k=1)
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(top1))  # top_k=1 is greedy
    tiny_p = decoding.generate(model, params, tokens[:, :5], 8, jax.random.PRNGKey(5), temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(tiny_p))  # only the top token survives
    a = decoding.generate(model, params, tokens[:, :5], 8, jax.random.PRNGKey(5), temperature=1.0)
    b = decoding.generate(model, params, tokens[:, :5], 8, jax.random.PRNGKey(5), temperature=1.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same key, same sample


def test_cache_overflow_is_a_clear_error():
    model, params, tokens = _model(False)
    with pytest.raises(ValueError, match=r"exceeds the cache length max_len=24"):
        decoding.generate(model, params, tokens[:, :20], 5, jax.random.PRNGKey(0))
    cache = decoding.init_cache(model.config, 2)
    _, cache = decoding.prefill(model, params, tokens, cache)
    with pytest.raises(ValueError, match=r"cache holds 24 positions and 24 are used"):
        decoding.decode_step(model, params, tokens[:, 0], cache)
    with pytest.raises(ValueError, match=r"prefill writes from position 0 but the cache already holds 24"):
        decoding.prefill(model, params, tokens[:, :2], cache)
    with pytest.raises(ValueError, match=r"max_len >= 30"):
        decoding.prefill(model, params, jnp.zeros((2, 30), jnp.int32), decoding.init_cache(model.config, 2))


def test_decode_without_a_cache_is_an_error():
    model, params, tokens = _model(False)
    with pytest.raises(ValueError, match=r"decode=True appends to a decode cache.*init_cache"):
        model.apply(params, tokens[:, :1], decode=True)


def test_decode_steps_honour_given_positions():
    """Prefill and steps at caller-given RoPE positions reproduce the forward pass at them."""
    model, params, tokens = _model(False)
    pos = jnp.broadcast_to(jnp.arange(T) * 3 + 7, tokens.shape)  # non-trivial distances
    full = jax.jit(model.apply)(params, tokens, positions=pos)
    apply = jax.jit(model.apply, static_argnames="decode")
    p = T - 3
    logits, cache = apply(params, tokens[:, :p], positions=pos[:, :p], cache=decoding.init_cache(model.config, 2))
    outs = [logits]
    for t in range(p, T):
        logits_t, cache = apply(params, tokens[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache, decode=True)
        outs.append(logits_t)
    decoded = jnp.concatenate(outs, axis=1)
    assert float(jnp.max(jnp.abs(decoded - full))) <= 1e-5 * float(jnp.max(jnp.abs(full)))


def test_cache_overflow_is_caught_under_jit():
    model, params, tokens = _model(False)
    _, prefill, step = _compiled(False)
    # Prefill lengths are static: the check holds even under jit.
    with pytest.raises(ValueError, match=r"25 tokens.*holds 24 positions.*max_len >= 25"):
        prefill(params, jnp.zeros((2, T + 1), jnp.int32), decoding.init_cache(model.config, 2))
    # A jitted step past the end cannot raise: it poisons the logits with NaN instead of
    # silently overwriting the last cached position.
    _, cache = prefill(params, tokens, decoding.init_cache(model.config, 2))
    logits, cache = step(params, tokens[:, 0], cache)
    assert bool(jnp.all(jnp.isnan(logits)))


def test_cache_of_the_wrong_batch_or_config_is_rejected():
    model, params, tokens = _model(False)
    with pytest.raises(ValueError, match=r"cache entry 'k_f' has shape \(1, 24, 2, 8\).*\(2, 24, 2, 8\)"):
        decoding.prefill(model, params, tokens[:, :4], decoding.init_cache(model.config, 1))
    with pytest.raises(ValueError, match=r"cache entry 'k_f' has shape \(2, 24, 2, 8\).*\(1, 24, 2, 8\)"):
        decoding.prefill(model, params, tokens[:1, :4], decoding.init_cache(model.config, 2))
    other = model.config.replace(n_kv_heads=4)
    with pytest.raises(ValueError, match=r"cache entry 'k_f' has shape \(2, 24, 4, 8\)"):
        decoding.prefill(model, params, tokens[:, :4], decoding.init_cache(other, 2))
    _, cache = decoding.prefill(model, params, tokens[:, :4], decoding.init_cache(model.config, 2))
    with pytest.raises(ValueError, match=r"cache entry 'k_f' has shape \(2, 24, 2, 8\).*\(1, 24, 2, 8\)"):
        decoding.decode_step(model, params, tokens[:1, 4], cache)


def test_top_p_one_keeps_every_token(monkeypatch):
    """top_p=1 is no filtering: float32 rounding of the cumulative mass must not drop tokens."""
    seen = []
    real = jax.random.categorical
    monkeypatch.setattr(
        jax.random, "categorical", lambda key, logits, axis=-1: seen.append(logits) or real(key, logits, axis)
    )
    logits = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 1000))
    decoding.sample_logits(logits, jax.random.PRNGKey(1), 1.0, None, 1.0)
    assert bool(jnp.all(jnp.isfinite(seen[-1])))
