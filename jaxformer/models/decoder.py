"""Decoder-only language model: GPT-2 and Llama families from one ModelConfig."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import STATE_LAYER_TYPES, ModelConfig
from jaxformer.models.attention import Attention, PagedLayer
from jaxformer.models.cache import CachedLogits, KVCache
from jaxformer.models.delta_net import GatedDeltaNet
from jaxformer.models.latent_attention import LatentAttention
from jaxformer.models.layers import (MLP, Embed, Linear, OutputHead, make_norm, materialize_cotangent,
                                     query_temperature, record, rope_cos_sin, scaled_logits, sinusoidal_positions)
from jaxformer.models.moe import MoE
from jaxformer.models.paged_cache import PagedKVCache
from jaxformer.models.short_conv import ShortConv
from jaxformer.sharding import constrain

ACT = ("batch", "seq", "act_embed")  # the residual stream's logical axes
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the block
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


class Block(nnx.Module):
    """Residual block; where its norms sit is `norm_placement` (the one place that reads it):

      pre       x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))         (GPT-2, Llama)
      sandwich  x + post_attention_layernorm(attn(input_layernorm(x))),
                then x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))       (Gemma 2, 3)
      post      x + post_attention_layernorm(attn(x)), then x + post_feedforward_layernorm(mlp(x)) (OLMo 2)
      parallel  x + attn(input_layernorm(x)) + mlp(input_layernorm(x))                           (Cohere)

    Each branch's output is times scales.residual first (Granite; 1.0 otherwise).
    """

    def __init__(self, cfg: ModelConfig, *, layer: int = 0, rngs: nnx.Rngs):
        self.placement = cfg.norm_placement
        self.rope_type = cfg.layer_rope(layer)  # the RoPE table it takes (full / sliding attention's), None: no RoPE
        self.residual_scale = cfg.scales.residual
        self.input_layernorm = make_norm(cfg) if self.placement != "post" else None
        # the token mixer, named as transformers names it: self_attn, linear_attn (Qwen3.5), conv (LFM2)
        kind = cfg.layer_type(layer)
        attention = LatentAttention if cfg.latent.kv_rank else Attention  # DeepSeek's latent attention, or softmax
        self.self_attn = (None if kind in STATE_LAYER_TYPES else
                          attention(cfg, window=cfg.layer_window(layer), layer=layer, rngs=rngs))
        self.linear_attn = GatedDeltaNet(cfg, rngs=rngs) if kind == "linear_attention" else None
        self.conv = ShortConv(cfg, rngs=rngs) if kind == "conv" else None
        self.post_attention_layernorm = make_norm(cfg) if self.placement != "parallel" else None
        self.pre_feedforward_layernorm = make_norm(cfg) if self.placement == "sandwich" else None
        self.sparse = cfg.is_moe_layer(layer)  # the MLP slot holds a Mixture of Experts (models/moe.py)
        self.mlp = MoE(cfg, rngs=rngs) if self.sparse else MLP(cfg, rngs=rngs)
        self.post_feedforward_layernorm = make_norm(cfg) if self.placement in ("sandwich", "post") else None

    def mix(self, h: jax.Array, rope, segment_ids: jax.Array | None, cache=None):
        """The block's token mixer over the normed stream h [B, T, D]: softmax attention (with `cache`: returns
        (out, (k_cache, v_cache))), or a Gated DeltaNet / short-convolution layer (documents kept apart by
        segment_ids; with `cache` = (state, valid [B, T] or None): returns (out, the state after the valid tokens))."""
        if self.self_attn is not None:
            return self.self_attn(h, rope, segment_ids, cache)
        mixer = self.linear_attn if self.linear_attn is not None else self.conv
        if cache is None:
            return mixer(h, segment_ids)
        state, valid = cache
        return mixer(h, segment_ids, state=state, valid=valid)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None, segment_ids: jax.Array | None,
                 cache=None, *, moe_stats: list | None = None):  # [B, T, D] -> [B, T, D]
        """`rope` is this block's (cos, sin) (see rope_for). With `cache` (k_cache, v_cache, start) returns
        (x, (k_cache, v_cache)); see Attention. A sparse block appends its router statistics to `moe_stats`."""
        kv = None
        mlp = (lambda h: self.mlp(h, moe_stats)) if self.sparse else self.mlp
        s = self.residual_scale
        branch = (lambda h: h) if s == 1.0 else (lambda h: h * jnp.asarray(s, h.dtype))
        if self.placement == "pre":
            h = self.mix(self.input_layernorm(x), rope, segment_ids, cache)
            h, kv = h if cache is not None else (h, kv)
            x = x + branch(h)
            x = x + branch(mlp(self.post_attention_layernorm(x)))
        elif self.placement == "sandwich":
            h = self.mix(self.input_layernorm(x), rope, segment_ids, cache)
            h, kv = h if cache is not None else (h, kv)
            x = x + branch(self.post_attention_layernorm(h))
            x = x + branch(self.post_feedforward_layernorm(mlp(self.pre_feedforward_layernorm(x))))
        elif self.placement == "post":
            h = self.mix(x, rope, segment_ids, cache)
            h, kv = h if cache is not None else (h, kv)
            x = x + branch(self.post_attention_layernorm(h))
            x = x + branch(self.post_feedforward_layernorm(mlp(x)))
        else:  # parallel: one norm feeds both branches
            n = self.input_layernorm(x)
            h = self.mix(n, rope, segment_ids, cache)
            h, kv = h if cache is not None else (h, kv)
            x = x + branch(h) + branch(mlp(n))
        return x if cache is None else (x, kv)


class DecoderLM(nnx.Module):
    """tokens [B, T] -> logits [B, T, V] (float32), causal, packed-document aware."""

    block = Block  # the residual block's class (models/gemma4.py's model has its own)

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        emb = dict(std=cfg.init_std, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), **emb)
        self.embed_positions = (Embed(cfg.max_seq_len, cfg.d_model, axes=(None, "embed"), **emb)
                                if cfg.position == "learned" else None)
        self.layers = nnx.List([self.block(cfg, layer=i, rngs=rngs) for i in range(cfg.n_layers)])
        self.norm = make_norm(cfg)
        self.lm_head = (None if cfg.tie_embeddings else
                        Linear(cfg.d_model, cfg.vocab_size, bias=False, axes=("vocab", "embed"), std=cfg.init_std,
                               param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, *, capture: dict | None = None,
                 moe_stats: list | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) for every position; `positions` restart per packed document,
        `segment_ids` keep packed documents from attending to each other.

        `capture`, a dict, receives the residual stream [B, T, D] under parameter paths: `embed_tokens`
        (after the embedding), `layers.{i}` (after block i) and `norm` (after the final norm). With None
        (the default) nothing is recorded; with a dict, remat and scan_layers are not applied.

        `moe_stats`, a list, receives one dict per sparse block, in layer order (models/moe.py: router logits
        [B*T, E], per-expert load [E], dropped fraction): what training's MoE losses and metrics read.
        """
        return self._head_logits(self.hidden(tokens, positions, segment_ids, capture=capture, moe_stats=moe_stats))

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               *, capture: dict | None = None, moe_stats: list | None = None) -> jax.Array:
        """The final hidden states [B, T, D] (after the final norm) that __call__ turns into logits through
        output_head(): what a loss that never holds all the logits at once reads (train/chunked_ce.py)."""
        check_inputs(self.config, tokens, positions, segment_ids)
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x, ropes = self._embed(tokens, positions)
        record(capture, "embed_tokens", self.residual_view(x))
        x = self._blocks(x, ropes, segment_ids, capture, moe_stats)
        return self._final_hidden(x, capture)

    def residual_view(self, x: jax.Array) -> jax.Array:
        """The [B, T, D] residual stream that `capture` records (Gemma 3n's is its active AltUp stream)."""
        return x

    def extend(self, tokens: jax.Array, cache: KVCache | PagedKVCache, positions: jax.Array | None = None,
               valid: jax.Array | None = None) -> CachedLogits:
        """Continue each cached sequence b with tokens [B, T] after its cache.lengths[b] tokens (a KVCache, or a
        PagedKVCache whose page tables hold the pages those positions go to).

        Positions default to lengths[b] + t. Returns the logits [B, T, V] and the cache with the new
        keys/values written and lengths advanced by T. `valid` [B, T] bool marks the real tokens of rows padded at
        their end (bucketed prefill; an idle row: none): a linear_attention / conv layer's state moves over those
        alone (attention's padded writes lie past the lengths the caller sets). A row whose length is 0 starts its
        states from zeros.
        """
        check_inputs(self.config, tokens, positions, None)
        if positions is None:
            positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        x, ropes = self._embed(tokens, positions)
        x, cache = self._cached_blocks(x, ropes, cache, valid)
        return CachedLogits(self._logits(x), cache)

    def _embed(self, tokens: jax.Array, positions: jax.Array):
        """Token (and learned / sinusoidal position) embeddings [B, T, D], and RoPE's cos/sin per attention type."""
        cfg = self.config
        x = self.embed_tokens(tokens)  # [B, T, D]
        if cfg.scale_embedding:  # Gemma: the normaliser is rounded to the activations' dtype
            x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
        if cfg.scales.embedding != 1.0:  # Granite
            x = x * jnp.asarray(cfg.scales.embedding, x.dtype)
        if cfg.position == "learned":
            x = x + self.embed_positions(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(positions, cfg.d_model).astype(x.dtype)
        return constrain(x, ACT), rope_tables(cfg, positions)

    def _logits(self, x: jax.Array, capture: dict | None = None) -> jax.Array:
        """Final norm and output projection: [B, T, D] -> logits [B, T, V] float32."""
        return self._head_logits(self._final_hidden(x, capture))

    def _head_logits(self, h: jax.Array) -> jax.Array:
        """Final hidden states [B, T, D] -> logits [B, T, V] float32, through the head modules themselves (a
        quantized head multiplies its narrow weights; output_head() is the same function as one dense matrix)."""
        cfg = self.config
        z = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)  # [B, T, V]
        return constrain(scaled_logits(z, cfg.scales.logits, cfg.final_logit_softcap), ("batch", "seq", "act_vocab"))

    def _final_hidden(self, x: jax.Array, capture: dict | None = None) -> jax.Array:
        """The blocks' output -> the [B, T, D] states the output head reads (after the final norm)."""
        x = self.norm(x)
        record(capture, "norm", x)
        return x

    def output_head(self) -> OutputHead:
        """The output projection (the tied embedding or lm_head), Cohere's / Granite's logit scale and Gemma 2's
        soft-cap, as one head: what train/chunked_ce.py applies a chunk of positions at a time."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return OutputHead(head.dense_weight(), self.config.scales.logits, self.config.final_logit_softcap)  # [V, D]

    def _cached_blocks(self, x: jax.Array, ropes, cache: KVCache | PagedKVCache, valid: jax.Array | None = None
                       ) -> tuple[jax.Array, KVCache]:
        """All blocks over new tokens, each writing its keys/values (or its recurrent state) into its layer of the
        cache."""
        ks, vs, states = [], [], []
        fresh = cache.lengths == 0  # [B] rows starting a sequence: their states start from zeros
        for i, layer in enumerate(self.layers):
            if layer.self_attn is None:  # linear_attention / conv: a state per row, no keys or values
                state = jax.tree.map(lambda s: jnp.where(fresh.reshape((-1,) + (1,) * (s.ndim - 1)), 0, s),
                                     cache.states[i])
                x, state = layer(x, None, None, (state, valid))
                ks.append(None)
                vs.append(None)
                states.append(state)
                continue
            if isinstance(cache, PagedKVCache):
                layer_cache = PagedLayer(cache.k[i], cache.v[i], cache.page_table, cache.lengths)
            else:
                layer_cache = (cache.k[i], cache.v[i], cache.lengths)
            x, (k, v) = layer(x, rope_for(layer, ropes), None, layer_cache)
            x = constrain(x, ACT)
            ks.append(k)
            vs.append(v)
            states.append(None)
        return x, cache.replace(k=tuple(ks), v=tuple(vs), states=tuple(states) if cache.states else (),
                                lengths=cache.lengths + x.shape[1])

    def _blocks(self, x: jax.Array, ropes, segment_ids, capture: dict | None = None,
                moe_stats: list | None = None) -> jax.Array:
        """All blocks in order; with remat each block's activations are recomputed in the backward
        pass, and with scan_layers one compiled body runs over the stacked block weights (a body of
        `period` blocks when layer types repeat, e.g. Gemma 2's sliding/full pairs). With `capture`,
        a plain loop that records each block's output. Sparse blocks' statistics leave the remat / scan
        bodies as their outputs and are appended to `moe_stats` in layer order."""
        cfg = self.config
        if capture is not None or (cfg.remat == "none" and not cfg.scan_layers):
            for i, layer in enumerate(self.layers):
                x = layer(x, rope_for(layer, ropes), segment_ids, moe_stats=moe_stats)
                x = materialize_cotangent(constrain(x, ACT))
                record(capture, f"layers.{i}", x)
            return x
        period = layer_period(cfg)
        graphdefs = [nnx.graphdef(self.layers[j]) for j in range(period)]
        states = [nnx.state(layer) for layer in self.layers]
        groups = [states[i:i + period] for i in range(0, cfg.n_layers, period)]

        def body(x, group):
            stats = []  # of this body's sparse blocks, returned as outputs (never leaked out of remat / scan)
            for graphdef, state in zip(graphdefs, group):
                layer = nnx.merge(graphdef, state)
                x = constrain(layer(x, rope_for(layer, ropes), segment_ids, moe_stats=stats), ACT)
            return x, stats

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            # stacking copies the weights once per call: memory for compile time on deep models
            x, stacked = jax.lax.scan(body, x, jax.tree.map(lambda *ws: jnp.stack(ws), *groups))
            if moe_stats is not None:  # [groups, ...] per sparse block of the body -> layer order
                moe_stats.extend(jax.tree.map(lambda a: a[g], s) for g in range(len(groups)) for s in stacked)
            return x
        for group in groups:
            x, stats = body(x, group)
            x = materialize_cotangent(x)
            if moe_stats is not None:
                moe_stats.extend(stats)
        return x


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]] | None:
    """RoPE's (cos, sin) [B, T, H] per attention type, or None when the model has no RoPE."""
    if cfg.position != "rope":
        return None
    full = rope_cos_sin(positions, cfg.type_rotary_dim("full_attention"), cfg.rope.theta, cfg.rope.scaling,
                        cfg.max_seq_len)
    # sliding layers: their own base, unscaled (Gemma 3), else the same RoPE as full layers
    local_dim = cfg.type_rotary_dim("sliding_attention")
    local = full if cfg.rope.local_theta is None and local_dim == full[0].shape[-1] else rope_cos_sin(
        positions, local_dim, cfg.rope.local_theta or cfg.rope.theta)
    tables = {"full_attention": full, "sliding_attention": local, "chunked_attention": full}
    if cfg.attention.temperature_floor is not None and cfg.rope.nope_layers:  # Llama 4's NoPE layers
        tables["nope"] = query_temperature(positions, cfg.attention.temperature_floor, cfg.attention.temperature_scale)
    return tables


def rope_for(layer: Block, ropes: dict | None):
    """The (cos, sin) of a block's attention type (sliding layers may have their own RoPE, Gemma 3); for a block
    without RoPE None, or its QueryScale when NoPE layers have an attention temperature (Llama 4)."""
    if ropes is None:
        return None
    return ropes.get("nope") if layer.rope_type is None else ropes[layer.rope_type]


def layer_period(cfg: ModelConfig) -> int:
    """The shortest run of layer types (attention type, RoPE or none, dense or sparse MLP) that repeats through the whole model
    (1 when all layers are alike)."""
    types = [(cfg.layer_type(i), cfg.layer_rope(i), cfg.is_moe_layer(i)) for i in range(cfg.n_layers)]
    return next(p for p in range(1, cfg.n_layers + 1)
                if cfg.n_layers % p == 0 and all(t == types[i % p] for i, t in enumerate(types)))


def check_inputs(cfg: ModelConfig, tokens, positions, segment_ids) -> None:
    """Shape/dtype checks that turn bad input into a clear ValueError before anything traces deep."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    if tokens.shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's max_seq_len={cfg.max_seq_len}; "
                         "truncate the input or use a config with a longer context")
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
        if arr is not None and arr.shape != tokens.shape:
            raise ValueError(f"{name} must have the tokens' shape {tokens.shape}, got {arr.shape}")


def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters (works on abstract models from nnx.eval_shape too)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
