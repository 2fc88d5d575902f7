"""Encoder-decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need").

    logits = model(src_tokens [B, S], tgt_tokens [B, T], src_mask [B, S] | None)  # [B, T, V] float32

The encoder is bidirectional self-attention over the source (padding keys masked), the decoder causal
self-attention plus cross-attention over the encoder output. Every sublayer is residual: post-LN
`norm(x + f(x))` as in the paper (and Marian), or pre-LN `x + f(norm(x))` with a final norm per stack.
Attention, MLP and norms are the decoder-only model's own layers (jaxformer.models.attention / layers).

Padding: `src_mask` (1 = token, 0 = pad) masks source keys in the encoder's self-attention and in the
decoder's cross-attention; every query (a pad position's too) attends to the real source tokens, so outputs
stay finite and real positions never see pads. Targets are right-padded: the causal mask keeps real
positions from seeing them. Positions count from 0 in both streams.

Copying (`pointer_generator`, See et al. 2017): an optional head mixes the vocabulary softmax with a copy
distribution over the source's own tokens, so a summary can reuse the words an input holds (identifiers,
names) that a small model would never learn to generate from data alone; see PointerGenerator.

Decoding (jaxformer.seq2seq.beam) runs the encoder once, computes what the decoder reads of the source once
(`source`: each decoder layer's cross-attention keys and values, the copy head's keys), and feeds the
decoder one token at a time against a KVCache (`extend`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import EncDecConfig
from jaxformer.models.attention import Attention
from jaxformer.models.cache import CachedLogits, KVCache
from jaxformer.models.layers import MLP, Embed, Linear, make_norm, record, sinusoidal_positions
from jaxformer.sharding import constrain

ACT = ("batch", "seq", "act_embed")  # the residual stream's logical axes
CrossKV = tuple[tuple[jax.Array, jax.Array], ...]  # per decoder layer: (k, v) [B, S, K, H] of the encoder output
TINY = 1e-30  # floor of a pointer-generator probability before its log (float32 keeps it)


class Source(NamedTuple):
    """What the decoder reads of an encoded source, computed once per source (decoding reuses it every step)."""

    kv: CrossKV  # per decoder layer: cross-attention (k, v) [B, S, K, H]
    mask: jax.Array | None  # [B, S] 1 = token, 0 = pad; None: no padding
    tokens: jax.Array | None = None  # [B, S] source ids the copy head copies (None without one)
    memory: jax.Array | None = None  # [B, S, D] encoder output, the copy head's values
    copy_keys: jax.Array | None = None  # [B, S, D] the copy head's keys


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity without a key (evaluation) or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


class _Residual(nnx.Module):
    """Residual wiring of a sublayer f: `_pre` makes f's input, `_post` adds f's (dropped-out) output."""

    post_norm: bool
    rate: float

    def _pre(self, norm, x: jax.Array) -> jax.Array:
        return x if self.post_norm else norm(x)  # pre-LN: x + f(norm(x))

    def _post(self, norm, x: jax.Array, fx: jax.Array, key: jax.Array | None) -> jax.Array:
        x = x + dropout(fx, self.rate, key)
        return norm(x) if self.post_norm else x  # post-LN: norm(x + f(x))


class EncoderLayer(_Residual):
    """Bidirectional self-attention, then the MLP; each a residual sublayer."""

    def __init__(self, cfg: EncDecConfig, *, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, causal=False, rngs=rngs)
        self.self_attn_norm = make_norm(cfg)
        self.mlp = MLP(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg)
        self.post_norm, self.rate = cfg.post_norm, cfg.dropout

    def __call__(self, x: jax.Array, segment_ids, key: jax.Array | None = None) -> jax.Array:  # [B, S, D]
        k1, k2 = _keys(key, 2)
        h = self.self_attn(self._pre(self.self_attn_norm, x), segment_ids=segment_ids)
        x = self._post(self.self_attn_norm, x, h, k1)
        return self._post(self.mlp_norm, x, self.mlp(self._pre(self.mlp_norm, x)), k2)


class DecoderLayer(_Residual):
    """Causal self-attention, cross-attention over the encoder output, then the MLP."""

    def __init__(self, cfg: EncDecConfig, *, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, causal=True, rngs=rngs)
        self.self_attn_norm = make_norm(cfg)
        self.cross_attn = Attention(cfg, causal=False, rngs=rngs)
        self.cross_attn_norm = make_norm(cfg)
        self.mlp = MLP(cfg, rngs=rngs)
        self.mlp_norm = make_norm(cfg)
        self.post_norm, self.rate = cfg.post_norm, cfg.dropout

    def __call__(self, y: jax.Array, cross_kv: tuple[jax.Array, jax.Array], cross_segment_ids,
                 cache=None, key: jax.Array | None = None):  # [B, T, D] -> [B, T, D]
        """With `cache` (k_cache, v_cache, start) returns (y, (k_cache, v_cache)); see Attention."""
        k1, k2, k3 = _keys(key, 3)
        h = self.self_attn(self._pre(self.self_attn_norm, y), cache=cache)
        h, kv = h if cache is not None else (h, None)
        y = self._post(self.self_attn_norm, y, h, k1)
        h = self.cross_attn(self._pre(self.cross_attn_norm, y), segment_ids=cross_segment_ids, kv=cross_kv)
        y = self._post(self.cross_attn_norm, y, h, k2)
        y = self._post(self.mlp_norm, y, self.mlp(self._pre(self.mlp_norm, y)), k3)
        return y if cache is None else (y, kv)


class PointerGenerator(nnx.Module):
    """Copy head (See et al. 2017, "Get To The Point"): the output distribution of a decoder position is

        p(w) = g * softmax(logits)(w) + (1 - g) * sum over source positions s holding w of a(s)

    with a one-head attention a = softmax(q(y) . k(memory) / sqrt(D)) over the real source tokens and a
    gate g = sigmoid(w . [y, a @ memory] + b). It returns log p as the logits: log_softmax leaves them as
    they are, so the losses, perplexity and decoding read them like any logits.
    """

    def __init__(self, cfg: EncDecConfig, *, rngs: nnx.Rngs):
        D = cfg.d_model
        lin = dict(std=cfg.init_std, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs)
        self.q_proj = Linear(D, D, bias=False, axes=(None, "embed"), **lin)
        self.k_proj = Linear(D, D, bias=False, axes=(None, "embed"), **lin)
        self.gate = Linear(2 * D, 1, bias=True, axes=(None, "embed"), **lin)

    def __call__(self, y: jax.Array, logits: jax.Array, source: Source) -> jax.Array:
        """y [B, T, D] final decoder states, logits [B, T, V] -> log-probabilities [B, T, V] (float32)."""
        B, T, D = y.shape
        V = logits.shape[-1]
        q = self.q_proj(y)  # [B, T, D]
        scores = jnp.einsum("btd,bsd->bts", q, source.copy_keys).astype(jnp.float32) / math.sqrt(D)
        if source.mask is not None:
            scores = jnp.where(source.mask[:, None, :] > 0, scores, -1e30)
        attn = jax.nn.softmax(scores, axis=-1)  # [B, T, S]
        context = jnp.einsum("bts,bsd->btd", attn.astype(source.memory.dtype), source.memory)  # [B, T, D]
        g = jax.nn.sigmoid(self.gate(jnp.concatenate([y, context.astype(y.dtype)], axis=-1)).astype(jnp.float32))
        scatter = lambda a, ids: jnp.zeros((T, V), jnp.float32).at[:, ids].add(a)  # noqa: E731 - [T,S] onto [T,V]
        copy = jax.vmap(scatter)(attn, source.tokens)  # [B, T, V]
        p = g * jax.nn.softmax(logits, axis=-1) + (1.0 - g) * copy  # g [B, T, 1]
        return jnp.log(jnp.maximum(p, TINY))


class Encoder(nnx.Module):
    """The encoder stack (and its final norm when pre-LN); embedded source in, memory [B, S, D] out."""

    def __init__(self, cfg: EncDecConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.n_encoder_layers)])
        self.norm = None if cfg.post_norm else make_norm(cfg)

    def __call__(self, x: jax.Array, segment_ids, key: jax.Array | None = None,
                 capture: dict | None = None) -> jax.Array:
        """`capture` receives `encoder.layers.{i}` and `encoder.norm` (see EncoderDecoder)."""
        for i, (layer, k) in enumerate(zip(self.layers, _keys(key, len(self.layers)))):
            x = constrain(layer(x, segment_ids, k), ACT)
            record(capture, f"encoder.layers.{i}", x)
        if self.norm is not None:
            x = self.norm(x)
            record(capture, "encoder.norm", x)
        return x


class Decoder(nnx.Module):
    """The decoder stack (and its final norm when pre-LN); embedded target in, hidden states out."""

    def __init__(self, cfg: EncDecConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = None if cfg.post_norm else make_norm(cfg)

    def __call__(self, y: jax.Array, cross_kv: CrossKV, cross_segment_ids, key: jax.Array | None = None,
                 capture: dict | None = None) -> jax.Array:  # [B, T, D] -> [B, T, D]
        """`capture` receives `decoder.layers.{i}` and `decoder.norm` (see EncoderDecoder)."""
        for i, (layer, k) in enumerate(zip(self.layers, _keys(key, len(self.layers)))):
            y = constrain(layer(y, cross_kv[i], cross_segment_ids, key=k), ACT)
            record(capture, f"decoder.layers.{i}", y)
        if self.norm is not None:
            y = self.norm(y)
            record(capture, "decoder.norm", y)
        return y

    def extend(self, y: jax.Array, cross_kv: CrossKV, cross_segment_ids, cache: KVCache
               ) -> tuple[jax.Array, KVCache]:
        """Every layer over new target positions, each writing its keys/values; lengths advance by T."""
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            y, (kc, vc) = layer(y, cross_kv[i], cross_segment_ids, (cache.k[i], cache.v[i], cache.lengths))
            y = constrain(y, ACT)
            ks.append(kc)
            vs.append(vc)
        y = y if self.norm is None else self.norm(y)
        return y, cache.replace(k=tuple(ks), v=tuple(vs), lengths=cache.lengths + y.shape[1])


class EncoderDecoder(nnx.Module):
    """src_tokens [B, S], tgt_tokens [B, T] (decoder inputs: start id, then the target shifted right) -> logits."""

    def __init__(self, cfg: EncDecConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, EncDecConfig):
            raise TypeError(f"EncoderDecoder needs an EncDecConfig, got {type(cfg).__name__}")
        self.config = cfg
        V, D, P = cfg.vocab_size, cfg.d_model, cfg.max_seq_len
        emb = dict(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs)
        std = D ** -0.5 if cfg.scale_embedding else cfg.init_std  # scaled: ~unit size (fairseq's N(0, 1/D))
        self.embed_tokens = Embed(V, D, axes=("vocab", "embed"), std=std, **emb)  # target (and shared) table
        self.embed_source_tokens = (None if cfg.share_embeddings else
                                    Embed(V, D, axes=("vocab", "embed"), std=std, **emb))
        learned = cfg.position == "learned"
        self.embed_positions = Embed(P, D, axes=(None, "embed"), std=cfg.init_std, **emb) if learned else None
        self.embed_source_positions = Embed(P, D, axes=(None, "embed"), std=cfg.init_std, **emb) if learned else None
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        Linear(D, V, bias=False, axes=("vocab", "embed"), std=cfg.init_std,
                               param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs))
        self.final_logits_bias = (nnx.Param(jnp.zeros((V,), jnp.dtype(cfg.param_dtype)), logical_axes=("vocab",))
                                  if cfg.logits_bias else None)
        self.pointer = PointerGenerator(cfg, rngs=rngs) if cfg.pointer_generator else None

    def __call__(self, src_tokens: jax.Array, tgt_tokens: jax.Array, src_mask: jax.Array | None = None, *,
                 dropout_key: jax.Array | None = None, capture: dict | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) for every decoder position; dropout only when a key is given.

        `capture`, a dict, receives the residual streams under parameter paths: `embed_source_tokens` (the
        embedded source [B, S, D]), `encoder.layers.{i}`, `encoder.norm` (pre-LN only), `embed_tokens` (the
        embedded target [B, T, D]), `decoder.layers.{i}`, `decoder.norm` (pre-LN only). None records nothing.
        """
        k_enc, k_dec = _keys(dropout_key, 2)
        memory = self.encode(src_tokens, src_mask, dropout_key=k_enc, capture=capture)  # [B, S, D]
        return self.decode(tgt_tokens, self.source(memory, src_tokens, src_mask), dropout_key=k_dec, capture=capture)

    def encode(self, src_tokens: jax.Array, src_mask: jax.Array | None = None, *,
               dropout_key: jax.Array | None = None, capture: dict | None = None) -> jax.Array:
        """The encoder output (memory) [B, S, D]."""
        check_tokens(self.config, "src_tokens", src_tokens, src_mask)
        k_emb, k_enc = _keys(dropout_key, 2)
        table = self.embed_tokens if self.embed_source_tokens is None else self.embed_source_tokens
        x = self._embed(src_tokens, table, self.embed_source_positions, None, k_emb)  # [B, S, D]
        record(capture, "embed_source_tokens", x)
        return self.encoder(x, _source_segments(src_mask), k_enc, capture)

    def source(self, memory: jax.Array, src_tokens: jax.Array, src_mask: jax.Array | None = None) -> Source:
        """What the decoder reads of an encoded source: each decoder layer's cross-attention keys and values
        [B, S, K, H] (and the copy head's keys), computed once per source."""
        kv = tuple(layer.cross_attn.project_kv(memory) for layer in self.decoder.layers)
        mask = None if src_mask is None else jnp.asarray(src_mask, jnp.int32)
        if self.pointer is None:
            return Source(kv, mask)
        return Source(kv, mask, jnp.asarray(src_tokens, jnp.int32), memory, self.pointer.k_proj(memory))

    def decode(self, tgt_tokens: jax.Array, source: Source, *, dropout_key: jax.Array | None = None,
               capture: dict | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) of decoder inputs given the encoded `source` (see `source`)."""
        check_tokens(self.config, "tgt_tokens", tgt_tokens, None)
        k_emb, k_dec = _keys(dropout_key, 2)
        y = self._embed(tgt_tokens, self.embed_tokens, self.embed_positions, None, k_emb)  # [B, T, D]
        record(capture, "embed_tokens", y)
        y = self.decoder(y, source.kv, self._cross_segments(tgt_tokens, source), key=k_dec, capture=capture)
        return self._logits(y, source)

    def extend(self, tgt_tokens: jax.Array, source: Source, cache: KVCache) -> CachedLogits:
        """Continue each cached target sequence b with tokens [B, T] (positions cache.lengths[b] + t).

        `cache` is KVCache.init(cfg, B, max_len) for the decoder's self-attention; returns the logits
        [B, T, V] and the cache with lengths advanced by T.
        """
        check_tokens(self.config, "tgt_tokens", tgt_tokens, None)
        y = self._embed(tgt_tokens, self.embed_tokens, self.embed_positions, cache.lengths, None)  # [B, T, D]
        y, cache = self.decoder.extend(y, source.kv, self._cross_segments(tgt_tokens, source), cache)
        return CachedLogits(self._logits(y, source), cache)

    @staticmethod
    def _cross_segments(tgt_tokens: jax.Array, source: Source):
        """Cross-attention segments: every target position sees the real source tokens."""
        return None if source.mask is None else (jnp.ones(tgt_tokens.shape, jnp.int32), source.mask)

    def _logits(self, y: jax.Array, source: Source) -> jax.Array:
        """Output projection (+ logits bias, + copy head): [B, T, D] -> [B, T, V] float32."""
        logits = self.embed_tokens.attend(y) if self.lm_head is None else self.lm_head(y)  # [B, T, V]
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias[...].astype(logits.dtype)
        logits = logits.astype(jnp.float32)
        if self.pointer is not None:
            logits = self.pointer(y, logits, source)  # log-probabilities with copying
        return constrain(logits, ("batch", "seq", "act_vocab"))

    def _embed(self, tokens: jax.Array, table: Embed, pos_table: Embed | None, start: jax.Array | None,
               key: jax.Array | None) -> jax.Array:
        """Token embeddings (times sqrt(D) when scaled) plus positions start[b] + t; [B, T] -> [B, T, D]."""
        cfg = self.config
        B, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if start is not None:
            positions = positions + start[:, None]
        x = table(tokens)
        if cfg.scale_embedding:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
        pos = pos_table(positions) if pos_table is not None else sinusoidal_positions(positions, cfg.d_model)
        x = dropout(x + pos.astype(x.dtype), cfg.dropout, key)
        return constrain(x, ACT)


def _source_segments(src_mask: jax.Array | None):
    """Encoder self-attention segments: every query (pads too) sees the real source keys."""
    if src_mask is None:
        return None
    return jnp.ones(src_mask.shape, jnp.int32), src_mask.astype(jnp.int32)


def check_tokens(cfg: EncDecConfig, name: str, tokens: jax.Array, mask: jax.Array | None) -> None:
    """Shape/dtype checks that turn bad input into a clear ValueError before anything traces deep."""
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be [batch, seq], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {tokens.dtype}")
    if tokens.shape[1] > cfg.max_seq_len:
        raise ValueError(f"{name} has length {tokens.shape[1]}, more than the model's max_seq_len="
                         f"{cfg.max_seq_len}; truncate it or use a config with a longer max_seq_len")
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(f"src_mask must have the source tokens' shape {tokens.shape}, got {mask.shape}")
