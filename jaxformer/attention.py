"""Multi-head attention with GQA/MQA, causal and segment masks, and implementation dispatch.

Implementations (ModelConfig.attention_impl):
  xla    plain jnp einsums, softmax in float32; runs everywhere, the numerical reference.
  auto   jax.nn.dot_product_attention: cuDNN on a GPU for bf16/fp16, XLA otherwise.
  cudnn  jax.nn.dot_product_attention(implementation="cudnn"); where no GPU is present it
         warns once and runs the xla path (cuDNN does not exist on CPU).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers import Linear, apply_rope

SegmentIds = tuple[jax.Array, jax.Array]  # (q_segment_ids [B, T], kv_segment_ids [B, S])
NEG_INF = -1e30  # finite: a fully masked row gives a uniform softmax instead of NaN


def make_mask(q_len: int, kv_len: int, *, causal: bool, segment_ids: SegmentIds | None) -> jax.Array | None:
    """Boolean mask [B or 1, T, S], True where query t may attend key s.

    Causal masks align the last query with the last key (query t sits at key position
    t + S - T), which is both plain self-attention (T == S) and decoding against a cache.
    """
    mask = None
    if causal:
        t = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        mask = (t >= jnp.arange(kv_len)[None, :])[None]  # [1, T, S]
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids
        same = q_seg[:, :, None] == kv_seg[:, None, :]  # [B, T, S]
        mask = same if mask is None else mask & same
    return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                  scale: float) -> jax.Array:
    """softmax(q k^T * scale) v with grouped kv heads; q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)  # query heads grouped by the kv head they share
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(B, T, N, H)


@functools.cache
def _warn_once(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, segment_ids: SegmentIds | None = None,
           impl: str = "xla", scale: float | None = None) -> jax.Array:
    """Scaled dot-product attention through the chosen implementation; [B,T,N,H] out."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"{N} query heads cannot be grouped over {K} kv heads")
    scale = H ** -0.5 if scale is None else scale
    if impl == "cudnn" and not _on_gpu():
        _warn_once("attention_impl='cudnn' needs an NVIDIA GPU; using the xla implementation instead")
        impl = "xla"
    if impl == "xla":
        return xla_attention(q, k, v, make_mask(T, S, causal=causal, segment_ids=segment_ids), scale)
    if impl == "auto":
        impl = "cudnn" if _on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16) else None
    seg_mask = make_mask(T, S, causal=False, segment_ids=segment_ids)
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if seg_mask is None else seg_mask[:, None], scale=scale,
        is_causal=causal, implementation=impl)


class Attention(nnx.Module):
    """Causal self-attention: q/k/v/o projections, optional RoPE, grouped kv heads."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kw = dict(bias=cfg.use_bias, std=cfg.init_std, param_dtype=cfg.param_dtype,
                  compute_dtype=cfg.compute_dtype, rngs=rngs)
        self.q_proj = Linear(D, N * H, axes=("heads", "embed"), **kw)
        self.k_proj = Linear(D, K * H, axes=("kv_heads", "embed"), **kw)
        self.v_proj = Linear(D, K * H, axes=("kv_heads", "embed"), **kw)
        kw["std"] = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # residual branch output (GPT-2 init)
        self.o_proj = Linear(N * H, D, axes=("embed", "heads"), **kw)
        self.n_heads, self.n_kv_heads, self.head_dim = N, K, H
        self.impl = cfg.attention_impl

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:  # [B, T, D] -> [B, T, D]
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim)  # [B, T, N, H]
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, H]
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, H]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        seg = None if segment_ids is None else (segment_ids, segment_ids)
        out = attend(q, k, v, causal=True, segment_ids=seg, impl=self.impl)  # [B, T, N, H]
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))
