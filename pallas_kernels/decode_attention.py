"""Flash-decoding in Pallas (Triton backend): a few new queries against a KV cache, split over its length.

Dao, Haziza, Massa, Sizov, "Flash-Decoding for long-context inference" (2023),
https://crfm.stanford.edu/2023/10/12/flashdecoding.html.

q [B, Tq, N, H] are the last Tq positions of each sequence: query i sits at p = lengths[b] - Tq + i and
attends causally to cache positions [0, lengths[b]); cache entries at or past lengths[b] are never
read into the result (even NaN there is harmless). A sliding window W keeps only keys p - W < s <= p;
a chunk C only keys (p // C) * C <= s <= p (Llama 4); a soft-cap C turns scores into C tanh(scores / C)
before masking (as flash_attention); attention sinks [N] (gpt-oss) join each row's softmax denominator.

  split     grid (B, K, row tiles, n_splits): the Tq * G query rows that share kv head k form
            [block_m, H] tiles (block_m = Tq * G padded to a power of two in [16, 128]), so GQA
            decoding is matmuls rather than matrix-vector products; each program walks its share of
            the cache in [block_k, H] tiles with an online softmax and writes a normalised partial
            output and its log2-sum-exp. Tiles past lengths[b] are skipped: work follows the lengths.
            With a window (or a chunk) the splits share out only the band of tiles it reaches (at most
            ceil((W + Tq - 2) / block_k) + 1 of them, W -> C for a chunk, wherever it lies), not the whole cache.
  combine   one XLA reduction over splits: out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max); a row's
            sink enters here, once: one more term 2^(sink - max) in the denominator (max including it).

Forward only: decoding needs no gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tuning
from pallas_kernels.common import (band_loop, ceil_blocks, check_addressable, check_block, check_chunk, check_sinks,
                                   check_window_softcap, chunk_start, clamp_band, fit_block, floor_blocks, idiv, imax,
                                   imin, next_power_of_2, pad_axis, resolve_interpret, round_up)

LOG2_E = math.log2(math.e)
TARGET_PROGRAMS = 264  # about two waves on an H100 (132 SMs): split the cache until the grid has this many
MAX_BLOCK_M = 128  # query rows per program (fp32 accumulator [block_m, H] lives in registers)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Cache tile length (power of two >= 16), number of cache splits (None: enough to fill the GPU)."""

    block_k: int = 128
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_block("block_k", self.block_k)
        if self.num_splits is not None and (not isinstance(self.num_splits, int) or self.num_splits < 1):
            raise ValueError(f"num_splits must be a positive integer or None, got {self.num_splits!r}")

    @classmethod
    def default(cls, head_dim: int, dtype=jnp.bfloat16) -> "BlockSizes":
        """The current GPU target's cache tile, warps and stages for this head dim and dtype: the largest that
        compile without register spills for a 16-row query tile (pallas_kernels.tuning, targets/blocks.json)."""
        return cls(**tuning.decode_defaults(head_dim, dtype))


@dataclasses.dataclass(frozen=True)
class _Static:
    sm_scale: float
    n_new: int  # Tq
    group: int  # G = N // K
    block_k: int
    tiles_per_split: int
    n_tiles: int  # cache tiles in the (padded) cache
    block_m: int  # query rows per program
    window: int | None = None  # query at position p sees cache positions (p - window, p]
    softcap: float | None = None  # scores = softcap * tanh(scores / softcap)
    chunk: int | None = None  # query at position p sees cache positions [(p // chunk) * chunk, p]


def _dot(a, b, *, trans_b=False):
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_b=trans_b, precision=precision)


def _band(length, row_tile, split, st: _Static):
    """(lo, clear_lo, clear_hi, hi): the cache tiles program (row_tile, split) visits; [clear_lo, clear_hi) unmasked.

    The row tile's queries sit at positions p_first .. p_last (its padded rows are ignored: they are
    sliced off); it needs tiles from the one holding p_first's oldest key (p_first - W + 1 with a window,
    the start of p_first's chunk with a chunk, else 0) to the one holding p_last, and split s takes the
    s-th run of tiles_per_split of them. A tile is clear when p_first sees its last key and p_last its first.
    """
    M, bk = st.block_m, st.block_k
    p_first = length - st.n_new + idiv(row_tile * M, st.group)  # row r holds token r // G
    p_last = imin(length - st.n_new + idiv(row_tile * M + M - 1, st.group), length - 1)
    end = imin(ceil_blocks(p_last + 1, bk), st.n_tiles)
    first, last = 0, 0  # the oldest key p_first / p_last sees
    if st.window is not None:
        first, last = p_first - st.window + 1, p_last - st.window + 1
    if st.chunk is not None:
        first, last = imax(first, chunk_start(p_first, st.chunk)), imax(last, chunk_start(p_last, st.chunk))
    start, clear_lo = floor_blocks(first, bk), ceil_blocks(last, bk)
    lo = start + split * st.tiles_per_split
    hi = imin(lo + st.tiles_per_split, end)
    return clamp_band(lo, clear_lo, floor_blocks(p_first + 1, bk), hi)


def _tile_step(carry, q, k, v, kv_start, q_pos, length, st: _Static, masked: bool):
    """One online-softmax step of the query rows over one cache tile (shared with paged_attention).

    carry (acc [M, H], m [M], l [M]) float32 in log2 units; q [M, H]; k, v [bk, H] holding cache positions
    kv_start .. kv_start + bk - 1; q_pos [M] the rows' positions. masked=False: every row sees the whole tile.
    """
    acc, m, l = carry
    qk = _dot(q, k, trans_b=True)  # [M, bk]
    if st.softcap is None:
        s = qk * (st.sm_scale * LOG2_E)  # log2 units: exp2 is the native instruction
    else:
        s = jnp.tanh(qk * (st.sm_scale / st.softcap)) * (st.softcap * LOG2_E)
    if masked:
        kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, (k.shape[0],), 0)
        live = kv_pos < length
        visible = (kv_pos[None, :] <= q_pos[:, None]) & live[None, :]
        if st.window is not None:
            visible = visible & (kv_pos[None, :] > q_pos[:, None] - st.window)
        if st.chunk is not None:
            visible = visible & (kv_pos[None, :] >= chunk_start(q_pos, st.chunk)[:, None])
        s = jnp.where(visible, s, -jnp.inf)
        v = jnp.where(live[:, None], v, 0)  # stale cache rows may hold anything, even NaN
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = alpha * l + p.sum(axis=1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_new, l


def _init_carry(q):
    """(acc, m, l) before the first tile; m starts at -1e30, not -inf, so fully masked tiles stay NaN-free."""
    M = q.shape[0]
    return jnp.zeros(q.shape, jnp.float32), jnp.full((M,), -1e30, jnp.float32), jnp.zeros((M,), jnp.float32)


def _write_partial(carry, o_ref, lse_ref):
    """The split's normalised output and log2-sum-exp (-inf, weight 0 in the combine, when it saw no key)."""
    acc, m, l = carry
    seen = l > 0.0
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = acc / l[:, None]
    lse_ref[...] = jnp.where(seen, m + jnp.log2(l), -jnp.inf)


def _split_kernel(length_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: _Static):
    # length_ref []; q_ref [bm, H]; k_ref, v_ref [S, H]; o_ref [bm, H] float32; lse_ref [bm] float32
    M, bk = st.block_m, st.block_k
    row_tile, split = pl.program_id(2), pl.program_id(3)
    length = length_ref[()]
    q = q_ref[...]
    rows = row_tile * M + lax.broadcasted_iota(jnp.int32, (M,), 0)
    q_pos = length - st.n_new + idiv(rows, st.group)  # row r holds token r // G

    def step(tile, carry, masked: bool):
        kv = pl.ds(tile * bk, bk)
        return _tile_step(carry, q, k_ref[kv, :], v_ref[kv, :], tile * bk, q_pos, length, st, masked)

    carry = band_loop(_band(length, row_tile, split, st), step, _init_carry(q))
    _write_partial(carry, o_ref, lse_ref)


def _split_call(q_rows, k_cache, v_cache, lengths, st: _Static, blocks: BlockSizes, interpret: bool):
    """Partial (o [B, K, splits, M, H], lse [B, K, splits, M]) float32 over each cache split."""
    B, K, M, H = q_rows.shape
    S, bm = k_cache.shape[1], st.block_m
    n_splits = -(-_band_tiles(st) // st.tiles_per_split)
    return pl.pallas_call(
        functools.partial(_split_kernel, st=st),
        grid=(B, K, M // bm, n_splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, r, s: (b,)),
            pl.BlockSpec((None, None, bm, H), lambda b, h, r, s: (b, h, r, 0)),
            pl.BlockSpec((None, S, None, H), lambda b, h, r, s: (b, 0, h, 0)),
            pl.BlockSpec((None, S, None, H), lambda b, h, r, s: (b, 0, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, bm, H), lambda b, h, r, s: (b, h, s, r, 0)),
            pl.BlockSpec((None, None, None, bm), lambda b, h, r, s: (b, h, s, r)),
        ],
        out_shape=[jax.ShapeDtypeStruct((B, K, n_splits, M, H), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, n_splits, M), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="decode_attention_split",
    )(lengths, q_rows, k_cache, v_cache)


def _combine(o, lse, sink_rows=None):
    """Merge split partials: o [B, K, P, M, H], lse [B, K, P, M] (log2) -> [B, K, M, H] float32.

    sink_rows [K, M] (log2 units): each row's sink joins the denominator once, as one more partial with no value:
    out = sum_s 2^(lse_s - m) o_s / (sum_s 2^(lse_s - m) + 2^(sink - m)), m the max over lse_s and the sink.
    """
    m = lse.max(axis=2, keepdims=True)
    if sink_rows is not None:
        m = jnp.maximum(m, sink_rows[None, :, None, :])  # finite: every row has its sink
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp2(lse - m)  # [B, K, P, M]; 0 for empty splits
    total = w.sum(axis=2)
    if sink_rows is not None:
        total = total + jnp.exp2(sink_rows[None] - m[:, :, 0])
    return (w[..., None] * o).sum(axis=2) / jnp.where(total == 0.0, 1.0, total)[..., None]  # exact fp32, no TF32


def _sink_rows(sinks, K: int, G: int, rows: int):
    """[N] sinks (natural log) -> [K, rows] in log2 units, row r of kv head k holding query head k * G + r % G."""
    if sinks is None:
        return None
    return sinks.reshape(K, G)[:, jnp.arange(rows) % G] * LOG2_E


def _band_tiles(st: _Static) -> int:
    """Most cache tiles one program can need: all of them, or those a window of W (or a chunk of C) over Tq
    queries reaches: keys from p_first - W + 1 (or p_first's chunk start, at most C - 1 back) to p_last."""
    reach = [r for r in (st.window, st.chunk) if r is not None]
    if not reach:
        return st.n_tiles
    return min(st.n_tiles, ceil_blocks(min(reach) + st.n_new - 2, st.block_k) + 1)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                     sm_scale: float | None = None, window: int | None = None, softcap: float | None = None,
                     sinks: jax.Array | None = None, chunk: int | None = None,
                     block_sizes: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
    """Attention of the last Tq tokens over a cache of per-sequence length; q [B, Tq, N, H] -> [B, Tq, N, H].

    window W: the query at position p = lengths[b] - Tq + t sees cache positions p - W < s <= p.
    softcap C: scores become C * tanh(scores / C) before masking (Gemma 2).
    sinks [N] (gpt-oss): head n's logit joins each of its rows' softmax denominators (in the combine).
    chunk C (Llama 4): the query at position p sees cache positions (p // C) * C <= s <= p.
    """
    _check_inputs(q, k_cache, v_cache, lengths)
    window, softcap = check_window_softcap(window, softcap)
    chunk, sinks = check_chunk(chunk), check_sinks(sinks, q.shape[2])
    interpret = resolve_interpret(interpret, "decode_attention")
    B, Tq, N, H = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    G = N // K
    blocks = block_sizes or BlockSizes.default(H, q.dtype)
    block_k = fit_block(blocks.block_k, S)
    S_pad, H_pad, M = round_up(S, block_k), max(16, next_power_of_2(H)), Tq * G
    check_addressable("k_cache", (B, S_pad, K, H_pad))
    block_m = min(MAX_BLOCK_M, max(16, next_power_of_2(M)))
    if not interpret:  # tiles that cannot fit the target's shared memory fail here, before any compile
        tuning.check_decode_fits(dataclasses.replace(blocks, block_k=block_k), block_m, H, q.dtype)
    # Allocate caches with a length that is a multiple of block_k and head_dim 64/128: then nothing is copied here.
    k_cache, v_cache = (pad_axis(pad_axis(c, 1, S_pad), 3, H_pad) for c in (k_cache, v_cache))
    st = _Static(sm_scale=float(H ** -0.5 if sm_scale is None else sm_scale), n_new=Tq, group=G,
                 block_k=block_k, tiles_per_split=1, n_tiles=S_pad // block_k, block_m=block_m,
                 window=window, softcap=softcap, chunk=chunk)
    n_band = _band_tiles(st)  # the splits share out this many tiles
    n_splits = blocks.num_splits or max(1, TARGET_PROGRAMS // (B * K * -(-M // block_m)))
    st = dataclasses.replace(st, tiles_per_split=-(-n_band // min(n_splits, n_band)))

    q_rows = q.reshape(B, Tq, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, M, H)  # row r: token r // G
    q_rows = pad_axis(pad_axis(q_rows, 2, round_up(M, block_m)), 3, H_pad)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, S)
    o, lse = _split_call(q_rows, k_cache, v_cache, lengths, st, blocks, interpret)
    out = _combine(o, lse, _sink_rows(sinks, K, G, q_rows.shape[2]))[:, :, :M, :H]  # [B, K, M, H]
    return out.reshape(B, K, Tq, G, H).transpose(0, 2, 1, 3, 4).reshape(B, Tq, N, H).astype(q.dtype)


def _check_inputs(q, k_cache, v_cache, lengths) -> None:
    if q.ndim != 4 or k_cache.ndim != 4:
        raise ValueError(f"q must be [B, Tq, N, H] and caches [B, S, K, H]; got {q.shape} and {k_cache.shape}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {k_cache.shape} and {v_cache.shape}")
    (B, Tq, N, H), (Bc, S, K, Hc) = q.shape, k_cache.shape
    if (B, H) != (Bc, Hc):
        raise ValueError(f"q {q.shape} and the cache {k_cache.shape} disagree on batch or head_dim")
    if Tq == 0 or S == 0:
        raise ValueError(f"need at least one query and one cache slot, got Tq={Tq}, S={S}")
    if N % K:
        raise ValueError(f"{N} query heads cannot be grouped over {K} kv heads (K must divide N)")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"q and caches must share one of float32/bfloat16/float16, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers of shape {(B,)}, got {lengths.dtype} {lengths.shape}")


# ----------------------------------------------------------------------------------------------------------

def decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                               sm_scale: float | None = None, window: int | None = None,
                               softcap: float | None = None, sinks: jax.Array | None = None,
                               chunk: int | None = None) -> jax.Array:
    """Plain-jnp decode attention with the kernel's semantics (fp32 math; queries seeing no key give 0)."""
    window, softcap = check_window_softcap(window, softcap)
    chunk = check_chunk(chunk)
    B, Tq, N, H = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    sm_scale = H ** -0.5 if sm_scale is None else sm_scale
    lengths = jnp.clip(lengths, 0, S)
    q_pos = lengths[:, None] - Tq + jnp.arange(Tq)[None, :]  # [B, Tq]
    kv_pos = jnp.arange(S)
    mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, None, :] < lengths[:, None, None])  # [B,Tq,S]
    if window is not None:
        mask = mask & (kv_pos[None, None, :] > q_pos[:, :, None] - window)
    if chunk is not None:
        mask = mask & (kv_pos[None, None, :] // chunk == q_pos[:, :, None] // chunk)
    live = (kv_pos[None, :] < lengths[:, None])[:, :, None, None]  # [B, S, 1, 1]
    v = jnp.where(live, v_cache.astype(jnp.float32), 0.0)
    qg = q.astype(jnp.float32).reshape(B, Tq, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k_cache.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) * sm_scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    if sinks is not None:
        sink = check_sinks(sinks, N).reshape(1, K, N // K, 1, 1)
        m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bkgts,bskh->btkgh", p, v, precision=lax.Precision.HIGHEST)
    return out.reshape(B, Tq, N, H).astype(q.dtype)
