"""Input checks: out-of-range token ids, NaN temperature, non-float layer
input, T=0, and an eager layer-level decode step past the end of the cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax import SessaConfig, SessaLM, decoding
from sessa_jax.layer import SessaLayer
from sessa_jax.model import with_token_checks
from sessa_jax.sample import generate_by_recompute
from sessa_jax.sample import main as sample_main

CFG = SessaConfig(d_model=16, n_heads=2, vocab_size=23, n_layers=2, chunk_size=4, max_len=12)
TOKENS = jnp.arange(14, dtype=jnp.int32).reshape(2, 7) % 23


@pytest.fixture(scope="module")
def lm():
    model = SessaLM(CFG)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), TOKENS)


@pytest.fixture(scope="module")
def layer():
    module = SessaLayer(CFG)
    return module, jax.jit(module.init)(jax.random.PRNGKey(1), jnp.ones((1, 3, 16)))


@pytest.mark.parametrize("bad", [-1, 23, 1000])
def test_out_of_range_token_ids_raise_eagerly_with_the_id_and_vocab(lm, bad):
    model, params = lm
    with pytest.raises(ValueError, match=rf"token id {bad} at position \(1, 3\) is outside the vocabulary \[0, 23\)"):
        model.apply(params, TOKENS.at[1, 3].set(bad))


def test_out_of_range_token_ids_are_checkifiable_under_jit(lm):
    model, params = lm
    checked = jax.jit(with_token_checks(model.apply))
    err, logits = checked(params, TOKENS)
    err.throw()  # in range: no error, and the logits are the plain ones (float32 sums may reorder under jit)
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(jax.jit(model.apply)(params, TOKENS)), rtol=1e-5, atol=1e-5
    )
    err, _ = checked(params, TOKENS.at[0, 2].set(-1))
    with pytest.raises(Exception, match=r"token id -1 is outside the vocabulary \[0, 23\)"):
        err.throw()


def test_generate_rejects_bad_prompts_and_a_nan_temperature(lm):
    model, params = lm
    rng = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"token id 99 .* \[0, 23\)"):
        decoding.generate(model, params, TOKENS.at[0, 0].set(99), 2, rng)
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0.*nan"):
        decoding.generate(model, params, TOKENS, 2, rng, temperature=float("nan"))
    with pytest.raises(ValueError, match=r"token id -5"):
        generate_by_recompute(model, params, TOKENS.at[1, 1].set(-5), 2, rng)


def test_sample_cli_reports_an_out_of_range_prompt(tmp_path, capsys):
    """The sample CLI printed zeros and exited 0 for a prompt id outside the vocabulary."""
    from sessa_jax.train import checkpoint as ckpt
    from sessa_jax.train.config import load_config, resolve
    from sessa_jax.train.optimizer import make_optimizer
    from sessa_jax.train.state import build_model, create_state

    cfg = resolve(load_config("tiny"))  # a run directory holding a fresh (untrained) step-0 checkpoint
    model, tx = build_model(cfg), make_optimizer(cfg.optim, cfg.train.steps)
    manager = ckpt.make_manager(str(tmp_path / "run" / "checkpoints"), async_save=False)
    from sessa_jax.data import TRAIN, make_iterator

    ckpt.save(
        manager, create_state(model, tx, 0, cfg.data.seq_len), make_iterator(cfg.data, TRAIN), cfg.to_dict(), force=True
    )
    manager.close()
    workdir = str(tmp_path / "run")
    assert sample_main(["--run", workdir, "--prompt", "3 999 4", "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "token id 999" in err and "[0, 32)" in err
    assert sample_main(["--run", workdir, "--prompt", "3 9 4", "--max_new_tokens", "2", "--temperature", "nan"]) == 2
    assert "temperature" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_layer_input_raises(layer, dtype):
    module, params = layer
    with pytest.raises(ValueError, match=rf"floating-point x .*got {jnp.dtype(dtype).name}"):
        module.apply(params, jnp.ones((1, 3, 16), dtype))


def test_zero_length_input_is_rejected_clearly(lm, layer):
    model, params = lm
    with pytest.raises(ValueError, match=r"T=0"):
        model.apply(params, jnp.zeros((2, 0), jnp.int32), cache=decoding.init_cache(CFG, 2))
    with pytest.raises(ValueError, match=r"T=0"):
        model.apply(params, jnp.zeros((2, 0), jnp.int32))
    module, lparams = layer
    with pytest.raises(ValueError, match=r"T=0"):
        module.apply(lparams, jnp.zeros((1, 0, 16)))


def test_eager_layer_decode_past_the_cache_end_raises(layer):
    module, params = layer
    cache = decoding.init_layer_cache(CFG, 1, max_len=4)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 5, 16))
    _, cache = jax.jit(lambda p, x, c: module.apply(p, x, cache=c))(params, x[:, :3], cache)
    y, cache = module.apply(params, x[:, 3:4], cache=cache, decode=True)  # the last free position
    assert np.all(np.isfinite(np.asarray(y)))
    with pytest.raises(ValueError, match=r"Cache is full: it holds 4 positions"):
        module.apply(params, x[:, 4:5], cache=cache, decode=True)


def test_eager_lm_decode_past_the_cache_end_raises_with_scanned_layers(lm):
    cfg = CFG.replace(scan_layers=True, max_len=3)
    model = SessaLM(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), TOKENS[:, :3])
    _, cache = jax.jit(lambda p, t, c: model.apply(p, t, cache=c))(params, TOKENS[:, :3], decoding.init_cache(cfg, 2))
    with pytest.raises(ValueError, match=r"Cache is full: it holds 3 positions"):
        model.apply(params, TOKENS[:, :1], cache=cache, decode=True)
