"""Gemma 3n's text decoder (transformers' modeling_gemma3n.py): Gemma 4's per-layer inputs and kv sharing
(models/gemma4.py) around a block of its own.

  AltUp     the residual stream is A streams [A, B, T, D] (Baykal et al. 2023, "Alternating Updates for Efficient
            Transformers"): before a block a learned map, weighted by a router on the active stream, predicts every
            stream from all of them; the block runs on the active one; after it each stream is corrected by the
            block's innovation (its output minus its prediction) times router-weighted coefficients. Embedding makes
            the A - 1 extra streams by projections scaled to the embedding's RMS; the head averages them back
            (unembedding projections, same scaling) into one [B, T, D] stream.
  LAuReL    a low-rank learned residual beside attention: norm(x W_left W_right) + x, averaged with the attention
            branch (/ sqrt 2) (Menghani et al. 2024, "LAuReL: Learned Augmented Residual Layer").
  sparsity  a layer's MLP gate keeps only what exceeds mean + std * Phi^-1(s) of its F values per token, shifted
            to 0 (Gaussian top-k: about a fraction s of the gate is zero), then the activation.
The per-layer input is added to every stream but the first, after the correction. Attention is Gemma 4's (per-head
q/k norms, weightless value norms, scores scaled by 1, sliding and full layers, kv sharing).
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.decoder import ACT
from jaxformer.models.gemma4 import Gemma4LM, KVSharingBlock
from jaxformer.models.layers import MLP, Linear, dtype_of, make_norm, project
from jaxformer.sharding import constrain

STREAMS = (None, *ACT)  # [A, B, T, D]: the AltUp axis is never split


class SparseGateMLP(MLP):
    """Gemma 3n's MLP: with target sparsity s > 0, the gate g becomes relu(g - (mean(g) + std(g) * Phi^-1(s)))
    (statistics over its F values, per token) before the activation."""

    def __init__(self, cfg: ModelConfig, sparsity: float, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.std_multiplier = statistics.NormalDist().inv_cdf(sparsity) if sparsity > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        gate = self.gate_proj(x)  # [B, T, F]
        if self.std_multiplier is not None:
            cutoff = gate.mean(-1, keepdims=True) + gate.std(-1, keepdims=True) * jnp.asarray(self.std_multiplier,
                                                                                               gate.dtype)
            gate = jax.nn.relu(gate - cutoff)
        return self.down_proj(self.act(gate) * self.up_proj(x))


class Laurel(nnx.Module):
    """x + post_laurel_norm(linear_right(linear_left(x))), rank laurel_rank."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(bias=False, std=cfg.init_std, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs)
        self.linear_left = Linear(cfg.d_model, cfg.laurel_rank, axes=(None, "embed"), **kw)
        self.linear_right = Linear(cfg.laurel_rank, cfg.d_model, axes=("embed", None), **kw)
        self.post_laurel_norm = make_norm(cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class AltUp(nnx.Module):
    """Predict and correct the A streams around a block; coefficients come from a tanh router on one stream."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        A, D = cfg.altup.inputs, cfg.d_model
        kw = dict(bias=False, std=cfg.init_std, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs)
        self.correct_output_scale = nnx.Param(jnp.zeros((D,), dtype_of(cfg.param_dtype)), logical_axes=("norm",))
        self.correction_coefs = Linear(A, A, axes=(None, None), **kw)
        self.prediction_coefs = Linear(A, A * A, axes=(None, None), **kw)
        self.modality_router = Linear(D, A, axes=(None, "embed"), **kw)
        self.router_norm = make_norm(cfg)
        self.active, self.clip, self.router_scale = cfg.altup.active_idx, cfg.altup.coef_clip, 1.0 / D

    def _coefs(self, layer: Linear, m: jax.Array) -> jax.Array:  # router weights [B, T, A] -> [B, T, out]
        w = layer.weight[...].astype(m.dtype)
        if self.clip is not None:
            w = jnp.clip(w, -self.clip, self.clip)
        return project(m, w)

    def modalities(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, A]
        routed = self.modality_router(self.router_norm(x) * jnp.asarray(self.router_scale, x.dtype))
        return jnp.tanh(routed.astype(jnp.float32)).astype(x.dtype)

    def predict(self, xs: jax.Array) -> jax.Array:  # [A, B, T, D] -> [A, B, T, D]
        """stream q <- stream q + sum_p c[q, p] stream p, c [A, A] per token from the active stream's router."""
        A, B, T, _ = xs.shape
        c = self._coefs(self.prediction_coefs, self.modalities(xs[self.active])).reshape(B, T, A, A)
        return xs + jnp.einsum("btqp,pbtd->qbtd", c, xs)

    def correct(self, predictions: jax.Array, activated: jax.Array) -> jax.Array:  # -> [A, B, T, D]
        """stream q <- prediction q + (1 + c[q]) (activated - prediction of the active stream)."""
        c = self._coefs(self.correction_coefs, self.modalities(activated)) + 1.0  # [B, T, A]
        innovation = activated - predictions[self.active]  # [B, T, D]
        return predictions + innovation[None] * c.transpose(2, 0, 1)[..., None]


class Gemma3nBlock(KVSharingBlock):
    """AltUp predict; on the active stream x: h = x + post_attention_layernorm(attn(n)) with n = input_layernorm(x),
    h = (h + laurel(n)) / sqrt 2, h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))); AltUp correct;
    the per-layer input, gated by the (scaled) active corrected stream, added to streams 1..A-1."""

    def __init__(self, cfg: ModelConfig, *, layer: int = 0, rngs: nnx.Rngs):
        self.active, self.correct_scale = cfg.altup.active_idx, cfg.altup.correct_scale
        self.altup = AltUp(cfg, rngs=rngs)
        self.input_layernorm = make_norm(cfg)
        self.laurel = Laurel(cfg, rngs=rngs)
        self._init_attention(cfg, layer, rngs)
        self.post_attention_layernorm = make_norm(cfg)
        self.pre_feedforward_layernorm = make_norm(cfg)
        sparsity = cfg.activation_sparsity[layer] if cfg.activation_sparsity else 0.0
        self.mlp = SparseGateMLP(cfg, sparsity, rngs=rngs)
        self.post_feedforward_layernorm = make_norm(cfg)
        self._init_per_layer_input(cfg, rngs)

    def __call__(self, xs: jax.Array, rope, segment_ids, per_layer_input: jax.Array, cache=None, shared=None,
                 *, moe_stats: list | None = None):
        """xs [A, B, T, D] -> (xs, kv), as Gemma4Block (`shared`: the source block's keys/values or cache view)."""
        predictions = self.altup.predict(xs)
        x = predictions[self.active]  # [B, T, D]
        n = self.input_layernorm(x)
        h, kv = self.attend(n, rope, segment_ids, cache, shared)
        h = x + self.post_attention_layernorm(h)
        h = (h + self.laurel(n)) * jnp.asarray(2 ** -0.5, h.dtype)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        corrected = self.altup.correct(predictions, h)  # [A, B, T, D]
        first = corrected[self.active]
        if self.correct_scale:
            first = first * self.altup.correct_output_scale[...].astype(first.dtype)
        return corrected.at[1:].add(self.per_layer_branch(first, per_layer_input)[None]), kv


def rescaled(y: jax.Array, like: jax.Array) -> jax.Array:
    """y scaled to like's RMS per token (y's RMS floored at sqrt(1e-5))."""
    rms = lambda v, floor: jnp.sqrt(jnp.maximum(jnp.square(v).mean(-1, keepdims=True), floor))  # noqa: E731
    return y * rms(like, 0.0) / rms(y, 1e-5)


class Gemma3nLM(Gemma4LM):
    """Gemma4LM with Gemma3nBlocks over A AltUp streams: `altup_projections` make streams 1..A-1 from the embedding,
    `altup_unembed_projections` bring them back before the final norm, where the streams are averaged."""

    block = Gemma3nBlock

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        kw = dict(bias=False, axes=(None, "embed"), std=cfg.init_std, param_dtype=cfg.param_dtype,
                  compute_dtype=cfg.compute_dtype, rngs=rngs)
        A, D = cfg.altup.inputs, cfg.d_model
        self.altup_projections = nnx.List([Linear(D, D, **kw) for _ in range(A - 1)])
        self.altup_unembed_projections = nnx.List([Linear(D, D, **kw) for _ in range(A - 1)])

    def _embed(self, tokens: jax.Array, positions: jax.Array):
        """The A streams [A, B, T, D] (the embedding, and its projections scaled to its RMS) and the blocks' context."""
        x, context = super()._embed(tokens, positions)
        streams = [x] + [rescaled(p(x), x) for p in self.altup_projections]
        return self.pin(jnp.stack(streams)), context

    def _final_hidden(self, xs: jax.Array, capture: dict | None = None) -> jax.Array:
        """Streams 1..A-1 through their unembedding projections (scaled to stream 0's RMS), the mean, the norm."""
        streams = [xs[0]] + [rescaled(p(x), xs[0]) for p, x in zip(self.altup_unembed_projections, xs[1:])]
        return super()._final_hidden(jnp.stack(streams).mean(0), capture)

    def residual_view(self, xs: jax.Array) -> jax.Array:
        return xs[self.config.altup.active_idx]

    def pin(self, xs: jax.Array) -> jax.Array:
        return constrain(xs, STREAMS)
