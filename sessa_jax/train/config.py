"""Run configs: the base ``ConfigDict``, loading from ``sessa_jax/configs/*.py``, overrides, validation.

A run config has eight sections: ``model`` (``kind`` plus every ``SessaConfig`` field),
``data``, ``optim``, ``train``, ``checkpoint``, ``mesh`` (device mesh axes, -1 = the
remaining devices), ``distributed`` (multi-host start-up) and ``metrics`` (MFU peak, W&B). Config files define
``get_config()``
returning ``base_config()`` with changes. ``load_config("tiny", ["train.steps=30"])``
loads ``sessa_jax/configs/tiny.py`` (or a path), applies ``key=value`` overrides and validates:
unknown keys, wrong types and impossible combinations raise ``ConfigError`` naming the
key, before anything is compiled.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import os

import jax.numpy as jnp
import ml_collections as mc

from sessa_jax.config import SessaConfig
from sessa_jax.data.mqar import check_mqar
from sessa_jax.data.pipeline import TASKS, task_vocab_size
from sessa_jax.data.symbol_soup import check_symbol_soup
from sessa_jax.options import LAYER_KINDS as KINDS
from sessa_jax.options import LR_SCHEDULES as SCHEDULES
from sessa_jax.options import TOKENIZER_KINDS as TOKENIZERS
from sessa_jax.sharding import MeshError, mesh_shape
from sessa_jax.train.resume_guard import check_allowed_keys, flatten

# Shipped inside the package so an installed wheel finds them; a checkout's top-level configs/ links here.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
    """A run config that cannot work; the message names the key and the fix."""


def base_config() -> mc.ConfigDict:
    """Every key a run config may set, with defaults."""
    model_defaults = {
        f.name: f.default for f in dataclasses.fields(SessaConfig) if f.default is not dataclasses.MISSING
    }
    model_defaults.update(
        dtype="float32",
        param_dtype="float32",
        vocab_size=0,
        d_model=64,
        n_heads=4,
        n_kv_heads=mc.config_dict.placeholder(int),
        chunk_size=mc.FieldReference("auto", field_type=object),
        leaf_size=mc.FieldReference("auto", field_type=object),
    )  # "auto" or an int
    c = mc.ConfigDict()
    c.model = mc.ConfigDict(
        dict(
            kind="sessa",
            match_params=False,  # non-sessa kinds: pick d_model so the parameter count matches sessa's
            **model_defaults,  # vocab_size 0 = the task's vocabulary rounded up to a multiple of 8
        )
    )
    c.data = mc.ConfigDict(
        dict(
            task="mqar",
            seq_len=64,
            batch_size=16,
            seed=0,
            num_threads=0,
            prefetch=2,
            allow_changed_sources=False,  # resume even when the data files differ from the checkpoint's (resume_guard)
            mqar=dict(vocab_size=64, num_kv_pairs=8),
            # the published SymbolSoup (400-600 tokens, splits 20000/2000); tsv_dir: read files made by the
            # published script (or sessa_jax.data.symbol_soup_tsv) instead of generating
            symbol_soup=dict(min_tokens=400, max_tokens=600, num_train=20000, num_eval=2000, tsv_dir=""),
            # verify_checksums: read every shard byte once at open to check its CRC-32 (data.text.open_shards)
            text=dict(path="", arrayrecord_dir="", max_bytes=8_000_000, eval_fraction=0.01, verify_checksums=True),
            # bytes | sentencepiece | tokenizers; path: the .model / tokenizer.json. sentencepiece with
            # path '' fits a model of vocab_size on the corpus into WORKDIR/tokenizer.model at the first start.
            tokenizer=dict(kind="bytes", path="", vocab_size=4096),
        )
    )
    c.optim = mc.ConfigDict(
        dict(
            lr=3e-3,
            warmup_steps=20,
            min_lr_ratio=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_norm=1.0,
            grad_accum=1,
            # cosine | linear | constant | wsd (warmup-stable-decay: the last decay_fraction of train.steps decays)
            schedule="cosine",
            decay_fraction=0.2,
            decay_embeddings=False,  # weight decay on embedding tables (biases and norms are never decayed)
        )
    )
    c.train = mc.ConfigDict(
        dict(
            steps=100,
            seed=0,
            log_every=10,
            eval_every=0,
            eval_batches=4,
            progress=True,
            allow_config_change="",  # comma-separated keys that may differ from the checkpoint's (resume_guard)
            loss_chunk=0,  # > 0: the loss projects this many positions at a time (no full (B, T, V) logits)
            profile_steps="",  # "a:b": a jax.profiler trace of steps a..b-1 in WORKDIR/profile
            compilation_cache="auto",  # persistent XLA cache: auto = WORKDIR/compilation_cache, a path, or "" (off)
        )
    )
    c.metrics = mc.ConfigDict(
        dict(
            peak_tflops=0.0,  # per-device peak for MFU; 0 = from sessa_jax.train.report's device table
            wandb=False,
            wandb_project="sessa-jax",
            wandb_entity="",  # W&B resumes the run id kept in WORKDIR
        )
    )
    c.checkpoint = mc.ConfigDict(dict(every=0, keep=3, async_save=True))
    c.mesh = mc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # data x fsdp x tensor = all devices
    c.distributed = mc.ConfigDict(
        dict(
            initialize="auto",  # auto: when a cluster is detected (TPU pod, SLURM, JAX_COORDINATOR_ADDRESS); yes; no
            coordinator_address="",
            num_processes=0,
            process_id=-1,  # explicit multi-process start (0/-1: detect)
        )
    )
    return c


def _unknown_key_error(key: str, root: mc.ConfigDict) -> ConfigError | None:
    """The error for a dotted ``key`` that ``root`` lacks, with a did-you-mean hint; None if present."""
    parts = key.split(".")
    node = root
    for i, part in enumerate(parts):
        keys = list(node.keys()) if isinstance(node, mc.ConfigDict) else []
        if part not in keys:
            where = ".".join(parts[:i]) or "the config"
            hint = difflib.get_close_matches(part, keys, n=1)
            return ConfigError(
                f"unknown config key {key!r}: {where} has no {part!r}"
                + (f"; did you mean {'.'.join(parts[:i] + [hint[0]])!r}?" if hint else f"; known: {sorted(keys)}")
            )
        node = node[part]
    return None


def _set(cfg: mc.ConfigDict, key: str, raw: str) -> None:
    """Applies one ``key=value`` override, parsing ``raw`` by the type of the current value."""
    err = _unknown_key_error(key, cfg)
    if err is not None:
        raise err
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    current = node[leaf]
    if isinstance(current, mc.ConfigDict):
        raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. {key}.{next(iter(current))}")
    field = node.get_ref(leaf)
    want = field.get_type()
    if want is str:
        value = raw
    else:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is float and isinstance(value, str) and value.strip().lower().lstrip("+-") in ("inf", "nan"):
            value = float(value)  # parsed so that validation can name it (it is never a usable setting)
    if want not in (None, object) and value is not None and type(value) is not want:
        raise ConfigError(f"config key {key!r} expects {want.__name__}, got {raw!r} ({type(value).__name__})")
    node[leaf] = value


def load_config(name_or_path: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> mc.ConfigDict:
    """Loads ``sessa_jax/configs/<name>.py`` (or a .py path), applies ``key=value`` overrides, validates."""
    path = name_or_path if name_or_path.endswith(".py") else os.path.join(CONFIG_DIR, f"{name_or_path}.py")
    if not os.path.isfile(path):
        known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
        raise ConfigError(f"config {name_or_path!r} not found (looked for {path}); known configs: {known}")
    spec = importlib.util.spec_from_file_location(f"_sessa_run_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for item in overrides:
        key, sep, raw = item.removeprefix("--config.").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.steps=30")
        _set(cfg, key, raw)
    validate(cfg)
    return cfg


def _positive(cfg, *keys, allow_zero=False):
    for key in keys:
        v = cfg
        for part in key.split("."):
            v = v[part]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
            raise ConfigError(f"config key {key!r} must be an integer >= {0 if allow_zero else 1}; got {v!r}")


def _check_known_keys(cfg: mc.ConfigDict) -> None:
    """Keys a config file added (``c.train.stepz = 5``, ``c.data.update(seqlen=...)``) are read by
    nothing; reject them instead of silently training with the default."""
    base = base_config()
    unknown = sorted(set(flatten(cfg.to_dict())) - set(flatten(base.to_dict())))
    err = _unknown_key_error(unknown[0], base) if len(unknown) == 1 else None
    if err is not None:
        raise err
    if unknown:  # several, or a section of base_config replaced by a plain value
        raise ConfigError(
            f"unknown config key(s) {unknown}: nothing reads them; fix the spelling or remove them "
            f"(every known key is in sessa_jax.train.config.base_config)"
        )


def validate(cfg: mc.ConfigDict, process_count: int = 1, device_count: int | None = None) -> None:
    """Raises ConfigError naming the key for any value or combination that cannot work.

    ``device_count`` None (at load time, before JAX starts) checks the mesh axes as if
    there were just enough devices; the loop checks again with the real counts.
    """
    _check_known_keys(cfg)
    if device_count is None:
        device_count = math.prod(max(v, 1) for v in dict(cfg.mesh).values())
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    if m.kind not in KINDS:
        raise ConfigError(f"model.kind={m.kind!r} is unknown; choose one of {KINDS}")
    if d.task not in TASKS:
        raise ConfigError(f"data.task={d.task!r} is unknown; choose one of {TASKS}")
    _positive(cfg, "data.seq_len", "data.batch_size", "train.steps", "optim.grad_accum", "train.log_every")
    # checkpoint.keep=0 would make orbax delete every checkpoint it writes (nothing to resume from).
    _positive(cfg, "checkpoint.keep")
    _positive(
        cfg,
        "train.eval_every",
        "checkpoint.every",
        "optim.warmup_steps",
        "data.num_threads",
        "data.prefetch",
        "data.seed",
        "data.text.max_bytes",
        "train.eval_batches",
        "train.loss_chunk",
        allow_zero=True,
    )
    _validate_reporting(cfg)
    for key in ("dtype", "param_dtype"):
        if m[key] not in ("float32", "bfloat16", "float16", "float64"):
            raise ConfigError(f"model.{key}={m[key]!r} is not a float dtype name; use 'float32' or 'bfloat16'")
    for key in ("lr", "min_lr_ratio", "weight_decay", "clip_norm", "eps", "b1", "b2", "decay_fraction"):
        if not math.isfinite(o[key]):
            raise ConfigError(
                f"optim.{key} must be a finite number; got {o[key]!r} (inf or nan makes every update "
                f"non-finite); e.g. optim.lr=3e-4"
            )
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={o.schedule!r} is unknown; choose one of {SCHEDULES}")
    if not 0 < o.decay_fraction <= 1:
        raise ConfigError(
            f"optim.decay_fraction must lie in (0, 1] (the share of train.steps the 'wsd' schedule "
            f"decays over); got {o.decay_fraction}"
        )
    if o.lr <= 0 or not 0 <= o.min_lr_ratio <= 1 or o.weight_decay < 0 or o.clip_norm < 0:
        raise ConfigError(
            f"optim: need lr > 0 (got {o.lr}), 0 <= min_lr_ratio <= 1 (got {o.min_lr_ratio}), "
            f"weight_decay >= 0 (got {o.weight_decay}) and clip_norm >= 0 (got {o.clip_norm}; 0 disables)"
        )
    for key in ("b1", "b2"):
        if not 0 <= o[key] < 1:
            raise ConfigError(f"optim.{key} must lie in [0, 1); got {o[key]} (1 or more makes AdamW's updates NaN)")
    if not o.eps > 0:
        raise ConfigError(f"optim.eps must be > 0; got {o.eps} (0 turns zero gradients into NaN updates); use 1e-8")
    try:
        check_allowed_keys(t.allow_config_change)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if o.warmup_steps >= t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be < train.steps={t.steps}")
    if cfg.distributed.initialize not in ("auto", "yes", "no"):
        raise ConfigError(f"distributed.initialize={cfg.distributed.initialize!r}: use 'auto', 'yes' or 'no'")
    try:
        data, fsdp, _ = mesh_shape(dict(cfg.mesh), device_count)
    except MeshError as e:
        raise ConfigError(f"mesh: {e}") from e
    split = o.grad_accum * max(process_count, data * fsdp)
    if d.batch_size % split:
        raise ConfigError(
            f"data.batch_size={d.batch_size} must be divisible by optim.grad_accum x max(processes, data x fsdp) "
            f"= {o.grad_accum} x {max(process_count, data * fsdp)} = {split}"
        )
    try:
        if d.task == "mqar":
            check_mqar(d.seq_len, d.mqar.vocab_size, d.mqar.num_kv_pairs)
        elif d.task == "symbol_soup" and not d.symbol_soup.tsv_dir:
            s = d.symbol_soup
            check_symbol_soup(
                d.seq_len, s.min_tokens, s.max_tokens, [("num_train", s.num_train), ("num_eval", s.num_eval)]
            )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if d.task == "symbol_soup" and d.symbol_soup.tsv_dir and not os.path.isdir(d.symbol_soup.tsv_dir):
        raise ConfigError(
            f"data.symbol_soup.tsv_dir={d.symbol_soup.tsv_dir!r} is not a directory; pass the "
            f"output_dir of the published script, or '' to generate the data"
        )
    elif d.task == "text" and d.text.path and not os.path.exists(d.text.path):
        raise ConfigError(
            f"data.text.path={d.text.path!r} does not exist; pass an existing text file or directory, "
            f"or set data.text.path='' to use the built-in corpus (Python standard library sources)"
        )
    if not 0 < d.text.eval_fraction < 1:
        raise ConfigError(f"data.text.eval_fraction must lie in (0, 1); got {d.text.eval_fraction}")
    _validate_tokenizer(cfg)
    if d.task != "text" and not t.eval_batches:
        raise ConfigError(
            f"train.eval_batches=0 evaluates the whole held-out split, but data.task={d.task!r} "
            f"generates an unbounded one; set train.eval_batches to a number of batches, e.g. 8"
        )
    need = task_vocab_size(d)
    if m.vocab_size and m.vocab_size < need:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is smaller than data.task={d.task!r} needs ({need}); "
            f"raise it or set model.vocab_size=0 to size it from the task"
        )
    model_config(cfg)  # SessaConfig's own checks, re-raised with the run-config key


def _validate_tokenizer(cfg: mc.ConfigDict) -> None:
    tok, task = cfg.data.tokenizer, cfg.data.task
    if tok.kind not in TOKENIZERS:
        raise ConfigError(f"data.tokenizer.kind={tok.kind!r} is unknown; choose one of {TOKENIZERS}")
    if tok.kind != "bytes" and task != "text":
        raise ConfigError(
            f"data.tokenizer.kind={tok.kind!r} applies to data.task='text' only (this run is "
            f"{task!r}); remove the override"
        )
    if tok.path and not os.path.isfile(tok.path):
        raise ConfigError(
            f"data.tokenizer.path={tok.path!r} is not a file; pass a sentencepiece .model or a HF tokenizer.json"
        )
    if tok.kind == "tokenizers" and not tok.path:
        raise ConfigError("data.tokenizer.kind='tokenizers' needs data.tokenizer.path=PATH/tokenizer.json")
    if tok.kind == "sentencepiece" and not tok.path and tok.vocab_size < 260:
        raise ConfigError(
            f"data.tokenizer.vocab_size={tok.vocab_size} is too small to fit a sentencepiece model "
            f"(256 byte pieces + specials); use >= 260, e.g. 4096"
        )


def parse_profile_steps(value: str, steps: int) -> tuple[int, int] | None:
    """``train.profile_steps`` "a:b" -> (a, b) with 1 <= a < b <= steps + 1; "" -> None."""
    if not value:
        return None
    try:
        a, b = (int(x) for x in value.split(":"))
    except ValueError:
        raise ConfigError(f"train.profile_steps={value!r} must look like 'a:b' (trace steps a..b-1), e.g. '5:8'")
    if not 1 <= a < b <= steps + 1:
        raise ConfigError(f"train.profile_steps={value!r} needs 1 <= a < b <= train.steps + 1 = {steps + 1}")
    return a, b


def _validate_reporting(cfg: mc.ConfigDict) -> None:
    parse_profile_steps(cfg.train.profile_steps, cfg.train.steps)
    if cfg.metrics.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "metrics.wandb=True needs the wandb package: pip install 'sessa-jax[wandb]' (or set metrics.wandb=False)"
        )
    if not cfg.metrics.peak_tflops >= 0:
        raise ConfigError(
            f"metrics.peak_tflops must be >= 0 (0 = from the device table); got {cfg.metrics.peak_tflops}"
        )


def model_config(cfg: mc.ConfigDict, match: bool = True) -> SessaConfig:
    """The ``SessaConfig`` of a run (vocab from the task when 0; width matched when asked)."""
    fields = {f.name for f in dataclasses.fields(SessaConfig)}
    kw = {k: v for k, v in cfg.model.items() if k in fields}
    kw["vocab_size"] = kw["vocab_size"] or -(-task_vocab_size(cfg.data) // 8) * 8
    kw["dtype"], kw["param_dtype"] = jnp.dtype(kw["dtype"]), jnp.dtype(kw["param_dtype"])
    try:
        config = SessaConfig(**kw)
    except ValueError as e:
        raise ConfigError(f"model: {e}".replace("SessaConfig.", "model.")) from e
    if match and cfg.model.match_params and cfg.model.kind != "sessa":
        # Imported here: the baselines import the model (Flax), which checking a config never needs.
        from sessa_jax.baselines import match_width

        config = match_width(config, cfg.model.kind)
    return config


def resolve(cfg: mc.ConfigDict) -> mc.ConfigDict:
    """A copy with derived values written in (vocab size, matched width): what gets saved."""
    out = mc.ConfigDict(cfg.to_dict())
    config = model_config(cfg)
    out.model.vocab_size, out.model.d_model, out.model.match_params = config.vocab_size, config.d_model, False
    return out


def config_from_json(d: dict) -> mc.ConfigDict:
    """Rebuilds a run config saved with ``cfg.to_dict()`` (missing keys take defaults)."""
    cfg = base_config()
    cfg.update_from_flattened_dict({k: v for k, v in flatten(d).items()})
    return cfg
