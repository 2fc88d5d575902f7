"""Flash-decoding for multi-head latent attention (MLA) in its absorbed form, in Pallas (Triton backend).

DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model" (2024),
https://arxiv.org/abs/2405.04434, section 2.1 (low-rank key-value compression, decoupled RoPE, and the
absorption of W_UK into the queries and W_UV into the output); DeepSeek-V3 (https://arxiv.org/abs/2412.19437)
keeps it. The split over the cache is flash-decoding's (pallas_kernels.decode_attention; Dao et al. 2023).

MLA caches per token one normed latent c [C] (C = kv_lora_rank, 512 in V2/V3) and one rotated rope key pe [R]
(R = qk_rope_head_dim, 64), both shared by all heads. Head n's key is [c W_UK[n]^T ; pe] and its value
c W_UV[n]^T; with q_lat = q_nope W_UK[n] and o = o_lat W_UV[n]^T applied outside, decoding is MQA with one
kv head whose values are its keys' first C columns:

  scores[b, t, n, s] = (q_lat[b, t, n] . c[b, s] + q_pe[b, t, n] . pe[b, s]) * sm_scale
  o_lat[b, t, n]     = softmax_s(scores) . c[b, s]       (query t at p = lengths[b] - T + t sees s <= p)

  split     grid (B, row tiles, n_splits): all T * N query rows share the one kv head, so they stack into
            [block_m, C] and [block_m, R] tiles (row r = t * N + n: token r // N), and decoding is matmuls.
            Each program streams its share of the cache in [block_k, C] + [block_k, R] tiles, each latent tile
            loaded once for both matmuls (s = q_lat c^T + q_pe pe^T, acc += p c), with decode_attention's online
            softmax and tile bands: tiles past lengths[b], and with a window tiles before it, are never visited.
  combine   decode_attention's XLA reduction over the splits' normalised partials and log2-sum-exps.

Tiles (tuning.LATENT_DECODE, measured by compiling for sm_90 and sm_80): at C = 512 a program holds 16 query rows
(its fp32 accumulator [16, 512] is 64 registers a thread; 32 rows spill), so DeepSeek-V3's 128 heads are 8 row tiles
that each stream the cache; narrower latents take up to 64 rows. C and R are padded to powers of two >= 16.

Forward only: decoding needs no gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import decode_attention as _decode
from pallas_kernels import tuning
from pallas_kernels.common import (band_loop, check_addressable, check_block, check_window_softcap, fit_block, idiv,
                                   next_power_of_2, pad_axis, resolve_interpret, round_up)
from pallas_kernels.decode_attention import decode_attention_reference


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query rows per program (block_m, at most: fewer when T * N is smaller), cache tile length (block_k), both
    powers of two >= 16; cache splits (None: enough to fill the GPU), warps, pipeline stages."""

    block_m: int = 16
    block_k: int = 32
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_block("block_m", self.block_m)
        check_block("block_k", self.block_k)
        if self.num_splits is not None and (not isinstance(self.num_splits, int) or self.num_splits < 1):
            raise ValueError(f"num_splits must be a positive integer or None, got {self.num_splits!r}")

    @classmethod
    def default(cls, latent_dim: int, rope_dim: int, dtype=jnp.bfloat16) -> "BlockSizes":
        """The current GPU target's tiles for this latent and rope width (tuning.latent_decode_defaults)."""
        return cls(**tuning.latent_decode_defaults(latent_dim, rope_dim, dtype))


def _tile_step(carry, q_lat, q_pe, c, pe, kv_start, q_pos, length, st: _decode._Static, masked: bool):
    """One online-softmax step over one cache tile: carry (acc [M, C], m [M], l [M]) float32 in log2 units;
    q_lat [M, C], q_pe [M, R]; c [bk, C], pe [bk, R] hold cache positions kv_start .. kv_start + bk - 1."""
    acc, m, l = carry
    if masked:
        kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, (c.shape[0],), 0)
        live = kv_pos < length
        c = jnp.where(live[:, None], c, 0)  # stale cache rows may hold anything, even NaN: c is also the value
    s = _decode._dot(q_lat, c, trans_b=True) + _decode._dot(q_pe, pe, trans_b=True)  # [M, bk]
    s = s * (st.sm_scale * _decode.LOG2_E)
    if masked:
        visible = (kv_pos[None, :] <= q_pos[:, None]) & live[None, :]
        if st.window is not None:
            visible = visible & (kv_pos[None, :] > q_pos[:, None] - st.window)
        s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = alpha * l + p.sum(axis=1)
    acc = alpha[:, None] * acc + _decode._dot(p.astype(c.dtype), c)
    return acc, m_new, l


def _split_kernel(length_ref, q_lat_ref, q_pe_ref, c_ref, pe_ref, o_ref, lse_ref, *, st: _decode._Static):
    # length_ref []; q_lat_ref [bm, C]; q_pe_ref [bm, R]; c_ref [S, C], pe_ref [S, R]: the sequence's whole cache;
    # o_ref [bm, C] float32; lse_ref [bm] float32
    M, bk = st.block_m, st.block_k
    row_tile, split = pl.program_id(1), pl.program_id(2)
    length = length_ref[()]
    q_lat, q_pe = q_lat_ref[...], q_pe_ref[...]
    rows = row_tile * M + lax.broadcasted_iota(jnp.int32, (M,), 0)
    q_pos = length - st.n_new + idiv(rows, st.group)  # row r holds token r // N

    def step(tile, carry, masked: bool):
        kv = pl.ds(tile * bk, bk)
        return _tile_step(carry, q_lat, q_pe, c_ref[kv, :], pe_ref[kv, :], tile * bk, q_pos, length, st, masked)

    carry = band_loop(_decode._band(length, row_tile, split, st), step, _decode._init_carry(q_lat))
    _decode._write_partial(carry, o_ref, lse_ref)


def _split_call(q_lat, q_pe, c_cache, pe_cache, lengths, st: _decode._Static, blocks: BlockSizes, interpret: bool):
    """Partial (o [B, splits, M, C], lse [B, splits, M]) float32 over each cache split."""
    B, M, C = q_lat.shape
    S, R, bm = c_cache.shape[1], q_pe.shape[2], st.block_m
    n_splits = -(-_decode._band_tiles(st) // st.tiles_per_split)
    return pl.pallas_call(
        functools.partial(_split_kernel, st=st),
        grid=(B, M // bm, n_splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, r, s: (b,)),
            pl.BlockSpec((None, bm, C), lambda b, r, s: (b, r, 0)),
            pl.BlockSpec((None, bm, R), lambda b, r, s: (b, r, 0)),
            pl.BlockSpec((None, S, C), lambda b, r, s: (b, 0, 0)),
            pl.BlockSpec((None, S, R), lambda b, r, s: (b, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bm, C), lambda b, r, s: (b, s, r, 0)),
            pl.BlockSpec((None, None, bm), lambda b, r, s: (b, s, r)),
        ],
        out_shape=[jax.ShapeDtypeStruct((B, n_splits, M, C), jnp.float32),
                   jax.ShapeDtypeStruct((B, n_splits, M), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="latent_decode_attention_split",
    )(lengths, q_lat, q_pe, c_cache, pe_cache)


def latent_decode_attention(q_lat: jax.Array, q_pe: jax.Array, c_cache: jax.Array, pe_cache: jax.Array,
                            lengths: jax.Array, *, sm_scale: float, window: int | None = None,
                            block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
    """Absorbed MLA decoding: q_lat [B, T, N, C], q_pe [B, T, N, R] (the last T positions of each sequence, query t
    at p = lengths[b] - T + t) over the latent cache c_cache [B, S, C] (keys' first part and values) and rope
    cache pe_cache [B, S, R], seeing positions s <= p, s < lengths[b]; returns o_lat [B, T, N, C] in q_lat's dtype.

    sm_scale: the softmax scale (DeepSeek: (qk_nope_head_dim + qk_rope_head_dim) ** -0.5, times YaRN's mscale^2).
    window W: the query at p sees p - W < s <= p. Cache slots at or past lengths[b] are never read into the result.
    interpret: run in Pallas interpret mode (CPU); None/False compiles, unless JAXFORMER_PALLAS_INTERPRET is set.
    """
    _check_inputs(q_lat, q_pe, c_cache, pe_cache, lengths, sm_scale)
    window, _ = check_window_softcap(window, None)
    interpret = resolve_interpret(bool(interpret), "latent_decode_attention")
    B, T, N, C = q_lat.shape
    S, R = c_cache.shape[1], pe_cache.shape[2]
    blocks = block_sizes or BlockSizes.default(C, R, q_lat.dtype)
    block_k, M = fit_block(blocks.block_k, S), T * N
    block_m = min(blocks.block_m, max(16, next_power_of_2(M)))
    S_pad, C_pad, R_pad = round_up(S, block_k), max(16, next_power_of_2(C)), max(16, next_power_of_2(R))
    check_addressable("c_cache", (B, S_pad, C_pad))
    if not interpret:  # tiles that cannot fit the target's shared memory fail here, before any compile
        tuning.check_latent_decode_fits(dataclasses.replace(blocks, block_m=block_m, block_k=block_k), C, R,
                                        q_lat.dtype)
    # Allocate caches with a length that is a multiple of block_k and C, R powers of two: then nothing is copied here.
    c_cache = pad_axis(pad_axis(c_cache, 1, S_pad), 2, C_pad)
    pe_cache = pad_axis(pad_axis(pe_cache, 1, S_pad), 2, R_pad)
    st = _decode._Static(sm_scale=float(sm_scale), n_new=T, group=N, block_k=block_k, tiles_per_split=1,
                         n_tiles=S_pad // block_k, block_m=block_m, window=window)
    n_band, row_tiles = _decode._band_tiles(st), -(-M // block_m)  # the splits share out n_band tiles
    n_splits = blocks.num_splits or max(1, _decode.TARGET_PROGRAMS // (B * row_tiles))
    st = dataclasses.replace(st, tiles_per_split=-(-n_band // min(n_splits, n_band)))

    q_lat = pad_axis(pad_axis(q_lat.reshape(B, M, C), 1, row_tiles * block_m), 2, C_pad)  # row r: token r // N
    q_pe = pad_axis(pad_axis(q_pe.reshape(B, M, R), 1, row_tiles * block_m), 2, R_pad)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, S)
    o, lse = _split_call(q_lat, q_pe, c_cache, pe_cache, lengths, st, blocks, interpret)
    out = _decode._combine(o[:, None], lse[:, None])[:, 0, :M, :C]  # [B, M, C]
    return out.reshape(B, T, N, C).astype(q_lat.dtype)


def _check_inputs(q_lat, q_pe, c_cache, pe_cache, lengths, sm_scale) -> None:
    if q_lat.ndim != 4 or q_pe.ndim != 4 or c_cache.ndim != 3 or pe_cache.ndim != 3:
        raise ValueError(f"q_lat, q_pe must be [B, T, N, C], [B, T, N, R] and c_cache, pe_cache [B, S, C], [B, S, R]; "
                         f"got {q_lat.shape}, {q_pe.shape}, {c_cache.shape}, {pe_cache.shape}")
    (B, T, N, C), R = q_lat.shape, q_pe.shape[3]
    if q_pe.shape[:3] != (B, T, N) or c_cache.shape[0] != B or c_cache.shape[2] != C:
        raise ValueError(f"q_lat {q_lat.shape}, q_pe {q_pe.shape} and c_cache {c_cache.shape} disagree on batch, "
                         "tokens, heads or the latent width C")
    if pe_cache.shape != (*c_cache.shape[:2], R):
        raise ValueError(f"pe_cache must be [B, S, R] = {(*c_cache.shape[:2], R)} (R from q_pe), got {pe_cache.shape}")
    if T == 0 or N == 0 or C == 0 or R == 0 or c_cache.shape[1] == 0:
        raise ValueError(f"need at least one query, head, cache slot and latent/rope column; got q_lat {q_lat.shape}, "
                         f"q_pe {q_pe.shape}, c_cache {c_cache.shape}")
    dtypes = (q_lat.dtype, q_pe.dtype, c_cache.dtype, pe_cache.dtype)
    if len(set(dtypes)) != 1 or q_lat.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"queries and caches must share one of float32/bfloat16/float16, got {dtypes}")
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers of shape {(B,)}, got {lengths.dtype} {lengths.shape}")
    if (isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real) or not math.isfinite(sm_scale)
            or sm_scale <= 0):
        raise ValueError(f"sm_scale must be a finite Python float > 0 (MLA's is (qk_nope_head_dim + "
                         f"qk_rope_head_dim) ** -0.5, not derivable from C), got {sm_scale!r}")


# ----------------------------------------------------------------------------------------------------------

def latent_decode_attention_reference(q_lat: jax.Array, q_pe: jax.Array, c_cache: jax.Array, pe_cache: jax.Array,
                                      lengths: jax.Array, *, sm_scale: float, window: int | None = None) -> jax.Array:
    """Plain jnp: decode_attention_reference over one kv head, keys [c ; pe], values [c ; 0] cut to C columns."""
    C = q_lat.shape[-1]
    q = jnp.concatenate([q_lat, q_pe], axis=-1)  # [B, T, N, C + R]
    k = jnp.concatenate([c_cache, pe_cache], axis=-1)[:, :, None]  # [B, S, 1, C + R]
    v = jnp.concatenate([c_cache, jnp.zeros_like(pe_cache)], axis=-1)[:, :, None]
    return decode_attention_reference(q, k, v, lengths, sm_scale=sm_scale, window=window)[..., :C]
