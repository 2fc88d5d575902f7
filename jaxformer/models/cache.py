"""A preallocated key/value cache: one (keys, values) pair per layer and a per-sequence length.

Sequence b holds `lengths[b]` valid entries at slots [0, lengths[b]); slots past that are stale
and never attended to (the causal mask hides them), so a ragged batch needs no padding masks.
`DecoderLM.extend(tokens [B, T], cache)` writes the new keys/values at slots lengths[b] + t
(jaxformer.models.attention.Attention) and returns CachedLogits(logits, cache) with lengths advanced by T;
callers that padded their tokens (bucketed prefill) set the true lengths afterwards.

The axis order follows the attention implementation (jaxformer.models.attention.cache_layout): [B, K, S, H]
for XLA, [B, S, K, H] for the Pallas decode kernel. Axes are named logically (CACHE_AXES) and laid
out through jaxformer.sharding like activations: batch over ("data", "fsdp"), kv heads over
"tensor"; without a mesh that is a no-op.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxformer.config import STATE_LAYER_TYPES, ModelConfig
from jaxformer.models.attention import cache_layout
from jaxformer.models.delta_net import DeltaNetState
from jaxformer.models.quant import QuantKV
from jaxformer.models.short_conv import ConvState
from jaxformer.sharding import constrain

CACHE_AXES = {"bksh": ("batch", "act_kv_heads", "seq", None), "bskh": ("batch", "seq", "act_kv_heads", None)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values ([B, K, S, H] or [B, S, K, H], as `layout` says) and valid lengths [B] int32.
    A latent-attention layer's pair is its normed latents [.., 1, .., C] and rotated shared keys [.., 1, .., R]; a
    linear_attention / conv layer keeps a fixed-size state per sequence in `states` instead (layer_states)."""

    k: tuple[jax.Array | None, ...]
    v: tuple[jax.Array | None, ...]
    lengths: jax.Array
    states: tuple = ()  # per layer: None, or a linear_attention / conv layer's recurrent state (its k, v: None)
    layout: str = dataclasses.field(default="bksh", metadata=dict(static=True))

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        """Zeros for `batch` sequences of up to `max_len` tokens, in the compute dtype; dtype "int8" stores
        int8 with a scale per position and kv head (jaxformer.models.quant.QuantKV)."""
        dtype = jnp.dtype(dtype or cfg.compute_dtype)
        layout = cache_layout(cfg.attention_impl)

        def zeros(heads: int, dim: int):  # one layer's [B, K, S, H] or [B, S, K, H] (K, H: cfg.layer_cache_dims)
            sizes = {"b": batch, "s": max_len, "k": heads, "h": dim}
            shape = tuple(sizes[a] for a in layout)
            if dtype == jnp.int8:
                return QuantKV(constrain(jnp.zeros(shape, jnp.int8), CACHE_AXES[layout]),
                               constrain(jnp.ones(shape[:-1], jnp.float32), CACHE_AXES[layout][:-1]))
            return constrain(jnp.zeros(shape, dtype), CACHE_AXES[layout])
        k, v = layer_entries(cfg, zeros)
        return cls(k=k, v=v, lengths=jnp.zeros((batch,), jnp.int32), states=layer_states(cfg, batch), layout=layout)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return first_entry(self.k).shape[self.layout.index("s")]

    @property
    def dtype(self) -> jnp.dtype:
        """What the entries are stored as (int8 for a QuantKV cache)."""
        return first_entry(self.k).dtype

    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves((self.k, self.v, self.states)))

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)

    def constrained(self) -> "KVCache":
        """The same cache with its layout pinned to CACHE_AXES (inside jit, under a mesh)."""
        axes = CACHE_AXES[self.layout]
        one = lambda x: (QuantKV(constrain(x.values, axes), constrain(x.scale, axes[:-1]))  # noqa: E731
                         if isinstance(x, QuantKV) else constrain(x, axes))
        pin = lambda xs: tuple(None if x is None else one(x) for x in xs)  # noqa: E731
        return self.replace(k=pin(self.k), v=pin(self.v))


def layer_entries(cfg: ModelConfig, zeros) -> tuple[tuple, tuple]:
    """(keys, values): each layer's two cache entries, zeros(heads, dim) of cfg.layer_cache_dims (kv-shared layers
    read their source's), None for a linear_attention / conv layer (its state is layer_states')."""
    state = lambda i: cfg.layer_type(i) in STATE_LAYER_TYPES  # noqa: E731
    pairs = [(None, None) if state(i) else tuple(zeros(*d) for d in cfg.layer_cache_dims(i))
             for i in range(cfg.n_cache_layers)]
    return tuple(k for k, _ in pairs), tuple(v for _, v in pairs)


def first_entry(entries: tuple):
    """The first attention layer's entry of `entries` (every model keeps one attention layer)."""
    return next(e for e in entries if e is not None)


def layer_states(cfg: ModelConfig, batch: int) -> tuple:
    """Each layer's decode state before a sequence's first token: a Gated DeltaNet layer's (conv tail, delta-rule
    matrix), a short-convolution layer's conv tail, None for an attention layer; () for a model of attention only."""
    if not cfg.has_state_layers:
        return ()
    init = {"linear_attention": lambda: DeltaNetState.init(cfg, batch), "conv": lambda: ConvState.init(cfg, batch)}
    return tuple(init[cfg.layer_type(i)]() if cfg.layer_type(i) in init else None for i in range(cfg.n_cache_layers))



class CachedLogits(NamedTuple):
    """What a cached forward pass returns: logits [B, T, V] (float32) and the cache with the new tokens in it."""

    logits: jax.Array
    cache: KVCache
