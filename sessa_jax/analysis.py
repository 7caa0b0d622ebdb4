"""Influence of an input position on a later output, measured with autodiff.

    I[t, tau] = || d y_t / d x_tau ||_F        (output width O x input width D per pair)

``influence`` gets rows I[t, :] for chosen target positions t from vector-Jacobian
products: one VJP per output unit of y_t (O cotangents per target), batched with
``vmap`` and mapped over targets in chunks, so memory stays O(chunk * O * T * D) and no
T x T x O x D Jacobian is ever formed. ``lag_profile`` reads the influence of one source
position on the outputs ``lag`` steps later; ``fit_power_law`` / ``fit_exponential``
fit log-log / log-linear lines to it.

``layer_fn`` and ``lm_fn`` turn a Flax module (a mixer, a ``SessaLayer``) or a whole
``SessaLM`` into the (T, D) -> (T, O) function ``influence`` differentiates; for the LM
the input is the embedding sequence (the embedding lookup is intercepted).

The constructions below make the paper's memory claims measurable on the real modules
(docs/design.md, "The layer"): uniform routing, where Sessa's feedback gives a power-law tail
t^-(1 - gamma), attention a 1/t tail and a constant-decay SSM an exponential one, and a
selective construction whose feedback carries an anchor token's state forward without
decay. Dimension legend: T time, D input width, O output width, N target positions.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sessa_jax.config import SessaConfig


# --------------------------------------------------------------------------------------
# Influence by VJPs
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BoundFn:
    """fn(x) = apply(args, x): a (T, D) -> (T, O) function whose data travel as an argument.

    ``apply`` is a fixed Python callable (kept, so its compiled influence is reused);
    ``args`` is any pytree (parameters, tokens) passed to it as traced values, so calling
    ``influence`` again with new ``args`` of the same shapes does not compile again.
    """

    apply: object
    args: object

    def __call__(self, x_TxD):
        return self.apply(self.args, x_TxD)


TRACES = {"influence": 0}  # times influence's computation has been traced (compiled); tests read it


def _influence_rows(apply, args, x_TxD, tgt_N, target_chunk: int):
    """(N, T) influence rows of fn(x) = apply(args, x) at targets ``tgt_N`` (traced, one example)."""
    t_len = x_TxD.shape[0]
    y_TxO, vjp = jax.vjp(lambda x: apply(args, x), x_TxD)
    if y_TxO.ndim != 2 or y_TxO.shape[0] != t_len:
        raise ValueError(f"influence: fn must map (T, D) to (T, O); got output shape {y_TxO.shape}")
    o = y_TxO.shape[1]
    eye_OxO = jnp.eye(o, dtype=y_TxO.dtype)

    def one_target(t):
        cot_OxTxO = jnp.zeros((o, t_len, o), y_TxO.dtype).at[:, t, :].set(eye_OxO)
        (g_OxTxD,) = jax.vmap(vjp)(cot_OxTxO)
        g = g_OxTxD.astype(jnp.promote_types(g_OxTxD.dtype, jnp.float32))
        # scaled 2-norm: squaring raw entries would underflow for tails below ~1e-19
        scale = jnp.max(jnp.abs(g), axis=(0, 2))
        safe = jnp.where(scale > 0, scale, 1.0)
        return scale * jnp.sqrt(jnp.sum((g / safe[None, :, None]) ** 2, axis=(0, 2)))  # (T,)

    return jax.lax.map(one_target, tgt_N, batch_size=target_chunk)


_COMPILED: dict = {}  # (apply, target_chunk, batched) -> jitted rows; jit caches one program per shape


def _compiled(apply, target_chunk: int, batched: bool):
    key = (apply, target_chunk, batched)
    if key not in _COMPILED:

        def rows(args, x, tgt):
            TRACES["influence"] += 1  # runs only while tracing
            return _influence_rows(apply, args, x, tgt, target_chunk)

        if batched:  # args: (shared, per-example); x (B, T, D); targets (B, N)

            def rows_b(args, x, tgt):
                shared, each = args
                return jax.vmap(lambda e, xb, tb: rows((shared, e), xb, tb))(each, x, tgt)

            _COMPILED[key] = jax.jit(rows_b)
        else:
            _COMPILED[key] = jax.jit(rows)
    return _COMPILED[key]


def _check_targets(targets, t_len: int):
    targets = np.asarray(targets)
    if targets.size == 0 or int(targets.min()) < 0 or int(targets.max()) >= t_len:
        raise ValueError(f"influence: targets must be a non-empty list of positions in [0, {t_len})")
    return jnp.asarray(targets.astype(np.int32))


def influence(fn, x_TxD, targets, *, target_chunk: int = 8) -> np.ndarray:
    """Rows of the influence matrix: out[i, tau] = ||d fn(x)[targets[i]] / d x[tau]||_F.

    fn maps x (T, D) to y (T, O) (one sequence, no batch axis): a ``BoundFn`` (``lm_fn``,
    ``layer_fn`` return one) or any callable. For each target t the O unit cotangents on y_t
    go through one batched VJP; targets are processed ``target_chunk`` at a time. The
    computation is compiled once per (fn.apply or fn, target_chunk) and input shapes:
    calling again with new parameters, tokens or x of the same shapes reuses it.
    Returns float64 numpy (N, T); entries tau > t are zero for a causal fn.
    """
    x_TxD = jnp.asarray(x_TxD)
    if x_TxD.ndim != 2:
        raise ValueError(f"influence: x must be (time, width); got shape {tuple(x_TxD.shape)}")
    if np.ndim(targets) != 1:
        raise ValueError(f"influence: targets must be a non-empty 1-D list of positions in [0, {x_TxD.shape[0]})")
    tgt = _check_targets(targets, x_TxD.shape[0])
    apply, args = (fn.apply, fn.args) if isinstance(fn, BoundFn) else (_call, fn)
    if apply is _call:  # a plain callable is static: compile per callable
        apply, args = _static_apply(fn), ()
    return np.asarray(_compiled(apply, target_chunk, False)(args, x_TxD, tgt), np.float64)


def influence_batch(apply, shared, each, x_BxTxD, targets_BxN, *, target_chunk: int = 8) -> np.ndarray:
    """``influence`` for B examples at once: (B, N, T) float64.

    Example b is fn_b(x) = apply((shared, each_b), x) with ``each`` a pytree whose leaves
    have a leading B axis (e.g. tokens (B, T)), ``x_BxTxD`` its inputs and ``targets_BxN``
    its target positions. One compiled program per shapes, vmapped over examples.
    """
    x = jnp.asarray(x_BxTxD)
    if x.ndim != 3:
        raise ValueError(f"influence_batch: x must be (batch, time, width); got shape {tuple(x.shape)}")
    if np.ndim(targets_BxN) != 2 or np.shape(targets_BxN)[0] != x.shape[0]:
        raise ValueError(f"influence_batch: targets must be (batch={x.shape[0]}, N); got shape {np.shape(targets_BxN)}")
    tgt = _check_targets(targets_BxN, x.shape[1])
    return np.asarray(_compiled(apply, target_chunk, True)((shared, each), x, tgt), np.float64)


def _call(args, x):  # marker: plain callables are wrapped by _static_apply
    raise NotImplementedError


_STATIC: dict = {}


def _static_apply(fn):
    """apply(args, x) = fn(x) for a plain callable (one per callable, so its compile is reused)."""
    if fn not in _STATIC:
        _STATIC[fn] = lambda args, x: fn(x)
    return _STATIC[fn]


def lag_profile(fn, x_TxD, lags, source: int = 0, **kw) -> np.ndarray:
    """Influence of x[source] on y[source + lag] for each lag: (L,) float64."""
    lags = np.asarray(lags, np.int64)
    if lags.min() < 0 or source + lags.max() >= x_TxD.shape[0]:
        raise ValueError(
            f"lag_profile: source + lag must lie in [source, T={x_TxD.shape[0]}); "
            f"got source={source}, lags in [{lags.min()}, {lags.max()}]"
        )
    return influence(fn, x_TxD, source + lags, **kw)[:, source]


def log_lags(max_lag: int, num: int = 32, min_lag: int = 1) -> np.ndarray:
    """About ``num`` distinct integer lags spaced evenly in log between min_lag and max_lag."""
    return np.unique(np.round(np.geomspace(min_lag, max_lag, num)).astype(np.int64))


# --------------------------------------------------------------------------------------
# Fits
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Fit:
    """y ~ intercept + slope * x on the transformed axes; r2 of that line."""

    slope: float
    intercept: float
    r2: float


def _line(x, y) -> Fit:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    ss_tot = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - np.sum(resid**2) / ss_tot if ss_tot > 0 else 1.0
    return Fit(float(slope), float(intercept), float(r2))


def fit_power_law(lags, values) -> Fit:
    """log(values) = intercept + slope * log(lags): slope -1 is 1/t, -(1 - gamma) Sessa's tail."""
    return _line(np.log(lags), np.log(values))


def fit_exponential(lags, values) -> Fit:
    """log(values) = intercept + slope * lag: an exponential tail exp(slope * lag) is a straight line."""
    return _line(np.asarray(lags, np.float64), np.log(values))


def fit_power_law_bootstrap(lags, profiles_BxL, num_boot: int = 200, seed: int = 0) -> dict:
    """Log-log slope of the median-over-examples profile, with a bootstrap over examples.

    ``profiles_BxL`` holds one influence-vs-lag profile per example (positive entries).
    Returns dict(slope, r2, slope_se (bootstrap sd), slope_ci95 (2.5/97.5 percentiles),
    median (L,)). Resampling examples gives the uncertainty of the slope that comes from
    which sequences were measured, not the (smaller) error of the least-squares line.
    """
    prof = np.asarray(profiles_BxL, np.float64)
    lags = np.asarray(lags, np.float64)
    median = np.median(prof, axis=0)
    fit = fit_power_law(lags, median)
    rng = np.random.default_rng(seed)
    boots = [
        fit_power_law(lags, np.median(prof[rng.integers(0, len(prof), len(prof))], axis=0)).slope
        for _ in range(num_boot)
    ]
    return dict(
        slope=fit.slope,
        r2=fit.r2,
        slope_se=float(np.std(boots, ddof=1)),
        slope_ci95=(float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))),
        median=median,
    )


def trained_memory_tail(model: nn.Module, variables, tokens_BxT, target_B, lags, *, target_chunk: int = 8) -> dict:
    """Memory tail of a trained ``SessaLM`` at its scored positions.

    For example b, the target is ``target_B[b]`` (e.g. the SymbolSoup ``<label>`` position or
    an MQAR query) and the sources are ``target - lag`` for each lag, so the sources lie
    across the middle of the sequence and lag is not confounded with the target position.
    Influence is ||d logits[target] / d embedding[source]||_F. Lags whose source would be
    before position 1 in some example are dropped. Returns ``fit_power_law_bootstrap``'s
    dict plus ``lags`` and ``profiles`` (B, L).
    """
    tokens = np.asarray(tokens_BxT)
    target = np.asarray(target_B, np.int64)
    lags = np.asarray([lag for lag in np.asarray(lags) if lag >= 1 and np.all(target - lag >= 1)], np.int64)
    if lags.size < 2:
        raise ValueError(
            f"trained_memory_tail: fewer than 2 lags fit before every target (targets {target.min()}.."
            f"{target.max()}); pass smaller lags"
        )
    rows = lm_influence(model, variables, tokens, target[:, None], target_chunk=target_chunk)[:, 0]  # (B, T)
    profiles = rows[np.arange(len(target))[:, None], target[:, None] - lags[None, :]]
    out = fit_power_law_bootstrap(lags, np.maximum(profiles, np.finfo(np.float64).tiny))
    return dict(out, lags=lags, profiles=profiles)


# --------------------------------------------------------------------------------------
# Modules as (T, D) -> (T, O) functions
# --------------------------------------------------------------------------------------
def _kwargs_key(kwargs: dict):
    return tuple(sorted(kwargs.items()))


_LAYER_APPLY: dict = {}
_LM_APPLY: dict = {}


def layer_fn(module: nn.Module, variables, **kwargs) -> BoundFn:
    """fn(x (T, D)) = module.apply(variables, x[None], **kwargs)[0] (a mixer or a SessaLayer).

    ``kwargs`` must be hashable (they are fixed into the compiled function); the variables
    are an argument, so new parameters of the same shapes reuse the compiled influence.
    """
    variables = nn.meta.unbox(variables)
    key = (module, _kwargs_key(kwargs))
    if key not in _LAYER_APPLY:

        def apply(args, x_TxD):
            return module.apply(args, x_TxD[None], **kwargs)[0]

        _LAYER_APPLY[key] = apply
    return BoundFn(_LAYER_APPLY[key], variables)


def _lm_apply(model: nn.Module):
    """apply((variables, tokens (T,)), embeddings (T, D)) = logits (T, V) of ``model``."""
    if model not in _LM_APPLY:

        def apply(args, x_TxD):
            variables, tokens_T = args

            def swap_embedding(next_fun, a, kw, context):
                if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
                    return x_TxD[None].astype(context.module.dtype or x_TxD.dtype)
                return next_fun(*a, **kw)

            with nn.intercept_methods(swap_embedding):
                return model.apply(variables, jnp.asarray(tokens_T, jnp.int32)[None])[0]

        _LM_APPLY[model] = apply
    return _LM_APPLY[model]


def lm_fn(model: nn.Module, variables, tokens_T):
    """(fn, x0) for a whole SessaLM: fn(embeddings (T, D)) = logits (T, V), x0 = embed(tokens).

    The model runs on ``tokens_T`` with its embedding lookup replaced by fn's argument,
    so influence is measured from the embedding sequence to the logits. ``fn`` is a
    ``BoundFn`` carrying (variables, tokens): other tokens or parameters of the same shapes
    reuse its compiled influence.
    """
    variables = nn.meta.unbox(variables)
    tokens_T = jnp.asarray(tokens_T, jnp.int32)
    x0 = model.apply(variables, tokens_T[None], method=lambda m, tok: m.embed(tok))[0]
    return BoundFn(_lm_apply(model), (variables, tokens_T)), x0


def lm_influence(model: nn.Module, variables, tokens_BxT, targets_BxN, *, target_chunk: int = 8) -> np.ndarray:
    """(B, N, T) float64: influence of every input embedding on the logits at ``targets``, per example.

    Example b reads ``tokens_BxT[b]``; targets_BxN[b] are its target positions. One compiled
    program per (model, shapes), vmapped over the B examples.
    """
    variables = nn.meta.unbox(variables)
    tokens = jnp.asarray(tokens_BxT, jnp.int32)
    x0 = model.apply(variables, tokens, method=lambda m, tok: m.embed(tok))
    return influence_batch(_lm_apply(model), variables, tokens, x0, targets_BxN, target_chunk=target_chunk)


# --------------------------------------------------------------------------------------
# Constructions with known influence (single-head mixers, float32 unless asked)
# --------------------------------------------------------------------------------------
def _with(params, updates: dict):
    """Copy of a params dict with '/'-separated paths set to the given values (shapes kept)."""
    out = jax.tree_util.tree_map(lambda v: v, params)
    for path, value in updates.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = jnp.broadcast_to(jnp.asarray(value, node[leaf].dtype), node[leaf].shape)
    return out


def _init(module, d_model: int, t_len: int, seed: int):
    x = jnp.zeros((1, t_len, d_model), module.config.dtype)
    return nn.meta.unbox(module.init(jax.random.PRNGKey(seed), x))["params"]


def gamma_bias_for(gamma: float, gamma_max: float) -> float:
    """The gamma_bias c with gamma_max * tanh(c) = gamma (gamma_ctx zero)."""
    if not 0 <= gamma < gamma_max:
        raise ValueError(f"need 0 <= gamma < gamma_max; got gamma={gamma}, gamma_max={gamma_max}")
    return math.atanh(gamma / gamma_max)


def uniform_mixer(
    kind: str, d_model: int = 8, *, gamma: float = 0.5, decay: float = 0.95, dtype=jnp.float32, seed: int = 0
):
    """(module, variables) of a single-head mixer with diffuse, input-independent routing.

    "sessa": forward attention uniform over 0..t (q = k = 0, v = identity), feedback
    uniform over the strict past (q_b = k_b = 0) and constant gamma: the influence of
    x_0 on s_t is sqrt(D) * g_t with g_t = 1/(t+1) + gamma/t * sum_{tau<t} g_tau
    (``sessa_uniform_closed_form``), a t^-(1 - gamma) power law.
    "transformer": the same forward attention alone: influence sqrt(D) / (t + 1).
    "mamba": the selective SSM with constant step dt and A = -1, so every state decays
    by ``decay`` per step: for an input constant in time the influence is c * decay^t.
    """
    from sessa_jax.layer import mixer_class

    cfg = SessaConfig(d_model=d_model, n_heads=1, rope=False, dtype=dtype, param_dtype=dtype)
    module = mixer_class(kind)(cfg)
    params = _init(module, d_model, 4, seed)
    eye = jnp.eye(d_model, dtype=dtype)
    if kind in ("sessa", "transformer"):
        upd = {
            "q_proj/kernel": 0.0,
            "q_proj/bias": 0.0,
            "k_proj/kernel": 0.0,
            "k_proj/bias": 0.0,
            "v_proj/kernel": eye,
            "v_proj/bias": 0.0,
        }
        if kind == "sessa":
            upd.update(
                {
                    "proj_fb/kernel": 0.0,
                    "proj_fb/bias": 0.0,
                    "gamma_ctx/kernel": 0.0,
                    "gamma_bias": gamma_bias_for(gamma, cfg.gamma_max),
                }
            )
    elif kind == "mamba":
        if not 0 < decay < 1:
            raise ValueError(f"decay must lie in (0, 1); got {decay}")
        dt = -math.log(decay)  # exp(dt * A) with A = -1
        conv = jnp.zeros(params["conv_kernel"].shape, dtype).at[-1].set(1.0)  # current step only
        upd = {
            "conv_kernel": conv,
            "conv_bias": 0.0,
            "dt_proj/kernel": 0.0,
            "dt_proj/bias": dt + math.log(-math.expm1(-dt)),
            "A_log": 0.0,
        }
    else:
        raise ValueError(f"unknown kind {kind!r}; choose 'sessa', 'transformer' or 'mamba'")
    return module, {"params": _with(params, upd)}


def sessa_uniform_closed_form(gamma: float, t_len: int, source: int = 0) -> np.ndarray:
    """g_t, t < t_len: d s_t / d x_source = g_t * I for ``uniform_mixer('sessa')`` (float64).

    (I - gamma A) s = M x with M[t, tau] = 1/(t+1) (tau <= t) and A[t, tau] = 1/t
    (tau < t) gives g_t = [t >= source]/(t+1) + gamma/t * sum_{tau<t} g_tau (g_0 = 1 when
    source = 0). The Transformer's (forward branch alone) is [t >= source]/(t+1), so the
    ratio Sessa / Transformer at t is about (t / source)^gamma for a source in the middle,
    not the (t+1) g_t of source 0.
    """
    if not 0 <= source < t_len:
        raise ValueError(f"source must lie in [0, t_len={t_len}); got {source}")
    g = np.zeros(t_len)
    running = 0.0
    for t in range(t_len):
        g[t] = (1.0 / (t + 1) if t >= source else 0.0) + (gamma / t * running if t > 0 else 0.0)
        running += g[t]
    return g


def selective_mixer(
    d_model: int = 16,
    *,
    gamma: float = 0.999,
    route_logit: float = 40.0,
    local_gain: float = 20.0,
    dtype=jnp.float32,
    seed: int = 0,
):
    """(module, variables): a Sessa mixer whose feedback carries a marked token's state forward.

    The anchor is any token whose input has x[0] = 1 (all others x[0] = 0; see
    ``marker_input``). Feedback keys read that feature, k_b[tau] = x_tau[0] * e_0, and the
    query is a constant, so every later row's logits are ``route_logit`` at the anchor and
    0 elsewhere: A[t, anchor] = 1 - O(t e^-route_logit). gamma is constant (gamma_max 0.9999). The forward
    branch is near-local: RoPE with constant
    q = k = ``local_gain`` makes each token attend to itself, so f_t ~ x_t. Hence for
    t > anchor, s_t ~ x_t + gamma * s_anchor and d s_t / d x_anchor ~ gamma * I at every
    distance: the influence does not decay.
    """
    from sessa_jax.mixer import SessaMixer

    gamma_max = 0.9999
    cfg = SessaConfig(d_model=d_model, n_heads=1, rope=True, gamma_max=gamma_max, dtype=dtype, param_dtype=dtype)
    module = SessaMixer(cfg)
    params = _init(module, d_model, 4, seed)
    fb_kernel = jnp.zeros((d_model, 2 * d_model), dtype).at[0, d_model].set(1.0)  # k_b[0] = x[0]
    fb_bias = jnp.zeros((2 * d_model,), dtype).at[0].set(route_logit * math.sqrt(d_model))  # q_b
    params = _with(
        params,
        {
            "q_proj/kernel": 0.0,
            "q_proj/bias": local_gain,
            "k_proj/kernel": 0.0,
            "k_proj/bias": local_gain,
            "v_proj/kernel": jnp.eye(d_model, dtype=dtype),
            "v_proj/bias": 0.0,
            "proj_fb/kernel": fb_kernel,
            "proj_fb/bias": fb_bias,
            "gamma_ctx/kernel": 0.0,
            "gamma_bias": gamma_bias_for(gamma, gamma_max),
        },
    )
    return module, {"params": params}


def marker_input(t_len: int, d_model: int, anchor: int = 0, seed: int = 0, dtype=jnp.float32):
    """Seeded normal input (T, D) with feature 0 equal to 1 at ``anchor`` and 0 elsewhere."""
    x = jax.random.normal(jax.random.PRNGKey(seed), (t_len, d_model), dtype)
    return x.at[:, 0].set(0.0).at[anchor, 0].set(1.0)


def constant_input(t_len: int, d_model: int, seed: int = 0, dtype=jnp.float32):
    """One seeded normal vector repeated at every position (T, D): no position-dependent content."""
    return jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(seed), (d_model,), dtype), (t_len, d_model))


# --------------------------------------------------------------------------------------
# The measured memory tails (figure of docs/influence.png, notebook 02)
# --------------------------------------------------------------------------------------
def memory_tails(
    max_lag: int = 2048,
    d_model: int = 8,
    num_lags: int = 20,
    gamma: float = 0.5,
    decay: float = 0.98,
    anchor: int = 16,
    fit_from: int = 32,
) -> dict:
    """Influence vs lag for the four constructions, with their fits.

    Returns {name: dict(lags, influence, fit, label)}: "sessa" (uniform routing, constant
    ``gamma``; power-law fit), "transformer" (uniform attention; power-law fit), "mamba"
    (constant ``decay``; log-linear fit) and "selective" (``selective_mixer`` with its
    anchor at ``anchor``; power-law fit, slope ~ 0). Fits use lags >= ``fit_from``.
    """
    lags = log_lags(max_lag, num_lags)
    tail = lags >= min(fit_from, max_lag)
    out = {}
    for kind in ("sessa", "transformer", "mamba"):
        module, variables = uniform_mixer(kind, d_model, gamma=gamma, decay=decay)
        prof = lag_profile(layer_fn(module, variables), constant_input(max_lag + 1, d_model), lags)
        if kind == "mamba":
            fit = fit_exponential(lags[tail], prof[tail])
            label = f"Mamba-style, decay {decay}: exp fit rate {fit.slope:.4f}/step (R$^2$ {fit.r2:.3f})"
        else:
            fit = fit_power_law(lags[tail], prof[tail])
            name = f"Sessa, uniform routing, $\\gamma$={gamma}" if kind == "sessa" else "Transformer, uniform"
            label = f"{name}: slope {fit.slope:.3f}"
        out[kind] = dict(lags=lags, influence=prof, fit=fit, label=label)
    module, variables = selective_mixer(d_model)
    x = marker_input(anchor + max_lag + 1, d_model, anchor=anchor)
    prof = lag_profile(layer_fn(module, variables), x, lags, source=anchor)
    fit = fit_power_law(lags[tail], prof[tail])
    out["selective"] = dict(
        lags=lags, influence=prof, fit=fit, label=f"Sessa, selective feedback to one token: slope {fit.slope:.3f}"
    )
    return out


def plot_memory_tails(tails: dict, path: str | None = None):
    """Log-log influence vs lag with fitted slopes in the legend; saves to ``path`` if given."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = dict(sessa="o-", transformer="s-", mamba="^-", selective="D-")
    for name, c in tails.items():
        ax.loglog(c["lags"], c["influence"], styles.get(name, "o-"), ms=4, label=c["label"])
    ax.set_xlabel("lag l = t - $\\tau$")
    ax.set_ylabel("$\\|\\partial y_t / \\partial x_\\tau\\|_F$")
    ax.set_title(
        "Hand-set weights, one layer, source at position 0 (lag = target position):\n"
        "the shapes these mixers can produce, not what trained models do",
        fontsize=9,
    )
    lows = [c["influence"].min() for c in tails.values()]
    ax.set_ylim(max(min(lows), 1e-12) / 2, None)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


# --------------------------------------------------------------------------------------
# Small long-context comparison with the package's training loop (notebook 03)
# --------------------------------------------------------------------------------------
def mqar_run_config(
    kind: str,
    seq_len: int,
    steps: int,
    *,
    d_model: int = 32,
    n_heads: int = 2,
    n_layers: int = 2,
    batch_size: int = 16,
    vocab_size: int = 32,
    num_kv_pairs: int = 4,
    lr: float = 3e-3,
    eval_batches: int = 4,
    seed: int = 0,
):
    """A run config: ``kind`` on MQAR at ``seq_len``; baselines width-matched to Sessa's parameters."""
    from sessa_jax.train.config import base_config, validate

    c = base_config()
    c.model.update(
        kind=kind,
        match_params=kind != "sessa",
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        chunk_size=min(64, seq_len),
        max_len=seq_len,
    )
    c.data.update(task="mqar", seq_len=seq_len, batch_size=batch_size, seed=seed)
    c.data.mqar.update(vocab_size=vocab_size, num_kv_pairs=num_kv_pairs)
    c.optim.update(lr=lr, warmup_steps=max(1, steps // 10))
    c.train.update(steps=steps, seed=seed, log_every=max(1, steps // 10), eval_batches=eval_batches, progress=False)
    c.checkpoint.update(every=0, async_save=False)
    validate(c)
    return c


def compare_on_lengths(kinds, seq_lens, steps: int, workdir: str, log=print, **config_kw) -> list[dict]:
    """Trains every kind at every length (``train.loop.train``); one row per run.

    Row: kind, seq_len, d_model, params, losses (per step), eval_accuracy (answers only),
    eval_loss, seconds. Runs go to ``workdir/<kind>_T<seq_len>``.
    """
    import os

    from sessa_jax.baselines import count_params
    from sessa_jax.train import loop
    from sessa_jax.train.config import model_config
    from sessa_jax.train.metrics import read_jsonl

    rows = []
    for seq_len in seq_lens:
        for kind in kinds:
            cfg = mqar_run_config(kind, seq_len, steps, **config_kw)
            run_dir = os.path.join(workdir, f"{kind}_T{seq_len}")
            result = loop.train(cfg, run_dir, log=lambda s: None)
            model_cfg = model_config(cfg)
            losses = [r["loss"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]
            rows.append(
                dict(
                    kind=kind,
                    seq_len=seq_len,
                    d_model=model_cfg.d_model,
                    params=count_params(model_cfg, kind),
                    losses=losses,
                    eval_accuracy=result.eval.get("eval_accuracy", float("nan")),
                    eval_loss=result.eval.get("eval_loss", float("nan")),
                    seconds=result.seconds,
                )
            )
            log(
                f"{kind:>11} T={seq_len:<4} params {rows[-1]['params']:>7,} | final loss {losses[-1]:.3f} | "
                f"eval acc {rows[-1]['eval_accuracy']:.3f} | {result.seconds:.0f}s"
            )
    return rows


def comparison_table(rows: list[dict]) -> str:
    """Markdown table of ``compare_on_lengths`` rows."""
    lines = [
        "| kind | seq_len | d_model | params | final train loss | eval acc (answers) | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['seq_len']} | {r['d_model']} | {r['params']:,} | {r['losses'][-1]:.3f} "
            f"| {r['eval_accuracy']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)
