"""Multi-head attention with GQA/MQA, causal and segment masks, and implementation dispatch.

Implementations (ModelConfig.attention_impl):
  xla    plain jnp einsums, softmax in float32; runs everywhere, the numerical reference.
  auto   jax.nn.dot_product_attention: cuDNN on a GPU for bf16/fp16, XLA otherwise.
  cudnn  jax.nn.dot_product_attention(implementation="cudnn"); where no GPU is present it
         warns once and runs the xla path (cuDNN does not exist on CPU).
  pallas pallas_kernels.flash_attention (FlashAttention-2, Triton); needs an NVIDIA GPU, or
         JAXFORMER_PALLAS_INTERPRET=1 to interpret it on CPU (tests). Rows that see no key give 0.
Under a mesh whose "context" axis is > 1, self-attention is ring attention (models/ring_attention.py) with
pallas blocks for "pallas" and xla blocks otherwise; the KV-cache path (attend_cached) is unchanged.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.layers import Linear, QueryScale, apply_rope, dtype_of, make_norm, rms_normalize
from jaxformer.models.quant import QuantKV, quantize_kv
from jaxformer.models.ring_attention import context_size, ring_attention
from jaxformer.sharding import mesh_axis_size
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.latent_decode_attention import latent_decode_attention
from pallas_kernels.paged_attention import paged_decode_attention
from pallas_kernels.flash_attention import flash_attention

SegmentIds = tuple[jax.Array, jax.Array]  # (q_segment_ids [B, T], kv_segment_ids [B, S])
LayerCache = tuple[jax.Array, jax.Array, jax.Array]  # (k_cache, v_cache, start [B] int32), see cache_layout


class PagedLayer(NamedTuple):
    """One layer's view of a paged cache (models/paged_cache.py): the shared page pools [num_pages, P, K, H],
    each sequence's page table [B, max_pages] and its tokens already cached [B]."""

    k_pages: jax.Array
    v_pages: jax.Array
    page_table: jax.Array
    start: jax.Array
DECODE_KERNEL_MAX_QUERIES = 16  # cached calls with more new tokens (prefill) use the xla path
NEG_INF = -1e30  # finite: a fully masked row gives a uniform softmax instead of NaN


def make_mask(q_len: int, kv_len: int, *, causal: bool, segment_ids: SegmentIds | None,
              window: int | None = None, chunk: int | None = None) -> jax.Array | None:
    """Boolean mask [B or 1, T, S], True where query t may attend key s.

    Causal masks align the last query with the last key (query t sits at key position
    p = t + S - T), which is both plain self-attention (T == S) and decoding against a cache.
    A sliding window W keeps keys p - W < s <= p (transformers' sliding_window_overlay); a chunk C keeps the keys
    of the query's own chunk, s // C == p // C (Llama 4's chunked_overlay).
    """
    mask = None
    if causal:
        p = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        s = jnp.arange(kv_len)[None, :]
        mask = (p >= s) if window is None else (p >= s) & (s > p - window)
        if chunk is not None:
            mask = mask & (s // chunk == p // chunk)
        mask = mask[None]  # [1, T, S]
    elif window is not None or chunk is not None:
        raise ValueError("a sliding window or an attention chunk needs causal attention")
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids
        same = q_seg[:, :, None] == kv_seg[:, None, :]  # [B, T, S]
        mask = same if mask is None else mask & same
    return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                  scale: float, softcap: float | None = None, sinks: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T * scale) v with grouped kv heads; q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H].

    Laid out for plain XLA: each kv head's G query heads are stacked as G*T rows of one matmul,
    the mask is an additive bias, and the softmax normalisation is applied after the PV matmul
    (one [.., T, H] divide instead of a [.., T, S] one). On CPU this is ~2x the naive form.
    `sinks` [N]: a logit per head that joins each row's softmax denominator and attends to nothing (gpt-oss).
    """
    B, T, N, H = q.shape
    K, Hv = k.shape[2], v.shape[-1]  # k [B, S, K, H], v [B, S, K, Hv] (latent attention: Hv != H)
    G = N // K
    qh = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)  # rows (g, t)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    s = jnp.einsum("bkqh,bksh->bkqs", qh * jnp.asarray(scale, qh.dtype), kh,
                   preferred_element_type=jnp.float32)  # [B, K, G*T, S]
    if softcap is not None:  # Gemma 2: cap * tanh(scores / cap), before the mask
        s = softcap * jnp.tanh(s / softcap)
    if mask is not None:
        bias = jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)  # [B|1, T, S]
        s = s + jnp.tile(bias, (1, G, 1))[:, None]
    m = s.max(-1, keepdims=True)
    if sinks is not None:  # [N] -> one per (kv head, group) row block
        sink = jnp.repeat(sinks.astype(jnp.float32).reshape(K, G), T, axis=1)[None, :, :, None]  # [1, K, G*T, 1]
        m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(m)  # the shift cancels in the ratio
    e = jnp.exp(s - m)
    o = jnp.einsum("bkqs,bksh->bkqh", e.astype(v.dtype), vh, preferred_element_type=jnp.float32)
    denom = e.sum(-1, keepdims=True) + (jnp.exp(sink - m) if sinks is not None else 0.0)
    o = (o / denom).astype(v.dtype)  # [B, K, G*T, Hv]
    return o.reshape(B, K, G, T, Hv).transpose(0, 3, 1, 2, 4).reshape(B, T, N, Hv)


@functools.cache
def _warn_once(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, segment_ids: SegmentIds | None = None,
           impl: str = "xla", scale: float | None = None, window: int | None = None,
           softcap: float | None = None, sinks: jax.Array | None = None, chunk: int | None = None) -> jax.Array:
    """Scaled dot-product attention through the chosen implementation; [B,T,N,Hv] out (v [B,S,K,Hv]).

    Values may be narrower than queries and keys (latent attention): the xla path takes them as they are, the
    others get them zero-padded to the q/k head dim and drop the padding from their output (exact, forward and
    backward). `window` keeps each query's last W keys (itself included); `softcap` bounds the scores with tanh; `sinks` [N]
    adds a per-head logit to each softmax denominator and `chunk` keeps the keys of the query's own chunk (xla and
    pallas compute them; cudnn/auto defer to xla).
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"{N} query heads cannot be grouped over {K} kv heads")
    scale = H ** -0.5 if scale is None else scale
    if impl == "cudnn" and not _on_gpu():
        _warn_once("attention_impl='cudnn' needs an NVIDIA GPU; using the xla implementation instead")
        impl = "xla"
    if impl in ("auto", "cudnn") and softcap is not None:
        _warn_once(f"attention_impl={impl!r} has no logit soft-capping; using the xla implementation for it")
        impl = "xla"
    if sinks is not None and impl not in ("xla", "pallas"):
        _warn_once(f"attention_impl={impl!r} has no attention sinks yet; using the xla implementation for them")
        impl = "xla"
    if chunk is not None and impl not in ("xla", "pallas"):
        _warn_once(f"attention_impl={impl!r} has no chunked attention yet; using the xla implementation for it")
        impl = "xla"
    Hv = v.shape[-1]
    if Hv != H and (impl != "xla" or context_size() > 1):  # kernels take one head dim: v zero-padded, then cut
        if Hv > H:
            raise ValueError(f"values wider than queries/keys ({Hv} > {H}) run on attention_impl='xla' only")
        v = jnp.pad(v, ((0, 0),) * 3 + ((0, H - Hv),))
        return attend(q, k, v, causal=causal, segment_ids=segment_ids, impl=impl, scale=scale, window=window,
                      softcap=softcap, sinks=sinks, chunk=chunk)[..., :Hv]
    if context_size() > 1:  # the sequence is split over the mesh's context axis: ring attention (xla/pallas blocks)
        if sinks is not None or chunk is not None:
            raise ValueError("attention sinks and chunked attention under context parallelism are not supported: set "
                             "mesh.context=1")
        return ring_attention(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale, window=window,
                              softcap=softcap, impl=impl)
    if impl == "xla":
        mask = make_mask(T, S, causal=causal, segment_ids=segment_ids, window=window, chunk=chunk)
        return xla_attention(q, k, v, mask, scale, softcap, sinks)
    if impl == "pallas":
        extra = {k: v for k, v in (("window", window), ("softcap", softcap), ("sinks", sinks), ("chunk", chunk))
                 if v is not None}
        return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=scale, **extra)
    if impl == "auto":
        impl = "cudnn" if _on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16) else None
    seg_mask = make_mask(T, S, causal=False, segment_ids=segment_ids)
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if seg_mask is None else seg_mask[:, None], scale=scale,
        is_causal=causal, local_window_size=None if window is None else (window - 1, 0), implementation=impl)


def cache_layout(impl: str) -> str:
    """Axis order of KV-cache tensors for an attention_impl: the Pallas decode kernel reads [B,S,K,H];
    XLA's batched matmuls want their batch dims (B, K) leading, so its caches are [B,K,S,H]
    (no per-step transpose of the whole cache: ~4x faster decode attention on CPU)."""
    return "bskh" if impl == "pallas" else "bksh"


def attend_cached(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *, impl: str = "xla",
                  scale: float | None = None, window: int | None = None, softcap: float | None = None,
                  sinks: jax.Array | None = None, chunk: int | None = None) -> jax.Array:
    """Queries [B,T,N,H] at positions lengths[b]-T+t attend causally to cache slots [0, lengths[b]).

    Caches are laid out as cache_layout(impl) says. impl "pallas" with at most DECODE_KERNEL_MAX_QUERIES
    queries runs pallas_kernels.decode_attention; everything else is plain XLA with a [B, T, S] mask
    (stale slots past lengths[b], and slots outside a sliding window, are masked).
    """
    B, T, N, H = q.shape
    scale = H ** -0.5 if scale is None else scale
    k_cache, v_cache = (c.dequantize(q.dtype) if isinstance(c, QuantKV) else c for c in (k_cache, v_cache))
    if cache_layout(impl) == "bskh":
        if T <= DECODE_KERNEL_MAX_QUERIES:
            extra = {k: v for k, v in (("window", window), ("softcap", softcap), ("sinks", sinks), ("chunk", chunk))
                     if v is not None}
            return decode_attention(q, k_cache, v_cache, lengths, sm_scale=scale, **extra)
        S = k_cache.shape[1]
        return xla_attention(q, k_cache, v_cache, _cache_mask(lengths, T, S, window, chunk), scale, softcap, sinks)
    K, S = k_cache.shape[1], k_cache.shape[2]
    G = N // K
    qg = q.reshape(B, T, K, G, H)  # query heads grouped by the kv head they share
    scores = jnp.einsum("btkgh,bksh->bkgts", qg, k_cache, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(_cache_mask(lengths, T, S, window, chunk)[:, None, None], scores, NEG_INF)
    if sinks is not None:  # a column per head that joins the softmax and is dropped after it (gpt-oss)
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, K, G, 1, 1), (B, K, G, T, 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], -1), axis=-1)[..., :-1].astype(v_cache.dtype)
    else:
        probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    return jnp.einsum("bkgts,bksh->btkgh", probs, v_cache).reshape(B, T, N, H)


def attend_latent(q_lat: jax.Array, q_pe: jax.Array, c_cache: jax.Array, pe_cache: jax.Array, lengths: jax.Array, *,
                  impl: str = "xla", scale: float, window: int | None = None,
                  page_table: jax.Array | None = None) -> jax.Array:
    """Latent attention's absorbed form (models/latent_attention.py): queries q_lat [B,T,N,C] and q_pe [B,T,N,R] at
    positions lengths[b]-T+t attend causally to the cached latents c (also the values) and rotated shared keys pe
    -- one-head caches in cache_layout(impl), or page pools [pages, P, 1, *] read through `page_table` -- giving the
    latent-space output o_lat [B, T, N, C]. impl "pallas" with few queries runs the latent decode kernel."""
    B, T, N, C = q_lat.shape
    c_cache, pe_cache = (x.dequantize(q_lat.dtype) if isinstance(x, QuantKV) else x for x in (c_cache, pe_cache))
    if page_table is not None:  # each sequence's pages in order: [B, S, *]
        c, pe = (pool[page_table].reshape(B, -1, pool.shape[-1]) for pool in (c_cache, pe_cache))
    else:  # [B, 1, S, *] or [B, S, 1, *]: one head either way
        c, pe = (x.reshape(B, -1, x.shape[-1]) for x in (c_cache, pe_cache))
    if impl == "pallas" and T <= DECODE_KERNEL_MAX_QUERIES:
        return latent_decode_attention(q_lat, q_pe, c, pe, lengths, sm_scale=scale, window=window)
    scores = (jnp.einsum("btnc,bsc->bnts", q_lat, c, preferred_element_type=jnp.float32)
              + jnp.einsum("btnr,bsr->bnts", q_pe, pe, preferred_element_type=jnp.float32)) * scale  # [B, N, T, S]
    scores = jnp.where(_cache_mask(lengths, T, c.shape[1], window)[:, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
    return jnp.einsum("bnts,bsc->btnc", probs, c)  # [B, T, N, C]


def _cache_mask(lengths: jax.Array, T: int, S: int, window: int | None = None, chunk: int | None = None) -> jax.Array:
    q_pos = lengths[:, None] - T + jnp.arange(T)[None, :]  # [B, T]
    s = jnp.arange(S)[None, None, :]
    mask = s <= q_pos[:, :, None]  # [B, T, S]
    if chunk is not None:
        mask = mask & (s // chunk == q_pos[:, :, None] // chunk)
    return mask if window is None else mask & (s > q_pos[:, :, None] - window)


def write_cache(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array,
                impl: str = "xla") -> tuple[jax.Array, jax.Array]:
    """New k/v [B,T,K,H] written at slots start[b]+t of the caches (cache_layout(impl)); past S is dropped.
    An int8 cache (QuantKV) stores them quantized, with their scales [B,T,K] at the same slots."""
    B, T = k.shape[:2]
    rows = jnp.arange(B)[:, None]  # [B, 1]
    slots = start[:, None] + jnp.arange(T)[None, :]  # [B, T]
    # [B, K, S, H]: the indexed dims (B, S) come first in the update, as numpy orders them: [B, T, K, H]
    at = (rows, slots) if cache_layout(impl) == "bskh" else (rows, slice(None), slots)

    def write(cache, new):
        if isinstance(cache, QuantKV):
            q, s = quantize_kv(new)
            return QuantKV(cache.values.at[at].set(q, mode="drop"), cache.scale.at[at].set(s, mode="drop"))
        return cache.at[at].set(new.astype(cache.dtype), mode="drop")
    return write(k_cache, k), write(v_cache, v)


def write_paged(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, page_table: jax.Array,
                start: jax.Array) -> tuple[jax.Array, jax.Array]:
    """New k/v [B,T,K,H] written at positions start[b]+t, i.e. page page_table[b, pos // P], slot pos % P.
    Unused table entries point at page 0, scratch that nothing reads, and so do positions past the table."""
    B, T = k.shape[:2]
    P, max_pages = k_pages.shape[1], page_table.shape[1]
    pos = start[:, None] + jnp.arange(T)[None, :]  # [B, T]
    page = jnp.take_along_axis(page_table, jnp.minimum(pos // P, max_pages - 1), axis=1)  # [B, T]
    page = jnp.where(pos < max_pages * P, page, 0)  # past the table (bucket padding): the scratch page
    at = (page, pos % P)
    return (k_pages.at[at].set(k.astype(k_pages.dtype), mode="drop"),
            v_pages.at[at].set(v.astype(v_pages.dtype), mode="drop"))


def per_kv_head_shard(kernel, q, k_pages, v_pages, page_table, lengths, sinks=None):
    """A decode kernel on each device's own kv heads: under a mesh whose "tensor" axis splits the heads (queries
    [B,T,N,H] and pools [P,S,K,H] alike, so each device keeps whole GQA groups), one kernel per shard; a Pallas
    call has no partitioning rule of its own. `sinks` [N] (passed as kernel(..., sinks=)) split with the heads."""
    heads = jax.sharding.PartitionSpec(None, None, "tensor", None)
    whole = jax.sharding.PartitionSpec()
    args, specs, call = (q, k_pages, v_pages, page_table, lengths), (heads, heads, heads, whole, whole), kernel
    if sinks is not None:
        args, specs = args + (sinks,), specs + (jax.sharding.PartitionSpec("tensor"),)
        call = lambda *a: kernel(*a[:-1], sinks=a[-1])  # noqa: E731
    tp = mesh_axis_size("tensor")
    if tp == 1 or k_pages.shape[2] % tp:
        return call(*args)
    mesh = jax.sharding.get_abstract_mesh()
    return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=heads, check_vma=False)(*args)


def attend_paged(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array, lengths: jax.Array, *,
                 impl: str = "xla", scale: float | None = None, window: int | None = None,
                 softcap: float | None = None, sinks: jax.Array | None = None, chunk: int | None = None) -> jax.Array:
    """attend_cached over a paged cache: queries [B,T,N,H] at positions lengths[b]-T+t attend causally to the
    positions [0, lengths[b]) their page tables hold. impl "pallas" with few queries runs the paged decode kernel;
    otherwise each sequence's pages are gathered into a contiguous [B, S, K, H] cache for the xla path."""
    B, T, N, H = q.shape
    scale = H ** -0.5 if scale is None else scale
    if impl == "pallas" and T <= DECODE_KERNEL_MAX_QUERIES:
        extra = {k: v for k, v in (("window", window), ("softcap", softcap), ("chunk", chunk)) if v is not None}
        kernel = functools.partial(paged_decode_attention, sm_scale=scale, **extra)
        return per_kv_head_shard(kernel, q, k_pages, v_pages, page_table, lengths, sinks)
    _, P, K, _ = k_pages.shape
    S = page_table.shape[1] * P
    k, v = (pages[page_table].reshape(B, S, K, H) for pages in (k_pages, v_pages))  # [B, S, K, H]
    return xla_attention(q, k, v, _cache_mask(lengths, T, S, window, chunk), scale, softcap, sinks)


class Attention(nnx.Module):
    """Multi-head attention with grouped kv heads: q/k/v/o projections, optional q/k norms and RoPE.

    Self-attention by default, causal (decoder) or bidirectional (`causal=False`, an encoder); `window` makes
    a causal layer a sliding-window one. Given `kv` (keys and values of another sequence, from `project_kv`),
    it is cross-attention: queries from `x`, keys and values from the context (Vaswani et al. 2017).
    """

    def __init__(self, cfg: ModelConfig, *, causal: bool = True, window: int | None = None, layer: int = 0,
                 rngs: nnx.Rngs):
        D, N = cfg.d_model, cfg.n_heads
        K, H = cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer)  # Gemma 4's full layers differ from the rest
        # Gemma 4: full-attention layers' values are their keys' projection (no v_proj)
        k_eq_v = cfg.attention.k_eq_v and cfg.layer_type(layer) == "full_attention"
        kw = dict(bias=cfg.use_bias or cfg.attention.qkv_bias, std=cfg.init_std, param_dtype=cfg.param_dtype,
                  compute_dtype=cfg.compute_dtype, rngs=rngs)
        # Qwen3-Next / Qwen3.5: q_proj also emits an output gate, laid out per head as [query_h | gate_h] (2H wide)
        self.output_gate = cfg.attention.output_gate
        self.q_proj = Linear(D, N * H * (2 if self.output_gate else 1), axes=("heads", "embed"), **kw)
        self.k_proj = Linear(D, K * H, axes=("kv_heads", "embed"), **kw)
        self.v_proj = None if k_eq_v else Linear(D, K * H, axes=("kv_heads", "embed"), **kw)
        kw.update(bias=cfg.use_bias, std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)  # residual output (GPT-2 init)
        self.o_proj = Linear(N * H, D, axes=("embed", "heads"), **kw)
        # q/k RMSNorm: per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2)
        self.qk_norm = cfg.attention.qk_norm
        self.qk_norm_after_rope = cfg.attention.qk_norm_after_rope  # Hunyuan: per-head norms of rotated q, k
        weighted = cfg.attention.qk_norm in ("head", "proj")
        self.q_norm = make_norm(cfg, H if cfg.attention.qk_norm == "head" else N * H) if weighted else None
        self.k_norm = make_norm(cfg, H if cfg.attention.qk_norm == "head" else K * H) if weighted else None
        # Llama 4: per-head RMS without a weight, after RoPE, on RoPE layers only
        self.qk_rms_eps = cfg.norm_eps if cfg.attention.qk_norm == "rms" and cfg.layer_rope(layer) else None
        self.chunk = cfg.layer_chunk(layer)
        self.v_norm_eps = cfg.norm_eps if cfg.attention.v_norm else None  # Gemma 4: weightless RMSNorm of values
        self.n_heads, self.n_kv_heads, self.head_dim = N, K, H
        self.causal, self.window = causal, window
        self.scale, self.softcap = cfg.layer_attention_scale(layer), cfg.attention.logit_softcap
        # gpt-oss: a learned logit per query head in every softmax denominator (attends to nothing)
        self.sinks = (nnx.Param(jnp.zeros((N,), dtype_of(cfg.param_dtype)), logical_axes=("heads",))
                      if cfg.attention.sinks else None)
        self.impl = cfg.attention_impl

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, S, K, H] of a sequence [B, S, D] (for cross-attention: once per source)."""
        B, S, _ = x.shape
        k = self.k_proj(x)  # [B, S, K*H]
        if self.qk_norm == "proj":
            k = self.k_norm(k)
        k = k.reshape(B, S, self.n_kv_heads, self.head_dim)  # [B, S, K, H]
        v = k if self.v_proj is None else self.v_proj(x).reshape(B, S, self.n_kv_heads, self.head_dim)  # [B, S, K, H]
        if self.qk_norm == "head" and not self.qk_norm_after_rope:
            k = self.k_norm(k)
        if self.v_norm_eps is not None:
            v = rms_normalize(v, self.v_norm_eps)
        return k, v

    def project_q(self, x: jax.Array, *, with_gate: bool = False):
        """Queries [B, T, N, H] of [B, T, D], q-normed when the config says so; `with_gate`: (queries, output gate
        [B, T, N*H] or None), the gate's pre-sigmoid logits that multiply the attention output (attention.output_gate)."""
        B, T, _ = x.shape
        N, H = self.n_heads, self.head_dim
        q, gate = self.q_proj(x), None  # [B, T, N*H], or [B, T, N*2H] with a gate
        if self.output_gate:  # per head [query_h | gate_h]; norms and RoPE touch the query half only
            q, gate = (t.reshape(B, T, N * H) for t in jnp.split(q.reshape(B, T, N, 2 * H), 2, axis=-1))
        if self.qk_norm == "proj":
            q = self.q_norm(q)
        q = q.reshape(B, T, N, H)  # [B, T, N, H]
        q = self.q_norm(q) if self.qk_norm == "head" and not self.qk_norm_after_rope else q
        return (q, gate) if with_gate else q

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None,
                 segment_ids: jax.Array | SegmentIds | None = None, cache: LayerCache | None = None,
                 kv: tuple[jax.Array, jax.Array] | None = None, *, return_kv: bool = False):  # [B, T, D] -> [B, T, D]
        """`segment_ids` is [B, T] (self-attention within packed documents) or a (q [B, T], kv [B, S]) pair.

        With `cache` (k_cache, v_cache, start), the new keys/values go to slots start[b] + t, the queries
        attend to the cache, and the result is (out, (k_cache, v_cache)). With `kv` (k, v) [B, S, K, H]
        this is cross-attention: neither RoPE nor a cache applies to the context. `return_kv` (self-attention
        without a cache) returns (out, (k, v)) with this layer's rotated keys and values, for layers that reuse them.
        """
        B, T, _ = x.shape
        q, gate = self.project_q(x, with_gate=True)  # [B, T, N, H], [B, T, N*H] or None
        if kv is None:
            k, v = self.project_kv(x)  # [B, T, K, H]
            q, k = self.rotate(q, rope), self.rotate(k, rope, keys=True)
        elif rope is not None or cache is not None:
            raise ValueError("cross-attention (kv given) takes neither rope nor a cache")
        else:
            k, v = kv  # [B, S, K, H]
        if isinstance(cache, PagedLayer):
            k_pages, v_pages = write_paged(cache.k_pages, cache.v_pages, k, v, cache.page_table, cache.start)
            return self._attend(q, cache._replace(k_pages=k_pages, v_pages=v_pages), None, gate), (k_pages, v_pages)
        if cache is not None:
            k_cache, v_cache, start = cache
            k_cache, v_cache = write_cache(k_cache, v_cache, k, v, start, self.impl)
            return self._attend(q, (k_cache, v_cache, start), None, gate), (k_cache, v_cache)
        out = self._attend(q, (k, v), segment_ids, gate)
        return (out, (k, v)) if return_kv else out

    def reuse(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None, segment_ids: jax.Array | None,
              source) -> jax.Array:  # [B, T, D] -> [B, T, D]
        """A kv-shared layer (Gemma 3n / 4): queries of x attend to an earlier layer's keys and values, `source`:
        its (k, v) [B, T, K, H] of these tokens, or its cache (LayerCache / PagedLayer) with these tokens written."""
        q, gate = self.project_q(x, with_gate=True)
        return self._attend(self.rotate(q, rope), source, segment_ids, gate)

    def rotate(self, x: jax.Array, rope, keys: bool = False) -> jax.Array:  # [B, T, heads, H]
        """Queries or keys positioned: RoPE (cos, sin), then the norms that follow it (Hunyuan's per-head norms, Llama
        4's weightless RMS). A NoPE layer of Llama 4 gets a QueryScale instead: its queries times that temperature."""
        if isinstance(rope, QueryScale):
            return x if keys else (x.astype(jnp.float32) * rope.scale[:, :, None, None]).astype(x.dtype)
        if rope is not None:
            x = apply_rope(x, *rope)
        if self.qk_norm_after_rope:
            x = (self.k_norm if keys else self.q_norm)(x)
        if self.qk_rms_eps is not None:
            x = rms_normalize(x, self.qk_rms_eps)
        return x

    def _attend(self, q: jax.Array, source, segment_ids, gate: jax.Array | None = None) -> jax.Array:
        """Queries [B, T, N, H] against `source` -- (k, v) of the same tokens, a cache (k_cache, v_cache, start) or a
        PagedLayer, both already holding these T tokens at start[b] + t -- then times sigmoid(gate) [B, T, N*H] when
        there is an output gate, then o_proj: [B, T, D]."""
        B, T = q.shape[:2]
        kw = dict(impl=self.impl, scale=self.scale, window=self.window, softcap=self.softcap, chunk=self.chunk,
                  sinks=None if self.sinks is None else self.sinks[...])
        if isinstance(source, PagedLayer):
            out = attend_paged(q, source.k_pages, source.v_pages, source.page_table, source.start + T, **kw)
        elif len(source) == 3:
            k_cache, v_cache, start = source
            out = attend_cached(q, k_cache, v_cache, start + T, **kw)  # [B, T, N, H]
        else:
            seg = segment_ids if segment_ids is None or isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
            out = attend(q, *source, causal=self.causal, segment_ids=seg, **kw)  # [B, T, N, H]
        out = out.reshape(B, T, self.n_heads * self.head_dim)  # [B, T, N*H]
        if gate is not None:  # Qwen3-Next: attn_output * sigmoid(gate), in the compute dtype
            out = out * jax.nn.sigmoid(gate)
        return self.o_proj(out)
