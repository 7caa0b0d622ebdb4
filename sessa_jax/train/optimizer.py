"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax


def decay_mask(params):
    """True for weight matrices: ndim >= 2 and not an embedding table.

    LayerNorm scales/biases, all biases, scalars and embeddings are not decayed.
    """
    def keep(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return x.ndim >= 2 and not any("embed" in n for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """0 -> lr over ``warmup_steps``, then cosine to ``lr * min_lr_ratio`` at ``total_steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
        decay_steps=max(total_steps, optim_cfg.warmup_steps + 1), end_value=optim_cfg.lr * optim_cfg.min_lr_ratio,
    )


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """The run's optimizer: clip (when clip_norm > 0) then masked AdamW."""
    adamw = optax.adamw(
        learning_rate_schedule(optim_cfg, total_steps), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay, mask=decay_mask,
    )
    if optim_cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adamw)
    return adamw
