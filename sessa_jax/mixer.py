"""Sessa mixer (docs/design.md, "The layer") and the attention-only mixer used by the Transformer baseline.

Parameter names follow the published PyTorch layer (q_proj, k_proj, v_proj, out_proj,
proj_fb, gamma_ctx, gamma_bias) so checkpoints convert by name.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sessa_jax.cache import check_layer_cache
from sessa_jax.config import SessaConfig
from sessa_jax.ops import apply_rope, causal_attention, feedback_solve
from sessa_jax.ops.decode import attend_cached, feedback_read_cached
from sessa_jax.ops.rope import resolve_positions
from sessa_jax.options import ATTENTION_OF_SOLVE
from sessa_jax.sharding import DEFAULT_AXES, ActivationAxes, constrain, dense_init, logical, sharding_agnostic
from sessa_jax.split_dense import SplitDense


def _wide(dtype):
    """Accumulation dtype: float32, or wider when the compute dtype is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def write_cache(cache, index, **entries):
    """Writes each (B, n, ...) entry at time ``index`` of the matching (B, L, ...) cache buffer."""
    out = dict(cache)
    for name, value in entries.items():
        buf = cache[name]
        out[name] = jax.lax.dynamic_update_slice_in_dim(buf, value.astype(buf.dtype), index, axis=1)
    return out


class AttentionMixer(nn.Module):
    """Causal multi-head (GQA) attention with interleaved RoPE: Sessa's forward branch.

    Alone it is the Transformer baseline's mixer; SessaMixer extends it with feedback.
    Input a_bar (B, T, D) -> f (B, T, D) in the compute dtype. ``axes`` names the logical
    axes of the activations (``sessa_jax.sharding.ActivationAxes``).
    """

    config: SessaConfig
    axes: ActivationAxes = DEFAULT_AXES

    def setup(self):
        cfg = self.config
        dense = functools.partial(nn.Dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.q_proj = dense(cfg.n_heads * cfg.head_dim, **dense_init("embed", "heads"))
        self.k_proj = dense(cfg.kv_heads * cfg.head_dim, **dense_init("embed", "kv_heads"))
        self.v_proj = dense(cfg.kv_heads * cfg.head_dim, **dense_init("embed", "kv_heads"))
        if cfg.n_heads > 1:
            self.out_proj = dense(cfg.d_model, use_bias=False, **dense_init("heads", "embed"))

    def project_qkv(self, a_bar, positions):
        """q (B,T,H,K), k/v (B,T,Hkv,K), RoPE applied at ``positions`` (B,T) when enabled."""
        cfg = self.config
        b, t, _ = a_bar.shape
        q = self.q_proj(a_bar).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = self.k_proj(a_bar).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        v = self.v_proj(a_bar).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        if cfg.rope:
            q = apply_rope(q, positions, cfg.rope_base)
            k = apply_rope(k, positions, cfg.rope_base)
        return constrain(q, self.axes.bthk), constrain(k, self.axes.btkv), constrain(v, self.axes.btkv)

    def merge_heads(self, o):
        """(B, T, H, K) -> (B, T, D), through out_proj when H > 1."""
        b, t = o.shape[:2]
        o = o.reshape(b, t, self.config.d_model).astype(self.config.dtype)
        return self.out_proj(o) if self.config.n_heads > 1 else o

    def forward_branch(self, a_bar, segment_ids, positions):
        """f = W_o attn(q_f, k_f, v_f) plus the roped k, v (for the decode cache)."""
        cfg = self.config
        positions = resolve_positions(segment_ids, positions, *a_bar.shape[:2])
        q, k, v = self.project_qkv(a_bar, positions)
        attend = lambda q, k, v, seg: causal_attention(  # noqa: E731
            q, k, v, segment_ids=seg, method=ATTENTION_OF_SOLVE[cfg.solver], chunk_size=cfg.chunk_size
        )
        o = sharding_agnostic(attend, q)(q, k, v, segment_ids)
        return constrain(self.merge_heads(constrain(o, self.axes.bthk)), self.axes.btw), k, v

    def __call__(self, a_bar, segment_ids=None, positions=None):
        return self.forward_branch(a_bar, segment_ids, positions)[0]


class SessaMixer(AttentionMixer):
    """The Sessa mixer: forward attention f, then s = (I - diag(gamma) A)^-1 f.

    ``__call__(a_bar (B,T,D), segment_ids, positions)`` -> s (B,T,D). With ``cache`` (a
    dict from ``decoding.init_layer_cache``) it also fills the cache from position 0 and
    returns (s, cache); with ``decode=True`` a_bar is one token (B,1,D) appended at
    cache['index'] (RoPE at ``positions`` when given, else at cache['index']). A step
    past the end of the cache returns NaN.
    """

    def setup(self):
        super().setup()
        cfg = self.config
        # q_b and k_b as two products of proj_fb's column halves: no split and concatenation
        # of a (B, T, 2D) array around them. k_b's half of the bias is not added: it shifts every
        # logit of row t by the same q_b[t] . bias_k, which the softmax over tau removes (k_b
        # enters nothing else), so the layer computes the same function without a pass over k_b
        # and without a gradient of rounding noise for that half (docs/design.md, "The layer").
        self.proj_fb = SplitDense(
            2 * cfg.d_model,
            2,
            unbiased_parts=(1,),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            **dense_init("embed", "mlp"),
        )
        # gamma is computed in float32 (or wider): it sets the memory decay of the solve.
        self.gamma_ctx = nn.Dense(
            1,
            use_bias=False,
            dtype=_wide(cfg.dtype),
            param_dtype=cfg.param_dtype,
            kernel_init=logical(nn.initializers.normal(stddev=cfg.d_model**-0.5), ("embed", None)),
        )
        self.gamma_bias = self.param("gamma_bias", logical(nn.initializers.constant(1.0), ()), (), cfg.param_dtype)

    def feedback_inputs(self, a_bar):
        """q_b, k_b (B,T,D) in the compute dtype and gamma (B,T) in float32 or wider."""
        cfg = self.config
        wide = _wide(cfg.dtype)
        gamma = cfg.gamma_max * jnp.tanh(self.gamma_bias.astype(wide) + self.gamma_ctx(a_bar.astype(wide))[..., 0])
        q_b, k_b = (constrain(z, self.axes.btw) for z in self.proj_fb(a_bar))
        return q_b, k_b, gamma

    def __call__(self, a_bar, segment_ids=None, positions=None, cache=None, decode=False):
        """s = (I - diag(gamma) A)^-1 f: f the forward branch's attention of a_bar, A the
        strict-past softmax of q_b k_b^T, gamma = gamma_max tanh(w . a_bar + b)."""
        if cache is not None or decode:
            check_layer_cache(cache, self.config, a_bar.shape[0], 0 if decode else a_bar.shape[1])
        if decode:
            return self._decode(a_bar, cache, positions)
        cfg = self.config
        # The feedback inputs first, gamma first among them: a_bar's cotangents are then summed with
        # gamma's broadcast term last, and XLA's GPU compiler adds the five projections' products
        # in one GEMM's epilogue instead of a pass of its own (docs/performance.md)
        q_b, k_b, gamma = self.feedback_inputs(a_bar)
        f, k, v = self.forward_branch(a_bar, segment_ids, positions)
        solve = lambda q_b, k_b, gamma, f, seg: feedback_solve(  # noqa: E731
            q_b,
            k_b,
            gamma,
            f,
            segment_ids=seg,
            method=cfg.solver,
            chunk_size=cfg.chunk_size,
            leaf_size=cfg.leaf_size,
            precision=cfg.feedback_precision,
            kernels=cfg.feedback_kernels,
        )
        s = sharding_agnostic(solve, f)(q_b, k_b, gamma, f, segment_ids)
        s = constrain(s, self.axes.btw)  # the solve is independent per width column: s stays split over D
        if cache is None:
            return s
        n = a_bar.shape[1]
        cache = write_cache(cache, 0, k_f=k, v_f=v, k_b=k_b, s=s)
        cache["index"] = jnp.asarray(n, jnp.int32)
        return s, cache

    def _decode(self, a_bar, cache, positions=None):
        index = cache["index"]
        if positions is None:
            positions = jnp.full(a_bar.shape[:2], index, jnp.int32)
        q, k, v = self.project_qkv(a_bar, positions)
        cache = write_cache(cache, index, k_f=k, v_f=v)
        f = self.merge_heads(attend_cached(q, cache["k_f"], cache["v_f"], index))
        q_b, k_b, gamma = self.feedback_inputs(a_bar)
        r = feedback_read_cached(q_b, cache["k_b"], cache["s"], index)
        s_wide = f.astype(r.dtype) + gamma[..., None].astype(r.dtype) * r
        # A step past the end of the cache cannot raise under jit (decoding.decode_step raises
        # eagerly); the writes below would clamp onto the last position, so poison the result.
        s_wide = jnp.where(index < cache["k_f"].shape[1], s_wide, jnp.nan)
        cache = write_cache(cache, index, k_b=k_b, s=s_wide)
        cache["index"] = index + 1
        return s_wide.astype(f.dtype), cache
