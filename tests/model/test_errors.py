"""Bad inputs raise clear errors that name the value and the rule."""

import jax
import jax.numpy as jnp
import pytest

from sessa_jax import SessaConfig, SessaLayer, SessaLM
from sessa_jax.ops import causal_attention, feedback_solve


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(d_model=30, n_heads=4), r"d_model=30 must be divisible by n_heads=4"),
        (dict(d_model=32, n_heads=4, n_kv_heads=3), r"n_heads=4 must be divisible by n_kv_heads=3"),
        (dict(d_model=12, n_heads=4), r"RoPE needs an even head width.*= 3 is odd"),
        (dict(d_model=16, n_heads=2, gamma_max=1.0), r"0 < gamma_max < 1.*got 1.0"),
        (dict(d_model=16, n_heads=2, gamma_max=0.0), r"0 < gamma_max < 1.*got 0.0"),
        (
            dict(d_model=16, n_heads=2, chunk_size=0),
            r"chunk_size must be 'auto' or an integer >= 1 \(e.g. 128\); got 0",
        ),
        (dict(d_model=16, n_heads=2, chunk_size="fast"), r"chunk_size must be 'auto' or an integer >= 1.*got 'fast'"),
        (dict(d_model=16, n_heads=2, chunk_size=True), r"chunk_size must be 'auto' or an integer >= 1.*got True"),
        (dict(d_model=16, n_heads=2, solver="fast"), r"solver='fast' is unknown"),
        (dict(d_model=16, n_heads=2, solver="pallas"), r"solver='pallas' is unknown; choose one of"),
        (dict(d_model=16, n_heads=2, leaf_size=0), r"leaf_size must be 'auto' or an integer >= 1.*got 0"),
        (dict(d_model=16, n_heads=2, leaf_size="big"), r"leaf_size must be 'auto' or an integer >= 1.*got 'big'"),
        (dict(d_model=16, n_heads=2, feedback_precision="tf32"), r"feedback_precision='tf32' is unknown"),
        (dict(d_model=0, n_heads=2), r"d_model must be a positive integer; got 0"),
        (dict(d_model=16, n_heads=2, dtype=jnp.int32), r"dtype must be a floating dtype"),
    ],
)
def test_config_rules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SessaConfig(**kwargs)


def test_odd_head_width_is_fine_without_rope():
    assert SessaConfig(d_model=12, n_heads=4, rope=False).head_dim == 3


def test_config_replace_and_from_dict_reject_unknown_keys():
    cfg = SessaConfig(d_model=16, n_heads=2)
    with pytest.raises(ValueError, match=r"no field\(s\) \['d_modle'\]"):
        cfg.replace(d_modle=8)
    with pytest.raises(ValueError, match=r"unknown SessaConfig key\(s\) \['heads'\]"):
        SessaConfig.from_dict({**cfg.to_dict(), "heads": 2})
    assert SessaConfig.from_dict(cfg.to_dict()) == cfg


def test_layer_input_rank_and_width():
    layer = SessaLayer(SessaConfig(d_model=16, n_heads=2))
    with pytest.raises(ValueError, match=r"\(batch, time, d_model=16\); got \(2, 5, 8\)"):
        layer.init(jax.random.PRNGKey(0), jnp.zeros((2, 5, 8)))
    with pytest.raises(ValueError, match=r"got \(5, 16\)"):
        layer.init(jax.random.PRNGKey(0), jnp.zeros((5, 16)))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(batch, time\) = \(2, 5\)"):
        layer.init(jax.random.PRNGKey(0), jnp.zeros((2, 5, 16)), jnp.zeros((2, 4), jnp.int32))


def test_lm_token_input():
    model = SessaLM(SessaConfig(d_model=16, n_heads=2, vocab_size=11))
    with pytest.raises(ValueError, match=r"integer tokens of shape \(batch, time\)"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((2, 5), jnp.float32))


def test_op_errors():
    x = jnp.zeros((2, 5, 8))
    g = jnp.zeros((2, 5))
    with pytest.raises(ValueError, match=r"unknown method 'fast'"):
        feedback_solve(x, x, g, x, method="fast")
    with pytest.raises(ValueError, match=r"gamma must have shape \(batch, time\) = \(2, 5\); got \(2, 4\)"):
        feedback_solve(x, x, g[:, :4], x)
    with pytest.raises(ValueError, match=r"k_b must have the shape of f"):
        feedback_solve(x, x[:, :4], g, x)
    with pytest.raises(ValueError, match=r"chunk_size must be 'auto' or an integer >= 1; got 0"):
        feedback_solve(x, x, g, x, chunk_size=0)
    with pytest.raises(ValueError, match=r"chunk_size must be 'auto' or an integer >= 1; got 'big'"):
        causal_attention(jnp.zeros((2, 5, 2, 2)), jnp.zeros((2, 5, 2, 2)), jnp.zeros((2, 5, 2, 2)), chunk_size="big")
    q = jnp.zeros((2, 5, 4, 2))
    with pytest.raises(ValueError, match=r"query heads 4 must be a multiple of kv heads 3"):
        causal_attention(q, jnp.zeros((2, 5, 3, 2)), jnp.zeros((2, 5, 3, 2)))


def test_retired_and_unknown_methods_name_the_choices():
    x = jnp.ones((1, 4, 8))
    with pytest.raises(ValueError, match=r"unknown method 'pallas'; choose one of \('dense', 'blocked', 'recursive'"):
        feedback_solve(x, x, jnp.zeros((1, 4)), x, method="pallas")
    with pytest.raises(ValueError, match=r"leaf_size must be 'auto' or an integer >= 1 \(e.g. 512\); got 0"):
        feedback_solve(x, x, jnp.zeros((1, 4)), x, leaf_size=0)
    with pytest.raises(ValueError, match=r"feedback precision 'fp16' is not one of"):
        feedback_solve(x, x, jnp.zeros((1, 4)), x, precision="fp16")
    # "auto" is the blocked scan on CPU and matches it.
    auto = feedback_solve(x, x, jnp.full((1, 4), 0.5), x, method="auto")
    blocked = feedback_solve(x, x, jnp.full((1, 4), 0.5), x, method="blocked")
    assert jnp.allclose(auto, blocked)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rope="false"), r"SessaConfig.rope must be a bool; got 'false'"),
        (dict(tie_embeddings="no"), r"SessaConfig.tie_embeddings must be a bool; got 'no'"),
        (dict(scan_layers=1), r"SessaConfig.scan_layers must be a bool; got 1"),
        (dict(remat=None), r"SessaConfig.remat must be a bool; got None"),
        (dict(ln_eps="1e-5"), r"SessaConfig.ln_eps must be a finite number > 0; got '1e-5'"),
        (dict(ln_eps=float("inf")), r"SessaConfig.ln_eps must be a finite number > 0; got inf"),
        (dict(rope_base=float("inf")), r"SessaConfig.rope_base must be a finite number > 0; got inf"),
        (dict(rope_base=None), r"SessaConfig.rope_base must be a finite number > 0; got None"),
    ],
)
def test_config_field_types(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SessaConfig(d_model=16, n_heads=2, **kwargs)


def test_config_numpy_scalars_are_numbers():
    import numpy as np

    assert SessaConfig(d_model=16, n_heads=2, gamma_max=np.float32(0.9)).gamma_max == np.float32(0.9)


def test_config_bad_dtype_name_and_preset_override():
    from sessa_jax.config import preset

    with pytest.raises(ValueError, match=r"SessaConfig.dtype='float33' is not a dtype"):
        SessaConfig.from_dict({**SessaConfig(d_model=16, n_heads=2).to_dict(), "dtype": "float33"})
    with pytest.raises(ValueError, match=r"no field\(s\) \['heads'\]"):
        preset("tiny", heads=2)


def test_layer_decode_without_a_cache():
    layer = SessaLayer(SessaConfig(d_model=16, n_heads=2))
    x = jnp.zeros((2, 1, 16))
    variables = layer.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"decode=True appends to a decode cache.*init_layer_cache"):
        layer.apply(variables, x, decode=True)
