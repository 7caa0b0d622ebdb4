"""Golden runs of the published layer: load one, and run this layer on its weights and inputs.

A golden file (``reference_layer_*.npz``, float64) holds the published PyTorch layer's weights
under ``w/<torch name>``, its inputs ``x`` (layer input), ``bar_a`` (mixer input) and ``r``
(the cotangent of the loss ``sum(y * r)``), and what that layer computed from them: ``y``,
``s``, ``loss``, ``y_prefill_decode``, ``grad/x`` and ``grad/w/<torch name>``; ``config_json``
names its shapes and options (``D``, ``n_heads``, ``n_kv_heads``, ``rope``, ``gamma_max``,
``ln_eps``, ``prefill``). The tests and ``benchmarks.parity`` measure this layer against them.
"""

from __future__ import annotations

import json
import os

import numpy as np

from sessa_jax.config import SessaConfig


def load_golden(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta): every array of the golden file at ``path``, and its parsed ``config_json``."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(str(arrays["config_json"]))


def golden_config(meta: dict, *, solver: str, dtype, chunk_size: int = 8) -> SessaConfig:
    """The ``SessaConfig`` of a golden run's layer, computing in ``dtype`` with ``solver``;
    ``chunk_size`` sets both the blocked chunk and the recursive leaf."""
    return SessaConfig(
        d_model=meta["D"],
        n_heads=meta["n_heads"],
        n_kv_heads=meta["n_kv_heads"],
        rope=meta["rope"],
        gamma_max=meta["gamma_max"],
        ln_eps=meta["ln_eps"],
        solver=solver,
        chunk_size=chunk_size,
        leaf_size=chunk_size,
        dtype=dtype,
        param_dtype=dtype,
    )


def golden_state_dict(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The published layer's weights, keyed by their torch names."""
    return {k[len("w/") :]: v for k, v in arrays.items() if k.startswith("w/")}


def golden_variables(arrays: dict[str, np.ndarray], config: SessaConfig):
    """Flax variables of ``SessaLayer(config)`` holding the golden run's weights, in ``config.param_dtype``."""
    import jax.numpy as jnp

    from sessa_jax.convert import layer_params_from_torch

    return layer_params_from_torch(golden_state_dict(arrays), config, dtype=jnp.dtype(config.param_dtype))


def run_golden(arrays: dict[str, np.ndarray], meta: dict, solver: str, precision: str) -> dict:
    """This layer on one golden run's weights and inputs, with ``solver`` in ``precision``.

    Args:
      arrays, meta: ``load_golden``'s result.
      solver: ``SessaConfig.solver`` ("dense", "blocked", "recursive", ...).
      precision: "float32" or "float64" (run under x64); params and compute both in it.

    Returns:
      numpy arrays in ``precision``: ``y`` (B, T, D), the mixer's ``s`` on ``bar_a``, the scalar
      ``loss`` = sum(y * r), ``grad_x`` (B, T, D), ``grad_w`` {torch name: gradient}, and
      ``y_decode`` (B, T, D): the first ``meta["prefill"]`` positions by prefill, the rest one
      token at a time from the cache.
    """
    import jax
    import jax.numpy as jnp

    from sessa_jax.convert import layer_params_to_torch
    from sessa_jax.decoding import init_layer_cache
    from sessa_jax.layer import SessaLayer
    from sessa_jax.mixer import SessaMixer

    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        config = golden_config(meta, solver=solver, dtype=dtype)
        layer = SessaLayer(config)
        variables = golden_variables(arrays, config)
        x, r = (jnp.asarray(arrays[k], dtype) for k in ("x", "r"))
        s = jax.jit(SessaMixer(config).apply)(
            {"params": variables["params"]["mixer"]}, jnp.asarray(arrays["bar_a"], dtype)
        )

        def loss(v, x):
            y = layer.apply(v, x)
            return jnp.sum(y * r), y

        (loss_value, y), (g_vars, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables, x)
        prefill = meta["prefill"]
        cache = init_layer_cache(config, x.shape[0], max_len=x.shape[1])
        y_pre, cache = jax.jit(lambda v, xp, c: layer.apply(v, xp, cache=c))(variables, x[:, :prefill], cache)
        step = jax.jit(lambda v, xt, c: layer.apply(v, xt, cache=c, decode=True))
        outs = [y_pre]
        for t in range(prefill, x.shape[1]):
            y_t, cache = step(variables, x[:, t : t + 1], cache)
            outs.append(y_t)
        grad_w = layer_params_to_torch(g_vars, config, include_buffers=False, as_torch=False)
        return jax.tree_util.tree_map(
            np.asarray,
            dict(y=y, s=s, loss=loss_value, grad_x=g_x, grad_w=grad_w, y_decode=jnp.concatenate(outs, axis=1)),
        )


def relative_error(actual, expected, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor), in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), floor))


def golden_errors(arrays: dict[str, np.ndarray], result: dict) -> tuple[float, float]:
    """(worst output error, worst gradient error) of ``run_golden``'s ``result`` against its golden run.

    Some weight gradients are exactly zero in exact arithmetic (without RoPE a key bias shifts
    every logit of a row equally), so each weight gradient's error is relative to at least
    1e-3 x the largest weight gradient.
    """
    out = max(
        relative_error(result["y"], arrays["y"]),
        relative_error(result["s"], arrays["s"]),
        relative_error(result["loss"], arrays["loss"]),
        relative_error(result["y_decode"], arrays["y_prefill_decode"]),
    )
    largest = max(float(np.max(np.abs(arrays[f"grad/w/{k}"]))) for k in result["grad_w"])
    grads = [relative_error(v, arrays[f"grad/w/{k}"], floor=1e-3 * largest) for k, v in result["grad_w"].items()]
    return out, max(relative_error(result["grad_x"], arrays["grad/x"]), *grads)
