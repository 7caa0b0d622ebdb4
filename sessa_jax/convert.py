"""Conversion between the published PyTorch state-dict layout and Flax variables.

PyTorch ``nn.Linear.weight`` is (out, in); a Flax ``Dense`` kernel is its transpose.
Layer names are the published layer's (``ln.weight``, ``W_in.weight``, ``mixer.q_proj.weight``,
...). The LM-level layout adds ``embed.weight`` (V, D), ``layers.{i}.<layer name>``,
``norm_f.weight``/``norm_f.bias`` and ``head.weight`` (V, D): for tied embeddings it is the
embedding matrix again, as in a PyTorch LM whose head shares its embedding's weight.
Only numpy is needed; ``load_torch_state_dict`` imports torch lazily for ``.pt`` files.

Interop target: the published ``SessaLayer`` (LibratioAI/sessa). ``layer_params_to_torch``
emits exactly its ``state_dict()`` keys, buffers included (``mixer.rope_inv_freq`` when
RoPE is on; ``mixer.causal_mask_f_full``/``causal_mask_fb_full`` when it was built with
``max_len``), so ``load_state_dict(strict=True)`` succeeds. The loaders check the buffers
against the config: ``rope_inv_freq`` reveals RoPE and the head width (hence n_heads),
which the weight shapes alone do not.
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


class PublishedStateDict(dict):
    """A state dict read from PyTorch (``load_torch_state_dict``): its buffers are complete, so a
    missing ``mixer.rope_inv_freq`` means the layer had no RoPE."""


def _to_numpy(value) -> np.ndarray:
    """numpy view of a numpy array or (CPU/GPU, any dtype incl. bfloat16) torch tensor."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import ml_dtypes

            return value.view(_torch().int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def _torch():
    import torch

    return torch


def rope_inv_freq(cfg: SessaConfig) -> np.ndarray:
    """The published layer's ``mixer.rope_inv_freq`` buffer: base^(-2i/head_dim), i < head_dim/2 (float32)."""
    half = cfg.head_dim // 2
    return (np.float32(cfg.rope_base) ** (-2 * np.arange(half, dtype=np.float32) / np.float32(cfg.head_dim))).astype(
        np.float32
    )


def _buffers(cfg: SessaConfig, max_len: int | None) -> dict:
    out = {}
    if cfg.rope:
        out["mixer.rope_inv_freq"] = rope_inv_freq(cfg)
    if max_len is not None:
        base = np.ones((max_len, max_len), dtype=bool)
        out["mixer.causal_mask_f_full"] = np.triu(base, 1)  # True = masked: the forward branch sees the diagonal
        out["mixer.causal_mask_fb_full"] = np.triu(base, 0)  # the feedback branch sees the strict past
    return out


def _check_buffers(state_dict: Mapping, cfg: SessaConfig, prefix: str, complete: bool) -> None:
    """ValueError naming the mismatch between the buffers of ``state_dict`` and ``cfg``.

    ``complete``: the dict holds every buffer its layer registered, so a missing
    ``rope_inv_freq`` means rope=False (a weights-only dict may omit buffers).
    """
    name = prefix + "mixer.rope_inv_freq"
    if name in state_dict:
        saved = _to_numpy(state_dict[name])
        inv = saved.astype(np.float64)
        # the buffer is rounded to the dtype it was saved in (e.g. a bfloat16 .pt): compare to that precision
        tol = (
            2.0**-7
            if saved.dtype.name == "bfloat16"
            else 2 * float(np.finfo(np.float16).eps)
            if saved.dtype == np.float16
            else 1e-4
        )
        if not cfg.rope:
            raise ValueError(
                f"{name} is present: the state dict comes from a layer with RoPE, but the config has "
                f"rope=False; set rope=True"
            )
        if inv.shape != (cfg.head_dim // 2,):
            width = 2 * inv.shape[0] if inv.ndim == 1 else None
            heads = f"n_heads={cfg.d_model // width}" if width and cfg.d_model % width == 0 else "another n_heads"
            raise ValueError(
                f"{name} has shape {inv.shape}: the saved layer's head width is {width}, i.e. {heads}; the config "
                f"has n_heads={cfg.n_heads} (head width {cfg.head_dim}); set n_heads to match"
            )
        want = rope_inv_freq(cfg).astype(np.float64)
        if not np.allclose(inv, want, rtol=tol, atol=0):
            raise ValueError(
                f"{name} does not match rope_base={cfg.rope_base} for head width {cfg.head_dim} "
                f"(saved {inv[:3]}..., expected {want[:3]}...); set rope_base to the saved layer's"
            )
    elif cfg.rope and (complete or any(prefix + b in state_dict for b in _BUFFERS)):
        raise ValueError(
            f"the state dict has no {name}: it comes from a layer without RoPE, but the config has "
            f"rope=True; set rope=False"
        )
    masks = [prefix + b for b in _BUFFERS[1:]]
    present = [m for m in masks if m in state_dict]
    if present and len(present) != 2:
        raise ValueError(
            f"the state dict holds {present} but not {sorted(set(masks) - set(present))}; the published "
            f"layer registers both causal masks (or neither)"
        )
    if present:
        f_mask, fb_mask = (_to_numpy(state_dict[m]) for m in masks)
        n = f_mask.shape[0] if f_mask.ndim == 2 else -1
        expected = _buffers(cfg, n) if n > 0 else {}
        for m, got in zip(masks, (f_mask, fb_mask)):
            want = expected.get(m[len(prefix) :])
            if want is None or got.shape != want.shape or not np.array_equal(got.astype(bool), want):
                raise ValueError(
                    f"{m} (shape {got.shape}) is not the published layer's causal mask of a square "
                    f"max_len; the state dict is damaged or from another model"
                )


def _expected_shape(cfg: SessaConfig, name: str) -> tuple:
    d, hd, kvd = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    shapes = {
        "ln.weight": (d,),
        "ln.bias": (d,),
        "W_in.weight": (2 * d, d),
        "W_in.bias": (2 * d,),
        "W_out.weight": (d, d),
        "W_out.bias": (d,),
        "mixer.q_proj.weight": (hd, d),
        "mixer.q_proj.bias": (hd,),
        "mixer.k_proj.weight": (kvd, d),
        "mixer.k_proj.bias": (kvd,),
        "mixer.v_proj.weight": (kvd, d),
        "mixer.v_proj.bias": (kvd,),
        "mixer.proj_fb.weight": (2 * d, d),
        "mixer.proj_fb.bias": (2 * d,),
        "mixer.out_proj.weight": (d, d),
        "mixer.gamma_bias": (),
        "mixer.gamma_ctx.weight": (1, d),
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


def _is_float(dtype) -> bool:
    """Floating point, numpy's or ml_dtypes' (bfloat16, float8 kinds: numpy kind 'V')."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name)


# Prefixes that wrappers add to every key, and what adds them.
_WRAPPERS = {"module.": "torch DistributedDataParallel / DataParallel", "_orig_mod.": "torch.compile"}


def _check_layout(state_dict: Mapping, anchor: str, what: str) -> None:
    """KeyError when ``state_dict`` is not the layout a loader expects, naming what it is instead.

    ``anchor``: a key the expected layout always has (``ln.weight`` for a layer,
    ``embed.weight`` for an LM); ``what``: "layer" or "lm".
    """
    keys = list(state_dict)
    if anchor in state_dict or not keys:
        return
    for k in keys:  # every key under one prefix that ends in the anchor: a wrapper's or a parent module's
        if k.endswith("." + anchor):
            pre = k[: -len(anchor)]
            if all(key.startswith(pre) for key in keys):
                source = next((f" (added by {who})" for w, who in _WRAPPERS.items() if pre.startswith(w)), "")
                raise KeyError(
                    f"every key of the state dict starts with {pre!r}{source}; strip it first: "
                    f"{{k.removeprefix({pre!r}): v for k, v in state_dict.items()}}"
                )
    if what == "layer" and ("embed.weight" in state_dict or any(k.startswith("layers.0.") for k in keys)):
        raise KeyError(
            "this is an LM state dict (it has embed.weight / layers.<i>.<name>), not one layer's: load it with "
            "lm_params_from_torch, or pass one layer's entries: "
            "{k.removeprefix('layers.0.'): v for k, v in state_dict.items() if k.startswith('layers.0.')}"
        )
    if what == "lm" and ("ln.weight" in state_dict or "W_in.weight" in state_dict):
        raise KeyError(
            "this is one SessaLayer's state dict (ln.weight, W_in.weight, ... at the top level), not an "
            "LM's: load it with layer_params_from_torch"
        )


def _check_layer(state_dict: Mapping, cfg: SessaConfig, prefix: str) -> None:
    """KeyError/ValueError naming the first problem with a layer's keys, shapes or dtypes."""
    table = _layer_table(cfg)
    expected = {name for name, _, _ in table}
    present = {k[len(prefix) :] for k in state_dict if k.startswith(prefix)}
    missing = sorted(expected - present)
    if missing:
        raise KeyError(f"state dict lacks {[prefix + m for m in missing]} for {cfg}")
    extra = sorted(n for n in present - expected if n not in _BUFFERS)
    if extra:
        raise KeyError(
            f"state dict has unexpected entries {[prefix + e for e in extra]} "
            f"(n_heads={cfg.n_heads}: out_proj exists only when n_heads > 1)"
        )
    ln = np.shape(state_dict[prefix + "ln.weight"])
    if len(ln) == 1 and ln[0] != cfg.d_model:
        raise ValueError(
            f"{prefix}ln.weight has shape {ln}: the saved layer has d_model={ln[0]}, the config "
            f"d_model={cfg.d_model}; set d_model={ln[0]}"
        )
    for name, _, _ in table:
        shape, want = np.shape(state_dict[prefix + name]), _expected_shape(cfg, name)
        if shape != want:
            raise ValueError(
                f"{prefix + name} has shape {shape}; expected {want} for d_model={cfg.d_model}, "
                f"n_heads={cfg.n_heads}, n_kv_heads={cfg.kv_heads}"
            )
        dtype = _dtype(state_dict[prefix + name])
        if not _is_float(dtype):
            raise ValueError(
                f"{prefix + name} has dtype {dtype}; weights must be floating point (float32, "
                f"bfloat16, float16, float64): this is not a model's weights, or they were quantized "
                f"(dequantize them first)"
            )


def _dtype(value):
    """The dtype of a numpy array or torch tensor, as numpy's (torch.bfloat16 -> bfloat16)."""
    if type(value).__module__.startswith("torch"):
        name = str(value.dtype).removeprefix("torch.")
        if name == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(name) if hasattr(np, name) else np.dtype("V")
    return np.asarray(value).dtype


def _complete(state_dict: Mapping) -> bool:
    return isinstance(state_dict, PublishedStateDict) or any(
        type(v).__module__.startswith("torch") for v in state_dict.values()
    )


def _layer_params(state_dict: Mapping, cfg: SessaConfig, prefix: str, dtype, check_buffers: bool = True) -> dict:
    _check_layer(state_dict, cfg, prefix)
    if check_buffers:  # after keys and shapes: a buffer only explains what the weights cannot
        _check_buffers(state_dict, cfg, prefix, complete=_complete(state_dict))
    params: dict = {}
    for name, path, transpose in _layer_table(cfg):
        value = _to_numpy(state_dict[prefix + name])
        value = value.T if transpose else value
        _set(params, path, value.astype(dtype) if dtype is not None else value)
    return params


def layer_params_from_torch(state_dict: Mapping, cfg: SessaConfig, dtype=None) -> dict:
    """Maps a SessaLayer state dict (reference names -> arrays) to ``{'params': ...}``.

    The result is accepted by ``SessaLayer(cfg).apply``. ``dtype`` casts every array
    (default: keep the input dtype). Values may be numpy arrays or torch tensors (any
    float dtype, bfloat16 included). Buffers (rope_inv_freq, causal masks) carry no
    learned state but are checked against ``cfg`` (RoPE on/off, head width, rope_base,
    mask shape); a mismatch raises ValueError naming it. A dict of torch tensors (or from
    ``load_torch_state_dict``) is taken as complete: no rope_inv_freq means no RoPE.

    Checked in this order, each error naming the cause: the layout (keys under a wrapper's
    prefix such as DDP's ``module.``, or an LM's state dict; KeyError), the keys, the shapes
    (a ``d_model`` mismatch named as such), floating-point dtypes (ValueError), the buffers.
    """
    _check_layout(state_dict, "ln.weight", "layer")
    return {"params": _layer_params(state_dict, cfg, "", dtype)}


def _layer_to_torch(
    params: Mapping, cfg: SessaConfig, prefix: str, include_buffers: bool = False, max_len: int | None = None
) -> dict:
    out = {}
    for name, path, transpose in _layer_table(cfg):
        value = np.asarray(_get(params, path))
        out[prefix + name] = value.T if transpose else value
    if include_buffers:
        out.update({prefix + k: v for k, v in _buffers(cfg, max_len).items()})
    return out


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _finish(out: dict, as_torch: bool | None) -> dict:
    """Writable, contiguous numpy copies (``torch.from_numpy`` and ``load_state_dict`` reject read-only
    arrays), or torch tensors: ``as_torch`` None = tensors when torch is installed."""
    arrays = {k: np.array(v, copy=True, order="C") for k, v in out.items()}
    if as_torch is None:
        as_torch = _torch_available()
    if not as_torch:
        return arrays
    torch = _torch()

    def tensor(a):
        if a.dtype.name == "bfloat16":  # numpy has no bfloat16: go through its bits
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    return {k: tensor(v) for k, v in arrays.items()}


def _check_target(out: dict, target, max_len: int | None, fn: str) -> None:
    """ValueError naming how ``out``'s keys differ from ``target``'s (a torch module, a state dict
    or a collection of key names) and the argument that fixes it."""
    if target is None:
        return
    if hasattr(target, "state_dict") and callable(target.state_dict):
        target = target.state_dict()
    keys = set(target)
    missing, unexpected = sorted(keys - set(out)), sorted(set(out) - keys)
    if not missing and not unexpected:
        return
    masks = [k for k in missing if k.endswith(_BUFFERS[1:])]
    if masks and max_len is None:
        shape = np.shape(target[masks[0]]) if isinstance(target, Mapping) else ()
        n = f"={shape[0]}" if len(shape) == 2 else ""
        raise ValueError(
            f"the target registers the causal-mask buffers {masks[:2]} (its layers were built with max_len{n}); "
            f"{fn} needs max_len to produce them: pass max_len{n or '=<the max_len the torch layer was built with>'}"
        )
    hints = []
    if any(k.endswith("rope_inv_freq") for k in missing + unexpected):
        hints.append("rope_inv_freq differs: set rope to match the torch layer")
    if any(k.endswith(_BUFFERS[1:]) for k in unexpected):
        hints.append("the target has no causal masks: pass max_len=None")
    if any(k.startswith(tuple(_WRAPPERS)) for k in missing):
        hints.append("the target's keys carry a wrapper's prefix (DDP 'module.'): pass the unwrapped module")
    raise ValueError(
        f"{fn}: the result would not load strictly into the target: missing {missing[:6]}, unexpected "
        f"{unexpected[:6]}" + (f" ({'; '.join(hints)})" if hints else "")
    )


def layer_params_to_torch(
    variables: Mapping,
    cfg: SessaConfig,
    include_buffers: bool = True,
    max_len: int | None = None,
    as_torch: bool | None = None,
    target=None,
) -> dict:
    """Inverse of ``layer_params_from_torch``: the published layer's ``state_dict()``.

    ``include_buffers`` adds ``mixer.rope_inv_freq`` (when ``cfg.rope``) and, for a
    published layer built with ``max_len``, its two (max_len, max_len) bool causal masks
    (only ``max_len`` can size them: a layer built with it needs it passed here), so
    ``torch_layer.load_state_dict(sd, strict=True)`` succeeds. ``as_torch``: torch
    tensors (True), writable numpy arrays (False), or tensors when torch is installed (None).
    ``target`` (optional): the torch layer (or its state dict, or its key names) that will load
    the result; its keys are compared first and a difference raises ValueError naming the
    fix (e.g. the ``max_len`` its mask buffers need).
    """
    if max_len is not None and not include_buffers:
        raise ValueError(
            "layer_params_to_torch: max_len sizes the causal-mask buffers, which only "
            "include_buffers=True produces; pass include_buffers=True or drop max_len"
        )
    out = _layer_to_torch(variables["params"], cfg, "", include_buffers, max_len)
    _check_target(out, target, max_len, "layer_params_to_torch")
    return _finish(out, as_torch)


def lm_params_from_torch(state_dict: Mapping, cfg: SessaConfig, dtype=None) -> dict:
    """Maps an LM state dict (module docstring layout) to ``SessaLM(cfg)`` variables.

    Honours ``cfg.scan_layers`` (layer params stacked on a leading axis under 'layers')
    and ``cfg.tie_embeddings`` (``head.weight`` required only when untied).
    """
    cast = (lambda a: _to_numpy(a).astype(dtype)) if dtype is not None else _to_numpy
    _check_layout(state_dict, "embed.weight", "lm")
    extra = sorted(
        k
        for k in state_dict
        if k.startswith("layers.") and k.split(".")[1].isdigit() and int(k.split(".")[1]) >= cfg.n_layers
    )
    if extra:
        raise KeyError(f"state dict has layers beyond n_layers={cfg.n_layers}: {extra[:3]}...")
    shapes = {
        "embed.weight": (cfg.vocab_size, cfg.d_model),
        "norm_f.weight": (cfg.d_model,),
        "norm_f.bias": (cfg.d_model,),
    }
    if not cfg.tie_embeddings:
        shapes["head.weight"] = (cfg.vocab_size, cfg.d_model)
    missing = sorted(set(shapes) - set(state_dict))
    if missing:
        raise KeyError(
            f"state dict lacks {missing} (vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, "
            f"tie_embeddings={cfg.tie_embeddings})"
        )
    layer_key = lambda k: k.startswith("layers.") and k.split(".")[1].isdigit()  # noqa: E731
    unknown = sorted(k for k in state_dict if k not in shapes and k != "head.weight" and not layer_key(k))
    if unknown:
        raise KeyError(
            f"state dict has unexpected entries {unknown}; an LM state dict holds embed.weight, "
            f"norm_f.weight, norm_f.bias, head.weight and layers.<i>.<layer name>"
        )
    embed = np.shape(state_dict["embed.weight"])
    if len(embed) == 2 and embed[1] != cfg.d_model:
        raise ValueError(
            f"embed.weight has shape {embed}: the saved model has d_model={embed[1]}, the config "
            f"d_model={cfg.d_model}; set d_model={embed[1]}"
        )
    for name, shape in shapes.items():
        if np.shape(state_dict[name]) != shape:
            raise ValueError(
                f"{name} has shape {np.shape(state_dict[name])}; expected {shape} for "
                f"vocab_size={cfg.vocab_size}, d_model={cfg.d_model}"
            )
        if not _is_float(_dtype(state_dict[name])):
            raise ValueError(
                f"{name} has dtype {_dtype(state_dict[name])}; weights must be floating point: this "
                f"is not a model's weights, or they were quantized (dequantize them first)"
            )
    if cfg.tie_embeddings and "head.weight" in state_dict:
        # A tied PyTorch model lists the shared matrix under both names; anything else is an untied head.
        if not np.array_equal(_to_numpy(state_dict["head.weight"]), _to_numpy(state_dict["embed.weight"])):
            raise KeyError(
                "state dict has a head.weight that differs from embed.weight, but the config has "
                "tie_embeddings=True and would drop it; load it with tie_embeddings=False"
            )
    for i in range(cfg.n_layers):  # every layer's keys and shapes before any buffer
        _check_layer(state_dict, cfg, f"layers.{i}.")
    layers = [_layer_params(state_dict, cfg, f"layers.{i}.", dtype) for i in range(cfg.n_layers)]
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


def lm_params_to_torch(
    variables: Mapping,
    cfg: SessaConfig,
    include_buffers: bool = True,
    max_len: int | None = None,
    as_torch: bool | None = None,
    target=None,
) -> dict:
    """Inverse of ``lm_params_from_torch``. A tied model (``cfg.tie_embeddings``) lists the shared
    matrix as both ``embed.weight`` and ``head.weight``, as a PyTorch LM whose head weight is its
    embedding's does, so strict loading works either way. Per-layer buffers, ``max_len``,
    ``as_torch`` and ``target`` as in ``layer_params_to_torch``."""
    params = variables["params"]
    out = {
        "embed.weight": np.asarray(params["embed"]["embedding"]),
        "norm_f.weight": np.asarray(params["norm_f"]["scale"]),
        "norm_f.bias": np.asarray(params["norm_f"]["bias"]),
    }
    out["head.weight"] = out["embed.weight"] if cfg.tie_embeddings else np.asarray(params["head"]["kernel"]).T
    for i in range(cfg.n_layers):
        if cfg.scan_layers:
            import jax

            layer = jax.tree_util.tree_map(lambda a, i=i: np.asarray(a)[i], params["layers"])
        else:
            layer = params[f"layers_{i}"]
        out.update(_layer_to_torch(layer, cfg, f"layers.{i}.", include_buffers, max_len))
    _check_target(out, target, max_len, "lm_params_to_torch")
    return _finish(out, as_torch)


def load_torch_state_dict(path: str) -> PublishedStateDict:
    """Reads a ``.pt`` state dict into numpy arrays (needs the optional ``torch`` extra).

    bfloat16 tensors become ``ml_dtypes.bfloat16`` arrays (exact). The result is a
    ``PublishedStateDict``: the loaders treat its buffers as complete.
    """
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading .pt files needs PyTorch: pip install 'sessa-jax[interop]'") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return PublishedStateDict({k: _to_numpy(v) for k, v in sd.items()})
