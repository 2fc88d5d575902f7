"""Gemma 4's text decoder (transformers' modeling_gemma4.py): its own block and model, since five of its parts would
otherwise be special cases through models/decoder.py.

  per-layer inputs  every block adds a gated embedding of its own: a [L, P] table row per token plus a projection of
                    the token's embedding, both normed and summed (Gemma4TextModel.get/project_per_layer_inputs)
  kv sharing        the last kv_shared_layers layers have no k/v projections and attend to the keys and values of the
                    last earlier layer of their type (ModelConfig.kv_source), in training and from the cache
  MoE beside MLP    with moe.n_experts, every block runs the dense MLP and a routed MoE side by side, each with
                    its own norms; the router reads the block's input, normed without weight and scaled
  layer scalar      each block's output times a stored scalar (a buffer in transformers: no gradient here)
  head sizes        full-attention layers have heads of attention.global_head_dim, attention.global_kv_heads kv
                    heads, values equal to keys (attention.k_eq_v) and proportional RoPE; models/attention.py
                    reads those per layer.

The rest is Gemma 3: sandwich norms (scaled by weight, not 1 + weight), per-head q/k norms, weightless value norms,
scores scaled by 1, embeddings times sqrt(d_model), final logit soft-cap.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.attention import Attention, PagedLayer
from jaxformer.models.decoder import ACT, REMAT_POLICIES, DecoderLM, rope_for
from jaxformer.models.layers import (ACTIVATIONS, MLP, Embed, Linear, dtype_of, make_norm, materialize_cotangent,
                                     record, rms_normalize)
from jaxformer.models.moe import Experts, route, run_experts
from jaxformer.models.paged_cache import PagedKVCache
from jaxformer.sharding import constrain


class Gemma4Router(nnx.Module):
    """x [N, D] -> router logits [N, E] float32 of rms_normalize(x) * scale * D ** -0.5; `per_expert_scale` [E]
    multiplies the chosen experts' weights (models/moe.py route, router 'gemma4')."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E = cfg.d_model, cfg.moe.n_experts
        self.proj = Linear(D, E, bias=False, axes=(None, "embed"), std=cfg.init_std, param_dtype=cfg.param_dtype,
                           compute_dtype=cfg.compute_dtype, rngs=rngs)
        self.scale = nnx.Param(jnp.ones((D,), dtype_of(cfg.param_dtype)), logical_axes=("norm",))
        self.per_expert_scale = nnx.Param(jnp.ones((E,), dtype_of(cfg.param_dtype)), logical_axes=(None,))
        self.eps, self.root = cfg.norm_eps, D ** -0.5

    def __call__(self, x: jax.Array) -> jax.Array:  # [N, D] -> [N, E]
        h = rms_normalize(x, self.eps) * self.scale[...].astype(x.dtype) * jnp.asarray(self.root, x.dtype)
        return self.proj(h).astype(jnp.float32)


class KVSharingBlock(nnx.Module):
    """What Gemma 4's and Gemma 3n's blocks share: attention that may reuse an earlier block's keys and values (a
    kv-shared block builds no k/v projections, as transformers builds none), and the per-layer input's gated branch."""

    def _init_attention(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs) -> None:
        self.rope_type = cfg.layer_rope(layer)
        self.kv_source = cfg.kv_source(layer)  # != layer: this block reuses that block's keys and values
        self.shares_kv = self.kv_source != layer
        self.self_attn = Attention(cfg, window=cfg.layer_window(layer), layer=layer, rngs=rngs)
        if self.shares_kv:
            self.self_attn.k_proj = self.self_attn.v_proj = self.self_attn.k_norm = None

    def _init_per_layer_input(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
        kw = dict(bias=False, std=cfg.init_std, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs)
        self.act = ACTIVATIONS[cfg.activation]
        self.per_layer_input_gate = Linear(cfg.d_model, cfg.per_layer_dim, axes=(None, "embed"), **kw)
        self.per_layer_projection = Linear(cfg.per_layer_dim, cfg.d_model, axes=("embed", None), **kw)
        self.post_per_layer_input_norm = make_norm(cfg)

    def attend(self, h: jax.Array, rope, segment_ids, cache, shared):
        """(attention of h [B, T, D], kv): a kv-shared block reads `shared` (kv None); with `cache` the new keys and
        values are written (kv: the updated cache); otherwise kv is this block's rotated (k, v) for later blocks."""
        if self.shares_kv:
            return self.self_attn.reuse(h, rope, segment_ids, shared), None
        if cache is not None:
            return self.self_attn(h, rope, None, cache)
        return self.self_attn(h, rope, segment_ids, return_kv=True)

    def per_layer_branch(self, x: jax.Array, per_layer_input: jax.Array) -> jax.Array:  # [B, T, D], [B, T, P]
        """post_per_layer_input_norm(per_layer_projection(act(per_layer_input_gate(x)) * per_layer_input))."""
        g = self.act(self.per_layer_input_gate(x)) * per_layer_input  # [B, T, P]
        return self.post_per_layer_input_norm(self.per_layer_projection(g))


class Gemma4Block(KVSharingBlock):
    """x + post_attention_layernorm(attn(input_layernorm(x))), then x + post_feedforward_layernorm(ffn), ffn the MLP of
    pre_feedforward_layernorm(x) (plus, with experts, post_feedforward_layernorm_2 of the experts on
    pre_feedforward_layernorm_2(x), the MLP's output through post_feedforward_layernorm_1), then the per-layer input's
    gated residual, all times layer_scalar."""

    def __init__(self, cfg: ModelConfig, *, layer: int = 0, rngs: nnx.Rngs):
        self.input_layernorm = make_norm(cfg)
        self._init_attention(cfg, layer, rngs)
        self.post_attention_layernorm = make_norm(cfg)
        self.pre_feedforward_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg.replace(d_ff=cfg.layer_d_ff(layer)), rngs=rngs)
        self.post_feedforward_layernorm = make_norm(cfg)
        self.sparse = cfg.moe.n_experts > 0
        if self.sparse:
            self.config = cfg
            self.router = Gemma4Router(cfg, rngs=rngs)
            self.experts = Experts(cfg, rngs=rngs)
            self.post_feedforward_layernorm_1 = make_norm(cfg)
            self.pre_feedforward_layernorm_2 = make_norm(cfg)
            self.post_feedforward_layernorm_2 = make_norm(cfg)
        if cfg.per_layer_dim:
            self._init_per_layer_input(cfg, rngs)
        self.layer_scalar = nnx.Param(jnp.ones((1,), dtype_of(cfg.param_dtype)), logical_axes=(None,))

    def __call__(self, x: jax.Array, rope, segment_ids, per_layer_input: jax.Array | None, cache=None, shared=None,
                 *, moe_stats: list | None = None):
        """x [B, T, D] -> (x, kv). `shared` is the source block's keys and values for a kv-shared block: (k, v)
        [B, T, K, H] or, decoding, its cache view with these tokens written. kv is this block's own (k, v) (or
        updated cache with `cache`), None for a kv-shared block."""
        h, kv = self.attend(self.input_layernorm(x), rope, segment_ids, cache, shared)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.sparse:
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(self._experts(x, moe_stats))
        x = x + self.post_feedforward_layernorm(h)
        if per_layer_input is not None:  # [B, T, P]
            x = x + self.per_layer_branch(x, per_layer_input)
        return x * jax.lax.stop_gradient(self.layer_scalar[...]).astype(x.dtype), kv

    def _experts(self, x: jax.Array, stats: list | None) -> jax.Array:  # [B, T, D] -> [B, T, D]
        """The routed experts: routed on x itself, run on pre_feedforward_layernorm_2(x); router statistics to stats."""
        cfg = self.config
        B, T, D = x.shape
        logits = self.router(x.reshape(B * T, D))  # [N, E]
        h = self.pre_feedforward_layernorm_2(x)
        router = functools.partial(route, expert_scale=self.router.per_expert_scale[...])
        y, dropped, load = run_experts(self.experts, h, logits, cfg, router)  # [N, D]
        if stats is not None:
            stats.append({"router_logits": logits, "load": load.astype(jnp.float32), "dropped": dropped})
        return y.reshape(B, T, D).astype(x.dtype)


class Gemma4LM(DecoderLM):
    """DecoderLM with Gemma4Blocks, per-layer inputs and kv-shared layers; same calls (`__call__`, `extend`)."""

    block = Gemma4Block

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        L, P = cfg.n_layers, cfg.per_layer_dim
        if P:
            kw = dict(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs)
            self.embed_tokens_per_layer = Embed(cfg.per_layer_vocab_size or cfg.vocab_size, L * P,
                                                axes=("vocab", "embed"), std=cfg.init_std, **kw)
            self.per_layer_model_projection = Linear(cfg.d_model, L * P, bias=False, axes=(None, "embed"),
                                                     std=cfg.init_std, **kw)
            self.per_layer_projection_norm = make_norm(cfg, P)

    def _embed(self, tokens: jax.Array, positions: jax.Array):
        """Embeddings [B, T, D] and the blocks' context: RoPE tables and per-layer inputs [B, T, L, P] (or None)."""
        x, ropes = super()._embed(tokens, positions)
        cfg = self.config
        if not cfg.per_layer_dim:
            return x, (ropes, None)
        B, T = tokens.shape
        L, P = cfg.n_layers, cfg.per_layer_dim
        # ids past the per-layer table read its row 0 (Gemma 3n's table is shorter than its vocabulary)
        in_table = jnp.where(tokens < (cfg.per_layer_vocab_size or cfg.vocab_size), tokens, 0)
        own = self.embed_tokens_per_layer(in_table) * jnp.asarray(math.sqrt(P), x.dtype)  # [B, T, L*P]
        projected = self.per_layer_model_projection(x) * jnp.asarray(cfg.d_model ** -0.5, x.dtype)
        projected = self.per_layer_projection_norm(projected.reshape(B, T, L, P))
        per_layer = (projected + own.reshape(B, T, L, P)) * jnp.asarray(2 ** -0.5, x.dtype)  # [B, T, L, P]
        return x, (ropes, per_layer)

    def _blocks(self, x: jax.Array, context, segment_ids, capture: dict | None = None,
                moe_stats: list | None = None) -> jax.Array:
        """All blocks in order, each kv-shared block reading its source block's keys and values; with remat each
        block is recomputed in the backward pass."""
        cfg = self.config
        ropes, per_layer = context
        kvs: dict[int, tuple[jax.Array, jax.Array]] = {}
        for i, layer in enumerate(self.layers):
            ple = None if per_layer is None else per_layer[:, :, i]
            shared = kvs.get(layer.kv_source) if layer.shares_kv else None
            stats: list = []
            if cfg.remat != "none" and capture is None:
                x, kv, stats = _remat_block(layer, cfg.remat)(x, rope_for(layer, ropes), segment_ids, ple, shared)
            else:
                x, kv = layer(x, rope_for(layer, ropes), segment_ids, ple, shared=shared, moe_stats=stats)
            if moe_stats is not None:
                moe_stats.extend(stats)
            if kv is not None:
                kvs[i] = kv
            x = materialize_cotangent(self.pin(x))
            record(capture, f"layers.{i}", self.residual_view(x))
        return x

    def _cached_blocks(self, x: jax.Array, context, cache, valid=None):  # valid: no recurrent states here
        """All blocks over new tokens: each writes its keys/values into its cache layer; kv-shared blocks read their
        source's layer (written earlier in this call)."""
        ropes, per_layer = context
        ks, vs = list(cache.k), list(cache.v)
        for i, layer in enumerate(self.layers):
            ple = None if per_layer is None else per_layer[:, :, i]
            src = layer.kv_source
            if isinstance(cache, PagedKVCache):
                view = PagedLayer(ks[src], vs[src], cache.page_table, cache.lengths)
            else:
                view = (ks[src], vs[src], cache.lengths)
            if layer.shares_kv:
                x, _ = layer(x, rope_for(layer, ropes), None, ple, shared=view)
            else:
                x, (ks[i], vs[i]) = layer(x, rope_for(layer, ropes), None, ple, cache=view)
            x = self.pin(x)
        return x, cache.replace(k=tuple(ks), v=tuple(vs), lengths=cache.lengths + x.shape[-2])  # T of [..., B, T, D]

    def pin(self, x: jax.Array) -> jax.Array:
        """The residual stream laid out on the mesh (Gemma 3n's has a leading AltUp axis)."""
        return constrain(x, ACT)


def _remat_block(layer: Gemma4Block, policy: str):
    """layer's call as a jax.checkpoint'd function of (x, rope, segment_ids, per-layer input, shared kv) -> (x, kv,
    router statistics)."""
    graphdef, state = nnx.split(layer)

    def body(state, x, rope, segment_ids, ple, shared):
        stats: list = []
        x, kv = nnx.merge(graphdef, state)(x, rope, segment_ids, ple, shared=shared, moe_stats=stats)
        return x, kv, stats

    checkpointed = jax.checkpoint(body, policy=REMAT_POLICIES[policy])
    return lambda *args: checkpointed(state, *args)
