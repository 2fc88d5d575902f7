"""Speculative decoding: K drafted tokens per row, checked by the target model in one call (Leviathan, Kalman,
Matias 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating
Large Language Model Decoding with Speculative Sampling").

`verify_step` feeds each row's newest token and its drafts d_0..d_{n-1} [B, 1 + K] at once. Draft i is kept
while every draft before it was: greedy rows keep it when it is the target's argmax there; sampled rows keep it
with probability min(1, p_i(d_i) / q_i(d_i)), p the target's distribution after temperature / top-k / top-p and
q the drafter's. At the first draft not kept, the row draws from normalise(max(p - q, 0)) instead; with all n
kept, from p after the last one. Each row's tokens are then distributed as the target's own (the theorem of
both papers), and a greedy row's are the target's greedy tokens. A row with no drafts is a plain decode step
(`choose`: penalties, the same keys). Rows that ask for penalties get no drafts (their distribution would
change token by token); the host decides that (PagedBatcher).

Drafters (host side) propose up to K tokens per row:
  NgramDrafter  prompt lookup (Saxena 2023): the tokens that followed the latest earlier occurrence of the
                row's last n tokens (n = max_ngram .. 1); q is a point mass on each draft.
  ModelDrafter  (infer/draft_model.py) a smaller model with the same tokenizer, decoding K tokens on its own
                paged cache; q is its distribution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.infer.engine import RowSettings, Slots, choose
from jaxformer.infer.sampling import filter_top_k_top_p

DEFAULT_DRAFT_TOKENS = 4
MAX_NGRAM = 3


def target_probs(logits: jax.Array, s: RowSettings) -> jax.Array:
    """The distribution rows sample from: softmax of temperature-scaled, top-k / top-p filtered logits [B, T, V]
    (one-hot argmax for greedy rows)."""
    B, T, V = logits.shape
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), V, dtype=jnp.float32)

    def sampled():  # the sort of top-k / top-p only when some row samples
        t = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None, None]
        flat = (logits / t).reshape(B * T, V)
        filtered = filter_top_k_top_p(flat, jnp.repeat(s.top_k, T), jnp.repeat(s.top_p, T)).reshape(B, T, V)
        return jnp.where((s.temperature > 0)[:, None, None], jax.nn.softmax(filtered, axis=-1), greedy)

    return jax.lax.cond(jnp.any(s.temperature > 0), sampled, lambda: greedy)


def verify_step(model, slots: Slots, drafts: jax.Array, n_draft: jax.Array, q: jax.Array | None, active, *,
                n_top: int | None):
    """Feed [newest token, drafts [B, K]] for active rows and keep what the target accepts (module doc).

    q [B, K, V]: the drafter's distributions (None: point masses on the drafts). Returns the slots, with each
    row's cache and history grown by its n_emit tokens, and (tokens [B, K+1], n_emit [B], logprobs [B, K+1],
    top ids, top logprobs [B, K+1, n]): the accepted drafts then the row's own draw, n_emit = accepted + 1.
    """
    (B, S), K = slots.history.shape, drafts.shape[1]
    lengths, s = slots.cache.lengths, slots.settings
    last = jnp.take_along_axis(slots.history, jnp.minimum(lengths, S - 1)[:, None], axis=1)  # [B, 1]
    fed = jnp.concatenate([last, drafts], axis=1)  # [B, K+1]
    positions = jnp.where(active[:, None], lengths[:, None] + jnp.arange(K + 1)[None], 0)
    logits, cache = model.extend(fed, slots.cache, positions)  # [B, K+1, V]
    generated = lengths + 1 - slots.prompt_len  # tokens this row generated, the one being fed included
    plain = choose(logits[:, 0], slots.history, lengths + 1, slots.prompt_len, s, slots.keys, None)[0]  # [B]

    in_draft = jnp.arange(K)[None] < n_draft[:, None]  # [B, K]

    def greedy_only():  # every row greedy: keep drafts while they are the target's argmax, then its argmax
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, K+1]
        accepted = jnp.sum(jnp.cumprod((drafts == target[:, :K]) & in_draft, axis=1), axis=1)
        return accepted, jnp.take_along_axis(target, accepted[:, None], axis=1)[:, 0]

    def sampled():
        keys = jax.vmap(jax.random.fold_in)(slots.keys, generated)
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (K,)))(keys)  # [B, K]
        p = target_probs(logits, s)  # [B, K+1, V]
        V = p.shape[-1]
        q_ = jax.nn.one_hot(drafts, V, dtype=p.dtype) if q is None else q.astype(p.dtype)  # [B, K, V]
        q_ = q_ * in_draft[..., None]  # no draft there: the residual is p
        p_d = jnp.take_along_axis(p[:, :K], drafts[..., None], axis=-1)[..., 0]  # [B, K]
        q_d = jnp.take_along_axis(q_, drafts[..., None], axis=-1)[..., 0]
        kept = (u * q_d <= p_d) & (p_d > 0) & in_draft
        accepted = jnp.sum(jnp.cumprod(kept.astype(jnp.int32), axis=1), axis=1)  # [B] leading kept drafts
        at = accepted[:, None, None]
        p_a = jnp.take_along_axis(p, at, axis=1)[:, 0]  # [B, V]
        q_pad = jnp.concatenate([q_, jnp.zeros_like(q_[:, :1])], axis=1)  # past the last draft: 0 (p itself)
        residual = jnp.maximum(p_a - jnp.take_along_axis(q_pad, at, axis=1)[:, 0], 0.0)
        residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_a)  # p == q there: any draw of p
        drawn = jax.vmap(lambda k, r: jax.random.categorical(jax.random.fold_in(k, 2), jnp.log(r)))(keys, residual)
        greedy = jnp.argmax(jnp.take_along_axis(logits, at, axis=1)[:, 0], axis=-1).astype(jnp.int32)
        return accepted, jnp.where(s.temperature > 0, drawn.astype(jnp.int32), greedy)

    accepted, drawn = jax.lax.cond(jnp.any(s.temperature > 0), sampled, greedy_only)
    final = jnp.where(n_draft > 0, drawn, plain)  # [B]

    idx = jnp.arange(K + 1)[None]
    emitted = jnp.where(idx < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), final[:, None])  # [B, K+1]
    n_emit = jnp.where(active, accepted + 1, 0)
    cache = cache.replace(lengths=lengths + n_emit)
    write = jnp.where(idx < n_emit[:, None], lengths[:, None] + 1 + idx, S)  # S: dropped
    history = slots.history.at[jnp.arange(B)[:, None], write].set(emitted, mode="drop")
    slots = dataclasses.replace(slots, cache=cache.constrained(), history=history)
    if n_top is None:
        return slots, (emitted, n_emit)
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, K+1, V]: the model's own distribution, as choose reports
    chosen = jnp.take_along_axis(logp, emitted[..., None], axis=-1)[..., 0]
    if n_top == 0:
        return slots, (emitted, n_emit, chosen, jnp.zeros((B, K + 1, 0), jnp.int32),
                       jnp.zeros((B, K + 1, 0), jnp.float32))
    top_lp, top_ids = jax.lax.top_k(logp, n_top)
    return slots, (emitted, n_emit, chosen, top_ids.astype(jnp.int32), top_lp)


class NgramDrafter:
    """Prompt lookup: propose the tokens that followed the latest earlier occurrence of the last n tokens."""

    def __init__(self, k: int = DEFAULT_DRAFT_TOKENS, max_ngram: int = MAX_NGRAM):
        if k < 1 or max_ngram < 1:
            raise ValueError(f"need draft tokens >= 1 and max_ngram >= 1, got {k} and {max_ngram}")
        self.k, self.max_ngram = k, max_ngram

    def draft(self, rows: dict[int, tuple[list[int], int]], batch: int) -> tuple[np.ndarray, np.ndarray, None]:
        """Drafts [batch, k] and their counts [batch] for {row: (tokens so far, most drafts allowed)}; q: None
        (point masses)."""
        table, n = np.zeros((batch, self.k), np.int32), np.zeros(batch, np.int32)
        for r, (tokens, limit) in rows.items():
            d = self.propose(tokens, limit)
            table[r, :len(d)], n[r] = d, len(d)
        return table, n, None

    def verified(self, rows: dict[int, tuple[list[int], int]], n_emit: np.ndarray) -> None:
        """After the target's step (a drafter that keeps state follows the accepted tokens here)."""

    def release(self, row: int) -> None:
        """The row's sequence left."""

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to min(k, limit) drafts continuing `tokens` (prompt + generated so far), or [] with no match."""
        limit = min(self.k, limit)
        if limit < 1:
            return []
        arr = np.asarray(tokens)
        for n in range(min(self.max_ngram, len(arr) - 1), 0, -1):
            tail = arr[-n:]
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # every earlier n-gram's start
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start:start + limit].tolist()
        return []
