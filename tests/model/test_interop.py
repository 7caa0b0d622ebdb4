"""PyTorch interop: strict state-dict loading both ways against the published layer.

The numpy-side tests always run. The torch-side tests need torch and the published code
(LibratioAI/sessa, found at $SESSA_REFERENCE_DIR or ../shared/reference next to the
checkout); they skip otherwise. ``make test-interop`` installs torch and runs this file.
"""

import functools
import importlib.util
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax import SessaConfig, SessaLayer, SessaLM
from sessa_jax.convert import (
    PublishedStateDict,
    layer_params_from_torch,
    layer_params_to_torch,
    lm_params_from_torch,
    lm_params_to_torch,
    load_torch_state_dict,
    rope_inv_freq,
)

X = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 16))
BASE = SessaConfig(d_model=16, n_heads=2, chunk_size=4)


@functools.lru_cache(maxsize=None)
def _variables(cfg):  # read-only use: cached, and compiled (op by op the init took seconds)
    return jax.jit(SessaLayer(cfg).init)(jax.random.PRNGKey(0), X)


def _reference_dir():
    here = pathlib.Path(__file__).resolve().parents[2]
    candidates = [os.environ.get("SESSA_REFERENCE_DIR", "")] + [str(p / "shared" / "reference") for p in here.parents]
    for c in candidates:
        if c and (pathlib.Path(c) / "sessa" / "layer.py").is_file():
            return c
    return None


def _published():
    """The published package ``sessa`` loaded by path (never copied into the project)."""
    torch = pytest.importorskip("torch", reason="interop with the published layer needs torch (`make test-interop`)")
    ref = _reference_dir()
    if ref is None:
        pytest.skip("the published PyTorch code is not available (set SESSA_REFERENCE_DIR)")
    if "sessa" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "sessa", os.path.join(ref, "sessa", "__init__.py"), submodule_search_locations=[os.path.join(ref, "sessa")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["sessa"] = module
        spec.loader.exec_module(module)
    return torch, sys.modules["sessa"]


# ---- numpy side (no torch needed) ----


@pytest.mark.parametrize("rope, max_len", [(True, None), (False, None), (True, 8)])
def test_layer_state_dict_has_the_published_keys_as_writable_arrays(rope, max_len):
    cfg = BASE.replace(rope=rope)
    sd = layer_params_to_torch(_variables(cfg), cfg, max_len=max_len, as_torch=False)
    assert ("mixer.rope_inv_freq" in sd) == rope
    assert ("mixer.causal_mask_f_full" in sd) == (max_len is not None)
    assert all(v.flags.writeable and v.flags.c_contiguous for v in sd.values())
    if rope:  # head width 8: base^(-2i/8), i < 4
        np.testing.assert_allclose(sd["mixer.rope_inv_freq"], 10000.0 ** (-np.arange(4) / 4), rtol=1e-6)
    if max_len:
        assert sd["mixer.causal_mask_f_full"].dtype == bool and not sd["mixer.causal_mask_f_full"][3, 3]
        assert sd["mixer.causal_mask_fb_full"][3, 3] and not sd["mixer.causal_mask_fb_full"][3, 2]
    back = layer_params_from_torch(sd, cfg)  # buffers consistent with cfg: loads
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(_variables(cfg))):
        np.testing.assert_array_equal(a, b)


def test_loaders_reject_buffers_that_contradict_the_config():
    four = BASE.replace(n_heads=4)
    sd = layer_params_to_torch(_variables(four), four, as_torch=False)
    with pytest.raises(ValueError, match=r"head width is 4, i.e. n_heads=4; the config has n_heads=2"):
        layer_params_from_torch(sd, BASE)
    no_rope = BASE.replace(rope=False)
    with pytest.raises(ValueError, match=r"comes from a layer with RoPE, but the config has rope=False"):
        layer_params_from_torch(layer_params_to_torch(_variables(BASE), BASE, as_torch=False), no_rope)
    # a layer without RoPE built with max_len: its masks are there and rope_inv_freq is not
    sd = layer_params_to_torch(_variables(no_rope), no_rope, max_len=8, as_torch=False)
    with pytest.raises(ValueError, match=r"no mixer.rope_inv_freq: .* config has rope=True; set rope=False"):
        layer_params_from_torch(sd, BASE)
    other_base = layer_params_to_torch(_variables(BASE), BASE.replace(rope_base=500.0), as_torch=False)
    with pytest.raises(ValueError, match=r"does not match rope_base=10000"):
        layer_params_from_torch(other_base, BASE)
    sd = layer_params_to_torch(_variables(BASE), BASE, max_len=8, as_torch=False)
    sd["mixer.causal_mask_fb_full"] = sd["mixer.causal_mask_f_full"]
    with pytest.raises(ValueError, match=r"causal_mask_fb_full .* is not the published layer's causal mask"):
        layer_params_from_torch(sd, BASE)


def test_lm_state_dict_carries_per_layer_buffers():
    cfg = SessaConfig(d_model=16, n_heads=2, vocab_size=23, n_layers=2, chunk_size=4)
    tokens = jnp.arange(14, dtype=jnp.int32).reshape(2, 7) % 23
    params = jax.jit(SessaLM(cfg).init)(jax.random.PRNGKey(0), tokens)
    sd = lm_params_to_torch(params, cfg, as_torch=False)
    np.testing.assert_array_equal(sd["head.weight"], sd["embed.weight"])  # tied: the embedding under both names
    np.testing.assert_array_equal(sd["layers.1.mixer.rope_inv_freq"], rope_inv_freq(cfg))
    with pytest.raises(ValueError, match=r"layers.0.mixer.rope_inv_freq .* n_heads=2; the config has n_heads=4"):
        lm_params_from_torch(sd, cfg.replace(n_heads=4))


LM = SessaConfig(d_model=16, n_heads=2, vocab_size=23, n_layers=2, chunk_size=4)


@functools.lru_cache(maxsize=None)
def _lm_variables(cfg):
    tokens = jnp.arange(14, dtype=jnp.int32).reshape(2, 7) % cfg.vocab_size
    return jax.jit(SessaLM(cfg).init)(jax.random.PRNGKey(0), tokens)  # compiled, as _variables


def _lm_state_dict(cfg=LM, **kw):
    return lm_params_to_torch(_lm_variables(cfg), cfg, as_torch=False, **kw)


@pytest.mark.parametrize("wrapper, who", [("module.", "DistributedDataParallel"), ("_orig_mod.", "torch.compile")])
def test_a_wrapper_prefix_is_named_not_taken_for_a_missing_buffer(wrapper, who):
    # PublishedStateDict: as read from a .pt file, so its buffers count as complete
    layer = PublishedStateDict(
        {wrapper + k: v for k, v in layer_params_to_torch(_variables(BASE), BASE, as_torch=False).items()}
    )
    with pytest.raises(KeyError, match=rf"starts with '{wrapper}' \(added by [^)]*{who}[^)]*\).*removeprefix"):
        layer_params_from_torch(layer, BASE)
    lm = PublishedStateDict({wrapper + k: v for k, v in _lm_state_dict().items()})
    with pytest.raises(KeyError, match=rf"starts with '{wrapper}'"):
        lm_params_from_torch(lm, LM)


def test_an_lm_state_dict_given_as_a_layer_is_named_and_the_reverse():
    lm = PublishedStateDict(_lm_state_dict())
    with pytest.raises(KeyError, match=r"this is an LM state dict .*lm_params_from_torch"):
        layer_params_from_torch(lm, BASE)
    layer = PublishedStateDict(layer_params_to_torch(_variables(BASE), BASE, as_torch=False))
    with pytest.raises(KeyError, match=r"one SessaLayer's state dict .*layer_params_from_torch"):
        lm_params_from_torch(layer, LM)


def test_a_d_model_mismatch_is_named_as_d_model():
    sd = PublishedStateDict(layer_params_to_torch(_variables(BASE), BASE, as_torch=False))  # d_model 16
    with pytest.raises(
        ValueError,
        match=r"ln.weight has shape \(16,\): the saved layer has d_model=16, the config "
        r"d_model=32; set d_model=16",
    ) as e:
        layer_params_from_torch(sd, BASE.replace(d_model=32))  # head width 16: rope_inv_freq would say n_heads
    assert "n_heads" not in str(e.value)
    with pytest.raises(ValueError, match=r"embed.weight has shape \(23, 16\): .*set d_model=16"):
        lm_params_from_torch(PublishedStateDict(_lm_state_dict()), LM.replace(d_model=32))


def test_integer_weights_are_refused():
    sd = layer_params_to_torch(_variables(BASE), BASE, as_torch=False)
    as_int = {k: (v * 100).astype(np.int32) if v.dtype == np.float32 else v for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"has dtype int32; weights must be floating point"):
        layer_params_from_torch(as_int, BASE)
    lm = _lm_state_dict()
    with pytest.raises(ValueError, match=r"embed.weight has dtype int32"):
        lm_params_from_torch(dict(lm, **{"embed.weight": lm["embed.weight"].astype(np.int32)}), LM)
    import ml_dtypes

    bf16 = {k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v for k, v in sd.items()}
    assert layer_params_from_torch(bf16, BASE)["params"]["W_in"]["kernel"].dtype.name == "bfloat16"


def _published_lm_keys(layer_keys, cfg):
    """The state-dict keys of a PyTorch LM built the usual way around the published layer: an
    nn.Embedding ``embed``, an nn.ModuleList ``layers``, a LayerNorm ``norm_f`` and a bias-free
    Linear ``head`` (whose weight is the embedding's when tied: state_dict lists it under both names)."""
    return {"embed.weight", "norm_f.weight", "norm_f.bias", "head.weight"} | {
        f"layers.{i}.{k}" for i in range(cfg.n_layers) for k in layer_keys
    }


@pytest.mark.parametrize("tie", [True, False])
def test_lm_state_dict_keys_are_a_torch_lm_s_tied_or_not(tie):
    cfg = LM.replace(tie_embeddings=tie)
    sd = _lm_state_dict(cfg)
    layer_keys = layer_params_to_torch(_variables(BASE), BASE, as_torch=False)
    assert set(sd) == _published_lm_keys(layer_keys, cfg)
    assert np.array_equal(sd["head.weight"], sd["embed.weight"]) == tie
    back = lm_params_from_torch(sd, cfg)  # and it loads back, the tied head as the embedding
    assert ("head" in back["params"]) == (not tie)


def test_to_torch_names_max_len_when_the_target_has_mask_buffers():
    built_with_masks = layer_params_to_torch(_variables(BASE), BASE, max_len=8, as_torch=False)
    with pytest.raises(
        ValueError,
        match=r"built with max_len=8\); layer_params_to_torch needs max_len to produce "
        r"them: pass max_len=8",
    ):
        layer_params_to_torch(_variables(BASE), BASE, as_torch=False, target=built_with_masks)
    with pytest.raises(ValueError, match=r"needs max_len to produce them: pass max_len=<the max_len"):
        layer_params_to_torch(_variables(BASE), BASE, as_torch=False, target=list(built_with_masks))
    sd = layer_params_to_torch(_variables(BASE), BASE, max_len=8, as_torch=False, target=built_with_masks)
    assert set(sd) == set(built_with_masks)
    lm_masks = _lm_state_dict(max_len=8)
    with pytest.raises(ValueError, match=r"lm_params_to_torch needs max_len to produce them: pass max_len=8"):
        _lm_state_dict(target=lm_masks)
    with pytest.raises(ValueError, match=r"include_buffers=True produces"):
        layer_params_to_torch(_variables(BASE), BASE, include_buffers=False, max_len=8)


# ---- torch side ----


def _published_layer(torch, sessa, cfg, max_len=None):
    torch.manual_seed(0)
    return sessa.SessaLayer(
        cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        max_len=max_len,
        use_forward_rope=cfg.rope,
        gamma_max=cfg.gamma_max,
        ln_eps=cfg.ln_eps,
    ).double()


@pytest.mark.parametrize("rope, max_len", [(True, None), (False, None), (True, 8), (False, 8)])
def test_strict_load_into_the_published_layer_and_back(rope, max_len):
    torch, sessa = _published()
    cfg = BASE.replace(rope=rope)
    variables = _variables(cfg)
    layer = _published_layer(torch, sessa, cfg, max_len)
    sd = layer_params_to_torch(variables, cfg, max_len=max_len)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert set(sd) == set(layer.state_dict())
    layer.load_state_dict(sd, strict=True)
    with torch.no_grad():
        y_torch = layer(torch.from_numpy(np.asarray(X, np.float64))).numpy()
    y_jax = np.asarray(jax.jit(SessaLayer(cfg).apply)(variables, X))
    np.testing.assert_allclose(y_jax, y_torch, rtol=1e-4, atol=1e-4)  # float32 JAX vs float64 torch
    # and back: the published layer's own state dict loads, buffers checked
    back = layer_params_from_torch(layer.state_dict(), cfg, dtype=np.float32)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_published_state_dicts_with_the_wrong_heads_or_rope_are_refused():
    torch, sessa = _published()
    four = _published_layer(torch, sessa, BASE.replace(n_heads=4))
    with pytest.raises(ValueError, match=r"n_heads=4; the config has n_heads=2"):
        layer_params_from_torch(four.state_dict(), BASE)
    plain = _published_layer(torch, sessa, BASE.replace(rope=False))  # no buffers at all
    with pytest.raises(ValueError, match=r"without RoPE, but the config has rope=True"):
        layer_params_from_torch(plain.state_dict(), BASE)


def test_a_bfloat16_pt_file_loads(tmp_path):
    torch, sessa = _published()
    layer = _published_layer(torch, sessa, BASE).to(torch.bfloat16)
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    sd = load_torch_state_dict(str(path))
    assert sd["W_in.weight"].dtype.name == "bfloat16"
    params = layer_params_from_torch(sd, BASE, dtype=np.float32)
    np.testing.assert_array_equal(params["params"]["W_in"]["kernel"], layer.W_in.weight.detach().float().numpy().T)
    plain = _published_layer(torch, sessa, BASE.replace(rope=False))
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"without RoPE"):  # a .pt file holds every buffer its layer had
        layer_params_from_torch(load_torch_state_dict(str(tmp_path / "plain.pt")), BASE)


def test_strict_load_into_a_tied_torch_lm_around_the_published_layer():
    torch, sessa = _published()
    cfg = LM

    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.layers = torch.nn.ModuleList(
                _published_layer(torch, sessa, cfg, max_len=8) for _ in range(cfg.n_layers)
            )
            self.norm_f = torch.nn.LayerNorm(cfg.d_model)
            self.head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            self.head.weight = self.embed.weight  # tied

    lm = TiedLM().double()
    assert set(lm.state_dict()) == _published_lm_keys(_published_layer(torch, sessa, cfg, 8).state_dict(), cfg)
    with pytest.raises(ValueError, match=r"pass max_len=8"):
        _lm_state_dict(target=lm)
    sd = _lm_state_dict(max_len=8, target=lm)
    lm.load_state_dict(
        {k: torch.from_numpy(np.asarray(v, np.float64) if v.dtype != bool else v) for k, v in sd.items()}, strict=True
    )
    np.testing.assert_array_equal(lm.head.weight.detach().numpy(), sd["embed.weight"].astype(np.float64))
