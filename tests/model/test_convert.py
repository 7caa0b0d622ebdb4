"""LM-level PyTorch-name conversion: round trips and agreement between layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax import SessaConfig, SessaLM
from sessa_jax.convert import lm_params_from_torch, lm_params_to_torch

BASE = SessaConfig(d_model=16, n_heads=2, vocab_size=23, n_layers=2, chunk_size=4)
TOKENS = jnp.arange(14, dtype=jnp.int32).reshape(2, 7) % 23


@pytest.mark.parametrize("tie", [True, False])
def test_lm_round_trip_and_scan_layout(tie):
    cfg = BASE.replace(tie_embeddings=tie)
    params = jax.jit(SessaLM(cfg).init)(jax.random.PRNGKey(0), TOKENS)  # op by op it took seconds
    sd = lm_params_to_torch(params, cfg)
    assert "head.weight" in sd  # a tied PyTorch LM lists its shared matrix under both names
    assert np.array_equal(sd["head.weight"], sd["embed.weight"]) == tie
    assert "layers.1.mixer.proj_fb.weight" in sd and sd["embed.weight"].shape == (23, 16)
    back = lm_params_to_torch(lm_params_from_torch(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    # The same state dict loaded into the nn.scan layout gives the same logits.
    scan_cfg = cfg.replace(scan_layers=True)
    scanned = lm_params_from_torch(sd, scan_cfg)
    assert scanned["params"]["layers"]["W_in"]["kernel"].shape == (2, 16, 32)
    np.testing.assert_allclose(
        np.asarray(jax.jit(SessaLM(scan_cfg).apply)(scanned, TOKENS)),
        np.asarray(jax.jit(SessaLM(cfg).apply)(params, TOKENS)),
        rtol=1e-5,
        atol=1e-5,
    )
    for k, v in lm_params_to_torch(scanned, scan_cfg).items():
        np.testing.assert_array_equal(v, sd[k])


def test_lm_state_dict_errors():
    params = jax.jit(SessaLM(BASE).init)(jax.random.PRNGKey(0), TOKENS)
    sd = lm_params_to_torch(params, BASE)
    extra = dict(sd, **{"layers.2.ln.weight": sd["layers.0.ln.weight"]})
    with pytest.raises(KeyError, match=r"layers beyond n_layers=2"):
        lm_params_from_torch(extra, BASE)
    missing = {k: v for k, v in sd.items() if k != "layers.1.W_out.bias"}
    with pytest.raises(KeyError, match=r"layers.1.W_out.bias"):
        lm_params_from_torch(missing, BASE)


def test_lm_state_dict_entries_outside_the_layers_are_checked():
    params = jax.jit(SessaLM(BASE).init)(jax.random.PRNGKey(0), TOKENS)
    sd = lm_params_to_torch(params, BASE)
    # An untied head loaded into a tied config would be dropped silently.
    head = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (23, 16)))
    with pytest.raises(KeyError, match=r"head.weight.*tie_embeddings=False"):
        lm_params_from_torch(dict(sd, **{"head.weight": head}), BASE)
    # A tied PyTorch model lists the shared matrix under both names: that loads.
    tied = lm_params_from_torch(dict(sd, **{"head.weight": sd["embed.weight"]}), BASE)
    np.testing.assert_array_equal(tied["params"]["embed"]["embedding"], sd["embed.weight"])
    with pytest.raises(KeyError, match=r"unexpected entries \['norm_f.wieght'\]"):
        lm_params_from_torch(dict(sd, **{"norm_f.wieght": sd["norm_f.weight"]}), BASE)
    with pytest.raises(KeyError, match=r"unexpected entries \['layers.x.ln.weight'\]"):
        lm_params_from_torch(dict(sd, **{"layers.x.ln.weight": sd["layers.0.ln.weight"]}), BASE)
    with pytest.raises(ValueError, match=r"embed.weight has shape \(24, 16\); expected \(23, 16\)"):
        lm_params_from_torch(dict(sd, **{"embed.weight": np.zeros((24, 16), np.float32)}), BASE)
    with pytest.raises(KeyError, match=r"lacks \['norm_f.bias'\]"):
        lm_params_from_torch({k: v for k, v in sd.items() if k != "norm_f.bias"}, BASE)
    untied = BASE.replace(tie_embeddings=False)
    with pytest.raises(ValueError, match=r"head.weight has shape \(16, 23\); expected \(23, 16\)"):
        lm_params_from_torch(dict(sd, **{"head.weight": head.T}), untied)
