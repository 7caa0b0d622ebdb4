"""Conversion between the published PyTorch state-dict layout and Flax variables.

PyTorch ``nn.Linear.weight`` is (out, in); a Flax ``Dense`` kernel is its transpose.
Layer names follow SPEC section 4 (``ln.weight``, ``W_in.weight``, ``mixer.q_proj.weight``,
...). The LM-level layout adds ``embed.weight`` (V, D), ``layers.{i}.<layer name>``,
``norm_f.weight``/``norm_f.bias`` and, when embeddings are untied, ``head.weight`` (V, D).
Only numpy is needed; ``load_torch_state_dict`` imports torch lazily for ``.pt`` files.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sessa_jax.config import SessaConfig

# (torch name, flax path inside a layer's params, transpose?)
_LINEARS = ("W_in", "W_out", "mixer.q_proj", "mixer.k_proj", "mixer.v_proj", "mixer.proj_fb")


def _layer_table(cfg: SessaConfig):
    table = [("ln.weight", ("ln", "scale"), False), ("ln.bias", ("ln", "bias"), False)]
    for lin in _LINEARS:
        path = tuple(lin.split("."))
        table.append((f"{lin}.weight", path + ("kernel",), True))
        table.append((f"{lin}.bias", path + ("bias",), False))
    if cfg.n_heads > 1:
        table.append(("mixer.out_proj.weight", ("mixer", "out_proj", "kernel"), True))
    table.append(("mixer.gamma_bias", ("mixer", "gamma_bias"), False))
    table.append(("mixer.gamma_ctx.weight", ("mixer", "gamma_ctx", "kernel"), True))
    return table


_BUFFERS = ("mixer.rope_inv_freq", "mixer.causal_mask_f_full", "mixer.causal_mask_fb_full")


def _expected_shape(cfg: SessaConfig, name: str) -> tuple:
    d, hd, kvd = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    shapes = {
        "ln.weight": (d,), "ln.bias": (d,),
        "W_in.weight": (2 * d, d), "W_in.bias": (2 * d,),
        "W_out.weight": (d, d), "W_out.bias": (d,),
        "mixer.q_proj.weight": (hd, d), "mixer.q_proj.bias": (hd,),
        "mixer.k_proj.weight": (kvd, d), "mixer.k_proj.bias": (kvd,),
        "mixer.v_proj.weight": (kvd, d), "mixer.v_proj.bias": (kvd,),
        "mixer.proj_fb.weight": (2 * d, d), "mixer.proj_fb.bias": (2 * d,),
        "mixer.out_proj.weight": (d, d),
        "mixer.gamma_bias": (), "mixer.gamma_ctx.weight": (1, d),
    }
    return shapes[name]


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _layer_params(state_dict: Mapping, cfg: SessaConfig, prefix: str, dtype) -> dict:
    table = _layer_table(cfg)
    expected = {name for name, _, _ in table}
    present = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
    missing = sorted(expected - present)
    if missing:
        raise KeyError(f"state dict lacks {[prefix + m for m in missing]} for {cfg}")
    extra = sorted(n for n in present - expected if n not in _BUFFERS)
    if extra:
        raise KeyError(f"state dict has unexpected entries {[prefix + e for e in extra]} "
                       f"(n_heads={cfg.n_heads}: out_proj exists only when n_heads > 1)")
    params: dict = {}
    for name, path, transpose in table:
        value = np.asarray(state_dict[prefix + name])
        if value.shape != _expected_shape(cfg, name):
            raise ValueError(f"{prefix + name} has shape {value.shape}; expected {_expected_shape(cfg, name)} "
                             f"for d_model={cfg.d_model}, n_heads={cfg.n_heads}, n_kv_heads={cfg.kv_heads}")
        value = value.T if transpose else value
        _set(params, path, value.astype(dtype) if dtype is not None else value)
    return params


def layer_params_from_torch(state_dict: Mapping, cfg: SessaConfig, dtype=None) -> dict:
    """Maps a SessaLayer state dict (reference names -> arrays) to ``{'params': ...}``.

    The result is accepted by ``SessaLayer(cfg).apply``. ``dtype`` casts every array
    (default: keep the input dtype); buffers (rope_inv_freq, causal masks) are ignored.
    """
    return {"params": _layer_params(state_dict, cfg, "", dtype)}


def _layer_to_torch(params: Mapping, cfg: SessaConfig, prefix: str) -> dict:
    out = {}
    for name, path, transpose in _layer_table(cfg):
        value = np.asarray(_get(params, path))
        out[prefix + name] = value.T if transpose else value
    return out


def layer_params_to_torch(variables: Mapping, cfg: SessaConfig) -> dict:
    """Inverse of ``layer_params_from_torch``: reference names -> numpy arrays."""
    return _layer_to_torch(variables["params"], cfg, "")


def lm_params_from_torch(state_dict: Mapping, cfg: SessaConfig, dtype=None) -> dict:
    """Maps an LM state dict (module docstring layout) to ``SessaLM(cfg)`` variables.

    Honours ``cfg.scan_layers`` (layer params stacked on a leading axis under 'layers')
    and ``cfg.tie_embeddings`` (``head.weight`` required only when untied).
    """
    cast = (lambda a: np.asarray(a).astype(dtype)) if dtype is not None else np.asarray
    layers = [_layer_params(state_dict, cfg, f"layers.{i}.", dtype) for i in range(cfg.n_layers)]
    extra = sorted(k for k in state_dict if k.startswith("layers.") and k.split(".")[1].isdigit()
                   and int(k.split(".")[1]) >= cfg.n_layers)
    if extra:
        raise KeyError(f"state dict has layers beyond n_layers={cfg.n_layers}: {extra[:3]}...")
    shapes = {"embed.weight": (cfg.vocab_size, cfg.d_model), "norm_f.weight": (cfg.d_model,),
              "norm_f.bias": (cfg.d_model,)}
    if not cfg.tie_embeddings:
        shapes["head.weight"] = (cfg.vocab_size, cfg.d_model)
    missing = sorted(set(shapes) - set(state_dict))
    if missing:
        raise KeyError(f"state dict lacks {missing} (vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, "
                       f"tie_embeddings={cfg.tie_embeddings})")
    layer_key = lambda k: k.startswith("layers.") and k.split(".")[1].isdigit()  # noqa: E731
    unknown = sorted(k for k in state_dict if k not in shapes and k != "head.weight" and not layer_key(k))
    if unknown:
        raise KeyError(f"state dict has unexpected entries {unknown}; an LM state dict holds embed.weight, "
                       f"norm_f.weight, norm_f.bias, head.weight (untied only) and layers.<i>.<layer name>")
    if cfg.tie_embeddings and "head.weight" in state_dict:
        # A tied PyTorch model lists the shared matrix under both names; anything else is an untied head.
        if not np.array_equal(np.asarray(state_dict["head.weight"]), np.asarray(state_dict["embed.weight"])):
            raise KeyError("state dict has a head.weight that differs from embed.weight, but the config has "
                           "tie_embeddings=True and would drop it; load it with tie_embeddings=False")
    for name, shape in shapes.items():
        if np.shape(state_dict[name]) != shape:
            raise ValueError(f"{name} has shape {np.shape(state_dict[name])}; expected {shape} for "
                             f"vocab_size={cfg.vocab_size}, d_model={cfg.d_model}")
    params: dict = {
        "embed": {"embedding": cast(state_dict["embed.weight"])},
        "norm_f": {"scale": cast(state_dict["norm_f.weight"]), "bias": cast(state_dict["norm_f.bias"])},
    }
    if not cfg.tie_embeddings:
        params["head"] = {"kernel": cast(state_dict["head.weight"]).T}
    if cfg.scan_layers:
        import jax

        params["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)
    else:
        for i, p in enumerate(layers):
            params[f"layers_{i}"] = p
    return {"params": params}


def lm_params_to_torch(variables: Mapping, cfg: SessaConfig) -> dict:
    """Inverse of ``lm_params_from_torch``."""
    params = variables["params"]
    out = {
        "embed.weight": np.asarray(params["embed"]["embedding"]),
        "norm_f.weight": np.asarray(params["norm_f"]["scale"]),
        "norm_f.bias": np.asarray(params["norm_f"]["bias"]),
    }
    if not cfg.tie_embeddings:
        out["head.weight"] = np.asarray(params["head"]["kernel"]).T
    for i in range(cfg.n_layers):
        if cfg.scan_layers:
            import jax

            layer = jax.tree_util.tree_map(lambda a, i=i: np.asarray(a)[i], params["layers"])
        else:
            layer = params[f"layers_{i}"]
        out.update(_layer_to_torch(layer, cfg, f"layers.{i}."))
    return out


def load_torch_state_dict(path: str) -> dict:
    """Reads a ``.pt`` state dict into numpy arrays (needs the optional ``torch`` extra)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading .pt files needs PyTorch: pip install 'sessa-jax[torch]'") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}
