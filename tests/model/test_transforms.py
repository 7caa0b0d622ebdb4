"""Modules under jit, vmap, nn.scan and nn.remat give identical numbers; pinned names."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sessa_jax import SessaConfig, SessaLayer, SessaLM

CFG = SessaConfig(d_model=16, n_heads=2, vocab_size=37, n_layers=3, chunk_size=4, tie_embeddings=False)


def _tokens():
    return jax.random.randint(jax.random.PRNGKey(3), (2, 11), 0, CFG.vocab_size)


def test_layer_jit_and_vmap_match_eager():
    layer = SessaLayer(CFG)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 11, 16))
    variables = layer.init(jax.random.PRNGKey(1), x[0])
    eager = jnp.stack([layer.apply(variables, xi) for xi in x])
    jitted = jnp.stack([jax.jit(layer.apply)(variables, xi) for xi in x])
    vmapped = jax.vmap(layer.apply, in_axes=(None, 0))(variables, x)
    # vmap batches the products differently, so float32 rounding differs: ~100 eps (the
    # layer itself is ~1e-6 from its float64 result here, eager and vmapped alike).
    tol = 100 * float(jnp.finfo(jnp.float32).eps)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(vmapped), np.asarray(eager), rtol=tol, atol=tol)


def _stack(params):
    layers = [params.pop(f"layers_{i}") for i in range(CFG.n_layers)]
    params["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return params


def test_scan_and_remat_match_plain_loop():
    tokens = _tokens()
    plain = SessaLM(CFG)
    params = jax.jit(plain.init)(jax.random.PRNGKey(0), tokens)  # op by op the init took seconds
    stacked = {"params": _stack(dict(params["params"]))}
    r = jax.random.normal(jax.random.PRNGKey(4), (2, 11, CFG.vocab_size))

    def value_and_grad(model, p):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply(p, tokens) * r)))(p)

    ref_val, ref_grad = value_and_grad(plain, params)
    for cfg, p in [
        (CFG.replace(remat=True), params),
        (CFG.replace(scan_layers=True), stacked),
        (CFG.replace(scan_layers=True, remat=True), stacked),
    ]:
        val, grad = value_and_grad(SessaLM(cfg), p)
        np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5)
        if cfg.scan_layers:
            grad = {"params": dict(grad["params"])}
            layers = grad["params"].pop("layers")
            for i in range(CFG.n_layers):
                grad["params"][f"layers_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], layers)
        for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
            # float32 reassociation under scan/remat: absolute error relative to the leaf's scale
            scale = max(1.0, float(np.max(np.abs(np.asarray(b)))))
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * scale)


def test_parameter_names_are_pinned():
    # names, shapes and dtypes only: traced, not run (op by op the init took seconds)
    params = jax.eval_shape(SessaLM(CFG.replace(n_layers=1)).init, jax.random.PRNGKey(0), _tokens())
    flat = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(params["params"]).items()}
    layer = {
        "ln/scale": (16,),
        "ln/bias": (16,),
        "W_in/kernel": (16, 32),
        "W_in/bias": (32,),
        "mixer/q_proj/kernel": (16, 16),
        "mixer/q_proj/bias": (16,),
        "mixer/k_proj/kernel": (16, 16),
        "mixer/k_proj/bias": (16,),
        "mixer/v_proj/kernel": (16, 16),
        "mixer/v_proj/bias": (16,),
        "mixer/out_proj/kernel": (16, 16),
        "mixer/proj_fb/kernel": (16, 32),
        "mixer/proj_fb/bias": (32,),
        "mixer/gamma_ctx/kernel": (16, 1),
        "mixer/gamma_bias": (),
        "W_out/kernel": (16, 16),
        "W_out/bias": (16,),
    }
    expected = {f"layers_0/{k}": v for k, v in layer.items()}
    expected.update({"embed/embedding": (37, 16), "norm_f/scale": (16,), "norm_f/bias": (16,), "head/kernel": (16, 37)})
    assert flat == expected
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))
