"""Decode attention over a paged KV cache, in Pallas (Triton backend): flash-decoding whose tiles are pages.

Kwon et al., "Efficient Memory Management for Large Language Model Serving with PagedAttention" (SOSP 2023),
https://arxiv.org/abs/2309.06180; the split over the cache is flash-decoding's (pallas_kernels.decode_attention).

Layout. Keys and values live in a pool of fixed-size pages shared by every sequence,
k_pages, v_pages [num_pages, P, K, H]; sequence b's position s is slot s % P of page page_table[b, s // P]
(page_table [B, max_pages] int32). Pages may sit anywhere in the pool, in any order, and several sequences
may share a page (a common prefix). Table entries for pages at or past ceil(lengths[b] / P), and with a
window (or a chunk) those of pages wholly before every query's window (or chunk), are never read: they may
hold any index.

Semantics are decode_attention's: q [B, Tq, N, H] are the last Tq positions of each sequence (query i sits
at p = lengths[b] - Tq + i) and attend causally to positions [0, lengths[b]); GQA (K divides N), a sliding
window W (keys p - W < s <= p), a chunk C (keys (p // C) * C <= s <= p), a soft-cap C (C tanh(scores / C) before
masking), attention sinks (in the combine), fp32 accumulation.

  split     grid (B, K, row tiles, n_splits), as decode_attention: the Tq * G query rows sharing kv head k
            form [block_m, H] tiles. A program walks its share of the sequence's cache tiles; tile t reads
            the page index page_table[b, t // tiles_per_page] (one scalar load), then the [tile, H] keys and
            values of that page for kv head k straight from the pool. The tile is the page, or, for pages
            longer than the target's measured decode tile (BlockSizes.block_k), a power-of-two slice of it,
            so no tile holds more registers or shared memory than decode_attention's spill-free ones.
            Tiles past lengths[b] are never visited, nor, with a window, tiles before the band it reaches.
  combine   decode_attention's XLA reduction over the splits' normalised partials and log2-sum-exps (and sinks).

Forward only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import decode_attention as _decode
from pallas_kernels import tuning
from pallas_kernels.common import (band_loop, check_addressable, check_block, check_chunk, check_sinks,
                                   check_window_softcap, chunk_start, idiv, is_power_of_2, next_power_of_2, pad_axis,
                                   resolve_interpret, round_up)
from pallas_kernels.decode_attention import decode_attention_reference


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Splits of each sequence's pages (None: enough to fill the GPU), warps, pipeline stages, and block_k: the
    longest cache tile one loop step holds (a power of two >= 16). The page size comes from the arrays: a page
    of at most block_k positions is one tile, a longer page is cut into block_k slices."""

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
        """decode_attention's measured tile, warps and stages for the current GPU target (tuning.decode_defaults):
        every tile of this kernel is at most that tile, so it compiles within the same registers."""
        return cls(**tuning.decode_defaults(head_dim, dtype))


@dataclasses.dataclass(frozen=True)
class _Static(_decode._Static):
    """decode_attention's statics; block_k is the tile (a page or a slice of one), n_tiles max_pages * P // block_k."""

    tiles_per_page: int = 1  # P // block_k: tile t is slice t % tiles_per_page of table entry t // tiles_per_page


def _split_kernel(length_ref, table_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: _Static):
    # length_ref []; table_ref [max_pages] int32; q_ref [bm, H]; k_ref, v_ref [num_pages, P, H]: the whole pool
    # for this program's kv head; o_ref [bm, H] float32; lse_ref [bm] float32
    M, bk, per_page = st.block_m, st.block_k, st.tiles_per_page
    row_tile, split = pl.program_id(2), pl.program_id(3)
    length = length_ref[()]
    q = q_ref[...]
    rows = row_tile * M + lax.broadcasted_iota(jnp.int32, (M,), 0)
    q_pos = length - st.n_new + idiv(rows, st.group)  # row r holds token r // G

    def step(tile, carry, masked: bool):
        slot = idiv(tile, per_page)  # the page table entry holding this tile's positions
        page = table_ref[slot]  # one scalar load; the tile's keys and values are then one [bk, H] load each
        kv = pl.ds((tile - slot * per_page) * bk, bk) if per_page > 1 else slice(None)
        return _decode._tile_step(carry, q, k_ref[page, kv, :], v_ref[page, kv, :], tile * bk, q_pos, length, st,
                                  masked)

    carry = band_loop(_decode._band(length, row_tile, split, st), step, _decode._init_carry(q))
    _decode._write_partial(carry, o_ref, lse_ref)


def _split_call(q_rows, k_pages, v_pages, page_table, lengths, st: _Static, blocks: BlockSizes, interpret: bool):
    """Partial (o [B, K, splits, M, H], lse [B, K, splits, M]) float32 over each split of the sequences' pages."""
    B, K, M, H = q_rows.shape
    (num_pages, P), max_pages, bm = k_pages.shape[:2], page_table.shape[1], st.block_m
    n_splits = -(-_decode._band_tiles(st) // st.tiles_per_split)
    pool = pl.BlockSpec((num_pages, P, None, H), lambda b, h, r, s: (0, 0, h, 0))  # indexed in the kernel
    return pl.pallas_call(
        functools.partial(_split_kernel, st=st),
        grid=(B, K, M // bm, n_splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, r, s: (b,)),
            pl.BlockSpec((None, max_pages), lambda b, h, r, s: (b, 0)),
            pl.BlockSpec((None, None, bm, H), lambda b, h, r, s: (b, h, r, 0)),
            pool,
            pool,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, bm, H), lambda b, h, r, s: (b, h, s, r, 0)),
            pl.BlockSpec((None, None, None, bm), lambda b, h, r, s: (b, h, s, r)),
        ],
        out_shape=[jax.ShapeDtypeStruct((B, K, n_splits, M, H), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, n_splits, M), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="paged_decode_attention_split",
    )(lengths, page_table, q_rows, k_pages, v_pages)


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                           lengths: jax.Array, *, sm_scale: float | None = None, window: int | None = None,
                           softcap: float | None = None, sinks: jax.Array | None = None, chunk: int | None = None,
                           block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
    """q [B, Tq, N, H]: the last Tq positions of each sequence (query i sits at p = lengths[b] - Tq + i) attend
    causally to the sequence's positions [0, lengths[b]); position s of sequence b is stored at
    k_pages[page_table[b, s // P], s % P] (k_pages, v_pages: [num_pages, P, K, H], P the page size, a power of
    two >= 16). page_table [B, max_pages] int32; entries for pages at or past ceil(lengths[b] / P) are never read
    (they may hold any index, e.g. 0); the entries that are read must be valid page indices. Returns
    [B, Tq, N, H] in q's dtype.

    window W: the query at position p sees positions p - W < s <= p (pages wholly older are not read either).
    softcap C: scores become C * tanh(scores / C) before masking (Gemma 2).
    sinks [N] (gpt-oss): head n's logit joins each of its rows' softmax denominators (in the combine).
    chunk C (Llama 4): the query at position p sees positions (p // C) * C <= s <= p (older pages are not read).
    interpret: run in Pallas interpret mode (CPU); None/False compiles, unless JAXFORMER_PALLAS_INTERPRET is set.
    """
    _check_inputs(q, k_pages, v_pages, page_table, lengths)
    window, softcap = check_window_softcap(window, softcap)
    chunk, sinks = check_chunk(chunk), check_sinks(sinks, q.shape[2])
    interpret = resolve_interpret(bool(interpret), "paged_decode_attention")
    B, Tq, N, H = q.shape
    num_pages, P, K = k_pages.shape[:3]
    G, max_pages = N // K, page_table.shape[1]
    blocks = block_sizes or BlockSizes.default(H, q.dtype)
    tile = min(P, blocks.block_k)  # both powers of two: tile divides P
    H_pad, M = max(16, next_power_of_2(H)), Tq * G
    check_addressable("k_pages", (num_pages, P, K, H_pad))
    block_m = min(_decode.MAX_BLOCK_M, max(16, next_power_of_2(M)))
    if not interpret:  # tiles that cannot fit the target's shared memory fail here, before any compile
        tuning.check_decode_fits(dataclasses.replace(blocks, block_k=tile), block_m, H, q.dtype,
                                 kernel="paged_decode_attention")
    # Allocate pools with head_dim 64/128 (a power of two >= 16): otherwise the whole pool is padded (copied) per call.
    k_pages, v_pages = (pad_axis(p, 3, H_pad) for p in (k_pages, v_pages))
    st = _Static(sm_scale=float(H ** -0.5 if sm_scale is None else sm_scale), n_new=Tq, group=G, block_k=tile,
                 tiles_per_split=1, n_tiles=max_pages * (P // tile), block_m=block_m, window=window, softcap=softcap,
                 chunk=chunk, tiles_per_page=P // tile)
    n_band = _decode._band_tiles(st)  # the splits share out this many tiles
    n_splits = blocks.num_splits or max(1, _decode.TARGET_PROGRAMS // (B * K * -(-M // block_m)))
    st = dataclasses.replace(st, tiles_per_split=-(-n_band // min(n_splits, n_band)))

    q_rows = q.reshape(B, Tq, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, M, H)  # row r: token r // G
    q_rows = pad_axis(pad_axis(q_rows, 2, round_up(M, block_m)), 3, H_pad)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_pages * P)
    o, lse = _split_call(q_rows, k_pages, v_pages, page_table.astype(jnp.int32), lengths, st, blocks, interpret)
    out = _decode._combine(o, lse, _decode._sink_rows(sinks, K, G, q_rows.shape[2]))[:, :, :M, :H]  # [B, K, M, H]
    return out.reshape(B, K, Tq, G, H).transpose(0, 2, 1, 3, 4).reshape(B, Tq, N, H).astype(q.dtype)


def _check_inputs(q, k_pages, v_pages, page_table, lengths) -> None:
    if q.ndim != 4 or k_pages.ndim != 4:
        raise ValueError(f"q must be [B, Tq, N, H] and k_pages/v_pages [num_pages, P, K, H]; got {q.shape} and "
                         f"{k_pages.shape}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must have the same shape, got {k_pages.shape} and {v_pages.shape}")
    (B, Tq, N, H), (num_pages, P, K, Hc) = q.shape, k_pages.shape
    if H != Hc:
        raise ValueError(f"q {q.shape} and the pages {k_pages.shape} disagree on head_dim ({H} vs {Hc})")
    if not is_power_of_2(P) or P < 16:
        raise ValueError(f"the page size P = k_pages.shape[1] must be a power of two >= 16 (one page is a Triton "
                         f"tile), got {P}: allocate pages of 16, 32, 64 or 128 positions")
    if Tq == 0 or num_pages == 0:
        raise ValueError(f"need at least one query and one page, got Tq={Tq}, num_pages={num_pages}")
    if N % K:
        raise ValueError(f"{N} query heads cannot be grouped over {K} kv heads (K must divide N)")
    if not (q.dtype == k_pages.dtype == v_pages.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"q and pages must share one of float32/bfloat16/float16, got "
                         f"{q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    if (page_table.ndim != 2 or page_table.shape[0] != B or page_table.shape[1] == 0
            or not jnp.issubdtype(page_table.dtype, jnp.integer)):
        raise ValueError(f"page_table must be integers of shape [B, max_pages] = [{B}, pages per sequence] (int32 "
                         f"page indices into k_pages), got {page_table.dtype} {page_table.shape}")
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers of shape {(B,)}, got {lengths.dtype} {lengths.shape}")


# ----------------------------------------------------------------------------------------------------------

def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
    """The contiguous cache [B, max_pages * P, K, H] that page_table lays out from pages [num_pages, P, K, H]."""
    B, max_pages = page_table.shape
    _, P, K, H = pages.shape
    return pages[page_table].reshape(B, max_pages * P, K, H)


def paged_decode_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                                     lengths: jax.Array, *, sm_scale: float | None = None,
                                     window: int | None = None, softcap: float | None = None,
                                     sinks: jax.Array | None = None, chunk: int | None = None) -> jax.Array:
    """Plain jnp: each sequence's pages gathered into a contiguous cache, then decode_attention_reference.

    Positions no query sees (past the length; with a window or a chunk, before the oldest query's window or
    chunk) are zeroed first: their pages may be unused or freed and hold anything, even NaN, as the kernel allows.
    """
    window, softcap = check_window_softcap(window, softcap)
    chunk = check_chunk(chunk)
    k, v = gather_pages(k_pages, page_table), gather_pages(v_pages, page_table)  # [B, S, K, H]
    S, Tq = k.shape[1], q.shape[1]
    pos, lengths = jnp.arange(S)[None, :], jnp.clip(lengths, 0, S)[:, None]
    seen = pos < lengths
    if window is not None:
        seen = seen & (pos > lengths - Tq - window)  # the first query, at lengths - Tq, sees the oldest keys
    if chunk is not None:
        seen = seen & (pos >= chunk_start(lengths - Tq, chunk))
    k, v = (jnp.where(seen[:, :, None, None], x, 0) for x in (k, v))
    return decode_attention_reference(q, k, v, lengths[:, 0], sm_scale=sm_scale, window=window, softcap=softcap,
                                      sinks=sinks, chunk=chunk)
