"""AdamW with warmup + cosine/linear/constant schedules and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax

from jaxformer.config import TrainConfig


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to cfg.lr, then cosine / linear decay to lr * min_lr_ratio, or constant."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    final = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(cfg.steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, final, decay_steps)
    else:
        after = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def path_names(path) -> list[str]:
    """Parameter path as names; nnx Variables add a trailing 'value' attribute, dropped here."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return names[:-1] if names and names[-1] == "value" else names


def decay_mask(params):
    """True for matrices that get weight decay: every 2-D weight except embedding tables, and the stacked
    [E, out, in] expert matrices of a Mixture of Experts (`mlp.experts.{gate,up,down}_proj`)."""
    def decide(path, x):
        names = path_names(path)
        is_embedding = any(n.startswith("embed_") for n in names)
        is_matrix = names[-1] == "weight" or (len(names) > 1 and names[-2] == "experts")
        return x.ndim >= 2 and is_matrix and not is_embedding
    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW (decoupled decay on matrices only), lr from the schedule."""
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip else adamw
