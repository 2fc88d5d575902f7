"""Seq2seq decoding for jaxformer.models.encdec.EncoderDecoder: greedy and beam search, batched.

The encoder runs once per batch and each decoder layer's cross-attention keys/values (and a copy
head's keys) are projected once; the decoder then takes one token per step against a KVCache
(jaxformer.models.cache), so a step costs one token's work. Both loops are one jitted lax.while_loop
that ends when every row is done.

Beam search (batched over B sources x K beams) keeps K alive hypotheses and a pool of K finished
ones per source. Each step takes the top 2K extensions of the alive beams; an EOS among the top K
of them finishes a hypothesis (so beam size 1 is exactly greedy), the best K non-EOS ones stay alive
and the cache rows follow their parents. Finished scores are sum(log p) / length ** length_penalty
(length counts generated tokens, EOS included). A source is done when its pool is full and no alive
beam can still beat the pool's worst (its log-prob over max_len ** length_penalty is an upper
bound), or at once with early_stopping. At max_len, unfinished beams join the pool by the same score.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.models.cache import KVCache

DEAD = -1e9  # log-prob of an empty beam slot (finite: arithmetic on it stays NaN-free)


@dataclasses.dataclass(frozen=True)
class BeamResult:
    tokens: np.ndarray  # [B, K, L] int32: generated tokens, EOS included, pad after it
    scores: np.ndarray  # [B, K] float32, sorted descending: logprobs / length ** length_penalty (-inf: no hypothesis)
    logprobs: np.ndarray  # [B, K] float32: sum of the tokens' log-probabilities


def _prepare(model, src, src_mask, max_len: int):
    cfg = model.config
    src = jnp.asarray(src, jnp.int32)
    src_mask = jnp.ones(src.shape, jnp.int32) if src_mask is None else jnp.asarray(src_mask, jnp.int32)
    if not 1 <= max_len <= cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} must be in [1, max_seq_len={cfg.max_seq_len}]")
    return src, src_mask


def greedy_decode(model, src, src_mask=None, *, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [B, max_len] (EOS included, pad after it) and their summed log-probabilities [B]."""
    src, src_mask = _prepare(model, src, src_mask, max_len)
    graphdef, state = nnx.split(model)
    tokens, logprobs = _greedy(graphdef, state, src, src_mask, max_len)
    return np.asarray(tokens), np.asarray(logprobs)


def beam_search(model, src, src_mask=None, *, beam_size: int, max_len: int, length_penalty: float = 1.0,
                early_stopping: bool = False) -> BeamResult:
    """The beam_size best hypotheses per source, best first (see the module docstring)."""
    if beam_size < 1 or length_penalty < 0:
        raise ValueError(f"need beam_size >= 1 and length_penalty >= 0, got {beam_size}, {length_penalty}")
    src, src_mask = _prepare(model, src, src_mask, max_len)
    graphdef, state = nnx.split(model)
    tokens, scores, logprobs = _beam(graphdef, state, src, src_mask, beam_size, max_len, float(length_penalty),
                                     bool(early_stopping))
    scores = np.where(np.asarray(scores) <= DEAD / 2, -np.inf, np.asarray(scores))
    return BeamResult(np.asarray(tokens), scores.astype(np.float32), np.asarray(logprobs))


def strip(tokens, eos_id: int) -> list[int]:
    """Generated ids up to (not including) the first EOS."""
    out = []
    for t in np.asarray(tokens).tolist():
        if t == eos_id:
            break
        out.append(t)
    return out


def _start(model, src, src_mask, rows_per_source: int, max_len: int):
    """Encoder once, what the decoder reads of the source once (repeated per beam), an empty decoder cache."""
    memory = model.encode(src, src_mask)  # [B, S, D]
    if rows_per_source > 1:
        memory = jnp.repeat(memory, rows_per_source, axis=0)  # [B*K, S, D]
        src = jnp.repeat(src, rows_per_source, axis=0)
        src_mask = jnp.repeat(src_mask, rows_per_source, axis=0)
    cache = KVCache.init(model.config, memory.shape[0], max_len)
    return model.source(memory, src, src_mask), cache


@functools.partial(jax.jit, static_argnums=(0, 4))
def _greedy(graphdef, state, src, src_mask, max_len: int):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    B = src.shape[0]
    source, cache = _start(model, src, src_mask, 1, max_len)

    def cond(c):
        t, _, _, _, _, done = c
        return (t < max_len) & ~jnp.all(done)

    def body(c):
        t, tok, cache, out, logprob, done = c
        logits, cache = model.extend(tok[:, None], source, cache)  # [B, 1, V]
        logp = jax.nn.log_softmax(logits[:, 0], axis=-1)  # [B, V]
        nxt = jnp.where(done, cfg.pad_id, jnp.argmax(logp, axis=-1).astype(jnp.int32))
        logprob = logprob + jnp.where(done, 0.0, jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0])
        out = out.at[:, t].set(nxt)
        return t + 1, nxt, cache, out, logprob, done | (nxt == cfg.eos_id)

    init = (jnp.int32(0), jnp.full((B,), cfg.decoder_start_id, jnp.int32), cache,
            jnp.full((B, max_len), cfg.pad_id, jnp.int32), jnp.zeros((B,), jnp.float32), jnp.zeros((B,), bool))
    _, _, _, out, logprob, _ = jax.lax.while_loop(cond, body, init)
    return out, logprob


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _beam(graphdef, state, src, src_mask, K: int, L: int, alpha: float, early_stopping: bool):
    model = nnx.merge(graphdef, state)
    cfg = model.config
    B = src.shape[0]
    source, cache = _start(model, src, src_mask, K, L)
    lp = lambda n: jnp.asarray(n, jnp.float32) ** alpha  # noqa: E731 - the length penalty
    rank = jnp.arange(2 * K)[None, :]  # [1, 2K]
    bidx = jnp.arange(B)[:, None]  # [B, 1]

    def take(x, idx):  # per-source gather along the beam axis: x [B, M, ...], idx [B, N] -> [B, N, ...]
        return x[bidx, idx]

    def merge(pool_scores, pool_seqs, pool_lp, scores, seqs, lps):  # keep the K best by score
        s = jnp.concatenate([pool_scores, scores], axis=1)
        best = jax.lax.top_k(s, K)[1]  # [B, K], descending
        return (take(s, best), take(jnp.concatenate([pool_seqs, seqs], axis=1), best),
                take(jnp.concatenate([pool_lp, lps], axis=1), best))

    def cond(c):
        return (c["t"] < L) & ~jnp.all(c["done"])

    def body(c):
        t = c["t"]
        logits, cache = model.extend(c["tok"].reshape(B * K, 1), source, c["cache"])
        V = logits.shape[-1]
        logp = jax.nn.log_softmax(logits[:, 0], axis=-1).reshape(B, K, V)
        cand = (c["alive_lp"][:, :, None] + logp).reshape(B, K * V)
        top_lp, top_i = jax.lax.top_k(cand, 2 * K)  # [B, 2K], best first
        parent, token = top_i // V, (top_i % V).astype(jnp.int32)
        seqs = take(c["alive_seq"], parent).at[:, :, t].set(token)  # [B, 2K, L]
        valid = top_lp > DEAD / 2
        is_eos = token == cfg.eos_id
        # an EOS among the top K candidates finishes its hypothesis
        finished = is_eos & valid & (rank < K) & ~c["done"][:, None]
        fin_scores = jnp.where(finished, top_lp / lp(t + 1), DEAD)
        fin = merge(c["fin_score"], c["fin_seq"], c["fin_lp"], fin_scores, seqs, jnp.where(finished, top_lp, DEAD))
        # the K best non-EOS candidates stay alive; their cache rows are their parents'
        alive_lp, keep = jax.lax.top_k(jnp.where(is_eos | ~valid, DEAD, top_lp), K)  # [B, K]
        rows = (bidx * K + take(parent, keep)).reshape(-1)  # [B*K]
        cache = cache.replace(k=tuple(x[rows] for x in cache.k), v=tuple(x[rows] for x in cache.v))
        full = fin[0][:, K - 1] > DEAD / 2
        can_improve = alive_lp[:, 0] / lp(L) > fin[0][:, K - 1]
        done = c["done"] | (full & (early_stopping | ~can_improve))
        return dict(t=t + 1, tok=take(token, keep), cache=cache, alive_seq=take(seqs, keep), alive_lp=alive_lp,
                    fin_score=fin[0], fin_seq=fin[1], fin_lp=fin[2], done=done)

    init = dict(t=jnp.int32(0), tok=jnp.full((B, K), cfg.decoder_start_id, jnp.int32), cache=cache,
                alive_seq=jnp.full((B, K, L), cfg.pad_id, jnp.int32),
                alive_lp=jnp.full((B, K), DEAD, jnp.float32).at[:, 0].set(0.0),  # one live beam at the start
                fin_score=jnp.full((B, K), DEAD, jnp.float32), fin_seq=jnp.full((B, K, L), cfg.pad_id, jnp.int32),
                fin_lp=jnp.full((B, K), DEAD, jnp.float32), done=jnp.zeros((B,), bool))
    c = jax.lax.while_loop(cond, body, init)
    # sources still searching at max_len: their alive beams compete with the pool as they stand
    live = ~c["done"][:, None] & (c["alive_lp"] > DEAD / 2)
    scores, seqs, lps = merge(c["fin_score"], c["fin_seq"], c["fin_lp"],
                              jnp.where(live, c["alive_lp"] / lp(L), DEAD), c["alive_seq"],
                              jnp.where(live, c["alive_lp"], DEAD))
    return seqs, scores, lps
