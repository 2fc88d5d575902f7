"""Token-level losses: masked cross-entropy with an optional z-loss (PaLM, Chowdhery et al. 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None,
                       z_loss: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of CE over kept tokens, sum of z-loss over kept tokens, number kept); logits [B,T,V] float32.

    Sums, not means: gradient accumulation adds sums over micro-batches and divides once,
    which equals the full-batch token mean.
    """
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    mask = jnp.ones_like(ce) if mask is None else mask.astype(jnp.float32)
    z = jnp.zeros((), jnp.float32)
    if z_loss:
        z = z_loss * jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * mask)
    return jnp.sum(ce * mask), z, jnp.sum(mask)


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over kept tokens."""
    total, _, n = cross_entropy_sums(logits, targets, mask)
    return total / jnp.maximum(n, 1.0)


def label_smoothed_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                        smoothing: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of label-smoothed CE, sum of plain CE, number kept) over kept tokens; logits [B,T,V].

    Label smoothing (Szegedy et al. 2016; Vaswani et al. 2017 use 0.1) trains against
    (1 - eps) * one_hot + eps / V, i.e. (1 - eps) * CE + eps * mean_v(-log p_v), as torch's
    cross_entropy(label_smoothing=eps). The plain CE gives perplexity.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    smooth = lse - logits.mean(-1)  # mean over the vocabulary of -log p
    loss = (1.0 - smoothing) * nll + smoothing * smooth
    mask = mask.astype(jnp.float32)
    return jnp.sum(loss * mask), jnp.sum(nll * mask), jnp.sum(mask)


def load_balancing_loss(router_logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4-6) as transformers' load_balancing_loss_func.

    router_logits [L, N, E] of L sparse layers; mask [N] (1: a real token). E * sum_e f_e * P_e, where f_e is
    the fraction of top-k assignments and P_e the mean router probability of expert e, both over every
    layer's kept tokens (pooled, not averaged per layer). 1 * top_k when perfectly balanced.
    """
    L, N, E = router_logits.shape
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [L, N, E]
    _, idx = jax.lax.top_k(probs, top_k)  # [L, N, k]
    counts = jax.nn.one_hot(idx, E, dtype=jnp.float32).sum(-2)  # [L, N, E]
    m, rows = _kept_tokens(mask, L, N)
    f = jnp.einsum("lne,n->e", counts, m) / rows  # [E]
    p = jnp.einsum("lne,n->e", probs, m) / rows  # [E]
    return E * jnp.sum(f * p)


def router_z_loss(router_logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): mean over layers and kept tokens of logsumexp(logits)^2."""
    L, N, _ = router_logits.shape
    z = jnp.square(jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1))  # [L, N]
    m, rows = _kept_tokens(mask, L, N)
    return jnp.sum(z * m[None]) / rows


def _kept_tokens(mask: jax.Array | None, L: int, N: int) -> tuple[jax.Array, jax.Array]:
    """(mask [N] float32, all ones without one; L x the kept tokens (at least L)): the router losses' weights."""
    m = jnp.ones((N,), jnp.float32) if mask is None else mask.reshape(N).astype(jnp.float32)
    return m, L * jnp.maximum(m.sum(), 1.0)
