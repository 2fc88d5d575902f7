"""FlashAttention-2 in Pallas (Triton backend): forward, and a backward split into dK/dV and dQ kernels.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023),
https://arxiv.org/abs/2307.08691.

q [B, T, N, H] and k, v [B, S, K, H] are read in place (block specs stride over the head axis, no
transposes); query head n reads kv head n // G with G = N // K, so GQA/MQA never repeats K/V.

  forward   grid (T/block_q, B, N): a resident [block_q, H] query tile streams [block_k, H] key/value
            tiles with an online softmax in the exp2 domain (running max m, sum l, fp32 accumulator);
            writes O and the log2-sum-exp residual lse = m + log2(l).
  dK/dV     grid (S/block_k, B, K): a resident key/value tile streams the query tiles of all G query
            heads that share it: P = exp2(S - lse), dV += P^T dO, dP = dO V^T, dS = P (dP - delta),
            dK += dS^T Q. Summing the group inside the program gives GQA's dK/dV without a reduction.
  dQ        grid (T/block_q, B, N): a resident query tile streams key/value tiles: dQ += dS K.
  delta = rowsum(dO * O) is one fused XLA reduction. No atomics: results are deterministic, and the
  price is that dQ recomputes S = Q K^T and dP = dO V^T (7 tile matmuls per tile pair in the backward;
  FlashAttention-2's 5 need dQ accumulated with atomic adds from the dK/dV programs).
Causal grids launch the longest query tiles first, so the short ones fill the last wave.

Masking and padding. Lengths are padded to block multiples and head dims to a power of two (>= 16);
padded keys are masked, padded queries are sliced off (their dO is zero, so they add nothing to
dK/dV). Causal masks align bottom-right: query t sits at key position p = t + S - T and sees keys
s <= p (as jaxformer.models.attention.make_mask); a sliding window W also drops keys s <= p - W
(transformers' sliding_window_overlay: W counts the query's own position). Each tile loop walks a
band [lo, hi) of tiles: tiles wholly outside it (past the diagonal, before the window) are never
visited; inside, tiles every row of the resident tile fully sees run without a mask and only the
band's edges (window start, diagonal, padded tail) and segment-id tiles pay for one. A query row
that sees no key returns zeros with zero gradients.

Soft-capping (Gemma 2): scores = C tanh(q k^T sm_scale / C), capped before masking and softmax; the
backward multiplies dS by the cap's derivative 1 - tanh^2, recomputed from the same tile.

Chunked attention (Llama 4's attention_chunk_size C, causal only): the query at key position p sees keys
(p // C) * C <= s <= p. The oldest key a row sees (chunk start, or window start, whichever is later) never
decreases down a tile, so the bands start at the first row's and stop being clear at the last row's; in dK/dV
a key tile's rows end where its last key's chunk ends. Tiles wholly outside every row's chunk are skipped.

Attention sinks (gpt-oss): a logit sink_n per query head joins every row's softmax denominator and attends to
nothing, out = sum_s e^(x_s - m) v_s / (sum_s e^(x_s - m) + e^(sink_n - m)). The forward adds it once, after the
tile loop, to the running max and sum (so m includes it), and its lse residual includes it: the backward's
P = exp2(S - lse) are then the true probabilities, and dS = P (dP - delta) with delta = rowsum(dO * O) holds as is
(the sink has no value, so it adds nothing to dP or delta). The sink's own gradient is one XLA reduction:
dL/dsink_n = -sum over head n's rows of p_sink * delta, p_sink = exp(sink_n - lse) (padded rows have delta 0).

Ring attention (jaxformer.models.ring_attention) calls the same kernels block by block:
flash_block_forward returns O with the forward's own lse residual (natural log), and flash_block_backward
runs the dK/dV and dQ kernels against the lse and delta of the whole merged softmax.
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

SegmentIds = tuple[jax.Array, jax.Array]  # (q_segment_ids [B, T], kv_segment_ids [B, S])
LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16) and Triton launch parameters of the three kernels."""

    block_q: int = 128  # forward: resident query tile
    block_k: int = 64  # forward: streamed key/value tile
    block_q_dkv: int = 32  # dK/dV: streamed query tile
    block_k_dkv: int = 128  # dK/dV: resident key/value tile
    block_q_dq: int = 128  # dQ: resident query tile
    block_k_dq: int = 32  # dQ: streamed key/value tile
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name.startswith("block_"):
                check_block(f.name, getattr(self, f.name))

    @classmethod
    def default(cls, head_dim: int, dtype=jnp.bfloat16) -> "BlockSizes":
        """The current GPU target's tiles for this head dim and dtype: per kernel, the largest that compile
        within the target's shared memory without register spills (pallas_kernels.tuning, targets/blocks.json)."""
        return cls(**tuning.flash_defaults(head_dim, dtype))

    def fitted(self, q_len: int, kv_len: int) -> "BlockSizes":
        """The same sizes, shrunk so no tile is longer than the (padded) sequence it walks."""
        fq, fk = functools.partial(fit_block, length=q_len), functools.partial(fit_block, length=kv_len)
        return dataclasses.replace(
            self, block_q=fq(self.block_q), block_k=fk(self.block_k), block_q_dkv=fq(self.block_q_dkv),
            block_k_dkv=fk(self.block_k_dkv), block_q_dq=fq(self.block_q_dq), block_k_dq=fk(self.block_k_dq))


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable: a custom_vjp nondiff argument)."""

    causal: bool
    sm_scale: float
    blocks: BlockSizes
    interpret: bool
    q_len: int  # true lengths; arrays reaching the kernels are padded beyond them
    kv_len: int
    window: int | None = None  # sliding window (causal only): query at position p sees keys (p - window, p]
    softcap: float | None = None  # scores = softcap * tanh(scores / softcap)
    chunk: int | None = None  # chunked (causal only): query at position p sees keys (p // chunk) * chunk <= s <= p


# ----------------------------------------------------------------------------------------------------------
# Scores, masks and tile bands (shared by the three kernels).

def _dot(a, b, *, trans_a=False, trans_b=False):
    """fp32-accumulated tile matmul; fp32 inputs stay fp32 (no TF32) so fp32 results match XLA."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _scores(q, k, st: _Static):
    """(s, t): soft-capped scores q k^T in log2 units [bq, bk], and their tanh (None without a cap)."""
    qk = _dot(q, k, trans_b=True)
    if st.softcap is None:
        return qk * (st.sm_scale * LOG2_E), None
    t = jnp.tanh(qk * (st.sm_scale / st.softcap))
    return t * (st.softcap * LOG2_E), t


def _visible(q_pos, kv_pos, q_seg, kv_seg, st: _Static):
    """[bq, bk] True where the query at row q_pos [bq] may attend the key at kv_pos [bk]."""
    mask = (kv_pos < st.kv_len)[None, :]
    if st.causal:
        p = q_pos[:, None] + (st.kv_len - st.q_len)  # the query's key position (bottom-right aligned)
        mask = mask & (kv_pos[None, :] <= p)
        if st.window is not None:
            mask = mask & (kv_pos[None, :] > p - st.window)
        if st.chunk is not None:
            mask = mask & (kv_pos[None, :] >= chunk_start(p, st.chunk))
    if q_seg is not None:
        mask = mask & (q_seg[:, None] == kv_seg[None, :])
    return mask


def _kv_band(q_tile, block_q: int, block_k: int, st: _Static, segmented: bool):
    """(lo, clear_lo, clear_hi, hi): the kv tiles query tile q_tile visits; [clear_lo, clear_hi) need no mask.

    Rows of the tile sit at key positions p0 .. p0 + block_q - 1 (padded rows included, so every row the
    kernels compute follows _visible exactly): the band runs from the first row's oldest key to the last
    row's newest; a tile is clear when the first row sees its last key and the last row its first key.
    A row's oldest key (window start, chunk start) never decreases down the tile, so the first and last
    rows bound them all.
    """
    lo, clear_lo = 0, 0
    clear_hi, hi = st.kv_len // block_k, ceil_blocks(st.kv_len, block_k)
    if st.causal:
        p0 = q_tile * block_q + (st.kv_len - st.q_len)
        hi = imin(ceil_blocks(p0 + block_q, block_k), hi)
        clear_hi = imin(floor_blocks(p0 + 1, block_k), clear_hi)
        first, last = 0, 0  # the oldest key the first / the last row sees
        if st.window is not None:
            first, last = p0 - st.window + 1, p0 + block_q - st.window
        if st.chunk is not None:
            first = imax(first, chunk_start(p0, st.chunk))
            last = imax(last, chunk_start(p0 + block_q - 1, st.chunk))
        lo, clear_lo = floor_blocks(first, block_k), ceil_blocks(last, block_k)
    if segmented:
        clear_lo = hi  # every visited tile compares segment ids
    return clamp_band(lo, clear_lo, clear_hi, hi)


def _q_band(kv_tile, block_q: int, block_k: int, st: _Static, segmented: bool):
    """(lo, clear_lo, clear_hi, hi): the query tiles kv tile kv_tile visits; [clear_lo, clear_hi) need no mask.

    Query row t sees key s iff s - offset <= t < s - offset + window (offset = S - T) and, with a chunk C,
    t + offset < (s // C + 1) * C (the end of s's chunk): the band runs from the row that first sees the
    tile's first key to the last row that still sees its last key.
    """
    lo, clear_lo = 0, 0
    clear_hi = hi = ceil_blocks(st.q_len, block_q)
    if st.causal:
        r0 = kv_tile * block_k - (st.kv_len - st.q_len)  # the first row that sees the tile's first key
        lo = imin(floor_blocks(r0, block_q), hi)
        clear_lo = ceil_blocks(r0 + block_k - 1, block_q)  # rows from here on see the tile's last key
        if st.window is not None:
            hi = imin(ceil_blocks(r0 + block_k - 1 + st.window, block_q), hi)
            clear_hi = floor_blocks(r0 + st.window, block_q)  # rows before r0 + window see its first key
        if st.chunk is not None:  # rows past the end of a key's chunk no longer see it
            k0, off = kv_tile * block_k, st.kv_len - st.q_len
            hi = imin(ceil_blocks(chunk_start(k0 + block_k - 1, st.chunk) + st.chunk - off, block_q), hi)
            clear_hi = imin(floor_blocks(chunk_start(k0, st.chunk) + st.chunk - off, block_q), clear_hi)
    # Scalar max, not jnp.where: Triton's select_n lowering mistypes two literal operands as i1.
    has_padding = jnp.asarray((kv_tile + 1) * block_k > st.kv_len, jnp.int32)  # mask every q tile
    all_padding = jnp.asarray(kv_tile * block_k >= st.kv_len, jnp.int32)  # skip every q tile
    clear_lo = hi if segmented else jnp.maximum(clear_lo, has_padding * hi)
    lo = jnp.maximum(lo, all_padding * hi)
    return clamp_band(lo, clear_lo, clear_hi, hi)


def _q_tile_id(i, n_q_tiles, st: _Static):
    """Causal grids launch the longest query tiles (the last ones) first, so short ones fill the tail."""
    return n_q_tiles - 1 - i if st.causal else i


def _iota(n: int, start):
    return start + lax.broadcasted_iota(jnp.int32, (n,), 0)


# ----------------------------------------------------------------------------------------------------------
# Kernels.

def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, sink_ref, o_ref, lse_ref, *, st: _Static):
    # q_ref [bq, H]; k_ref, v_ref [S, H]; q_seg_ref [bq]; kv_seg_ref [S]; sink_ref [] float32 (natural log);
    # o_ref [bq, H]; lse_ref [bq]
    bq, bk = st.blocks.block_q, st.blocks.block_k
    q_tile = _q_tile_id(pl.program_id(0), pl.num_programs(0), st)
    q = q_ref[...]
    q_pos = _iota(bq, q_tile * bq)
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def step(kv_tile, carry, masked: bool):
        acc, m, l = carry  # [bq, H], [bq], [bq]
        tile = pl.ds(kv_tile * bk, bk)
        k, v = k_ref[tile, :], v_ref[tile, :]  # [bk, H]
        s, _ = _scores(q, k, st)  # [bq, bk], log2 units: exp2 is the native instruction
        if masked:
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[tile]
            s = jnp.where(_visible(q_pos, _iota(bk, kv_tile * bk), q_seg, kv_seg, st), s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))  # stays finite: m starts at -1e30, not -inf
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])  # [bq, bk]
        l = alpha * l + p.sum(axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -1e30, jnp.float32), jnp.zeros((bq,), jnp.float32))
    band = _kv_band(q_tile, bq, bk, st, segmented=q_seg_ref is not None)
    acc, m, l = band_loop(band, step, carry)
    if sink_ref is not None:  # gpt-oss: one more term in each row's denominator, attending to nothing
        sink = sink_ref[()] * LOG2_E
        m_new = jnp.maximum(m, sink)
        alpha = jnp.exp2(m - m_new)
        acc, l, m = alpha[:, None] * acc, alpha * l + jnp.exp2(sink - m_new), m_new

    seen = l > 0.0  # False only for rows that see no key (and no sink) at all
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(l), jnp.inf)  # +inf: exp2(s - lse) = 0 in the backward


def _score_grad(s, t, do, v, lse, delta):  # lse includes the sink: p are the true probabilities
    """(p, ds): probabilities and dL/d(q k^T sm_scale) [bq, bk] of one tile pair; t is tanh of the capped scores."""
    p = jnp.exp2(s - lse[:, None])  # softmax probabilities
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])  # dL/d(capped scores)
    if t is not None:
        ds = ds * (1.0 - t * t)  # d(C tanh(x / C))/dx
    return p, ds


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dk_ref, dv_ref, *,
                 st: _Static, group: int):
    # q_ref, do_ref [T, G, H]; k_ref, v_ref [bk, H]; lse_ref, delta_ref [G, T]; q_seg_ref [T]; kv_seg_ref [bk]
    # dk_ref, dv_ref [bk, H]
    bq, bk = st.blocks.block_q_dkv, st.blocks.block_k_dkv
    kv_tile = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    kv_pos = _iota(bk, kv_tile * bk)
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]

    def step(q_tile, carry, head, masked: bool):
        dk, dv = carry  # [bk, H] each
        rows = pl.ds(q_tile * bq, bq)
        q, do = q_ref[rows, head, :], do_ref[rows, head, :]  # [bq, H]
        s, t = _scores(q, k, st)  # [bq, bk]
        if masked:
            q_seg = None if q_seg_ref is None else q_seg_ref[rows]
            s = jnp.where(_visible(_iota(bq, q_tile * bq), kv_pos, q_seg, kv_seg, st), s, -jnp.inf)
        p, ds = _score_grad(s, t, do, v, lse_ref[head, rows], delta_ref[head, rows])
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    band = _q_band(kv_tile, bq, bk, st, segmented=q_seg_ref is not None)
    one_head = lambda head, carry: band_loop(band, functools.partial(step, head=head), carry)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, one_head, (zeros, zeros))  # the G query heads sharing this kv head
    dk_ref[...] = (dk * st.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref, *, st: _Static):
    # q_ref, do_ref [bq, H]; k_ref, v_ref [S, H]; lse_ref, delta_ref [bq]; q_seg_ref [bq]; kv_seg_ref [S]
    # dq_ref [bq, H]
    bq, bk = st.blocks.block_q_dq, st.blocks.block_k_dq
    q_tile = _q_tile_id(pl.program_id(0), pl.num_programs(0), st)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = _iota(bq, q_tile * bq)
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def step(kv_tile, dq, masked: bool):
        tile = pl.ds(kv_tile * bk, bk)
        k, v = k_ref[tile, :], v_ref[tile, :]  # [bk, H]
        s, t = _scores(q, k, st)  # [bq, bk]
        if masked:
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[tile]
            s = jnp.where(_visible(q_pos, _iota(bk, kv_tile * bk), q_seg, kv_seg, st), s, -jnp.inf)
        _, ds = _score_grad(s, t, do, v, lse, delta)
        return dq + _dot(ds.astype(k.dtype), k)

    band = _kv_band(q_tile, bq, bk, st, segmented=q_seg_ref is not None)
    dq = band_loop(band, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------------------
# pallas_call wrappers; all arrays here are padded: T % max q block == 0, S % max kv block == 0, H a power of 2.

def _params(st: _Static, num_warps: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=st.blocks.num_stages)


def _forward_call(q, k, v, q_seg, kv_seg, sinks, st: _Static):
    """(o [B, T, N, H], lse [B, N, T] float32 log2-sum-exp, the sink's term included) for padded inputs."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G, bq = N // K, st.blocks.block_q
    tile = functools.partial(_q_tile_id, n_q_tiles=T // bq, st=st)
    q_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, tile(i), n, 0))
    kv_spec = pl.BlockSpec((None, S, None, H), lambda i, b, n: (b, 0, idiv(n, G), 0))
    seg_specs = [None, None]
    if q_seg is not None:
        seg_specs = [pl.BlockSpec((None, bq), lambda i, b, n: (b, tile(i))),
                     pl.BlockSpec((None, S), lambda i, b, n: (b, 0))]
    sink_spec = None if sinks is None else pl.BlockSpec((None,), lambda i, b, n: (n,))
    return pl.pallas_call(
        functools.partial(_forward_kernel, st=st),
        grid=(T // bq, B, N),
        in_specs=[q_spec, kv_spec, kv_spec, *seg_specs, sink_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, tile(i)))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
        compiler_params=_params(st, st.blocks.num_warps),
        interpret=st.interpret,
        name="flash_attention_forward",
    )(q, k, v, q_seg, kv_seg, sinks)


def _dkdv_call(q, k, v, do, lse, delta, q_seg, kv_seg, st: _Static):
    """(dk, dv) [B, S, K, H], each kv head's gradient summed over its G query heads inside the kernel."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G, bk = N // K, st.blocks.block_k_dkv
    group_spec = pl.BlockSpec((None, T, G, H), lambda j, b, h: (b, 0, h, 0))  # the G query heads of kv head h
    kv_spec = pl.BlockSpec((None, bk, None, H), lambda j, b, h: (b, j, h, 0))
    row_spec = pl.BlockSpec((None, G, T), lambda j, b, h: (b, h, 0))
    seg_specs = [None, None]
    if q_seg is not None:
        seg_specs = [pl.BlockSpec((None, T), lambda j, b, h: (b, 0)), pl.BlockSpec((None, bk), lambda j, b, h: (b, j))]
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st, group=G),
        grid=(S // bk, B, K),
        in_specs=[group_spec, kv_spec, kv_spec, group_spec, row_spec, row_spec, *seg_specs],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(st, st.blocks.num_warps_bwd),
        interpret=st.interpret,
        name="flash_attention_dkdv",
    )(q, k, v, do, lse, delta, q_seg, kv_seg)


def _dq_call(q, k, v, do, lse, delta, q_seg, kv_seg, st: _Static):
    """dq [B, T, N, H]."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G, bq = N // K, st.blocks.block_q_dq
    tile = functools.partial(_q_tile_id, n_q_tiles=T // bq, st=st)
    q_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, tile(i), n, 0))
    kv_spec = pl.BlockSpec((None, S, None, H), lambda i, b, n: (b, 0, idiv(n, G), 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, tile(i)))
    seg_specs = [None, None]
    if q_seg is not None:
        seg_specs = [pl.BlockSpec((None, bq), lambda i, b, n: (b, tile(i))),
                     pl.BlockSpec((None, S), lambda i, b, n: (b, 0))]
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(T // bq, B, N),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(st, st.blocks.num_warps_bwd),
        interpret=st.interpret,
        name="flash_attention_dq",
    )(q, k, v, do, lse, delta, q_seg, kv_seg)


# ----------------------------------------------------------------------------------------------------------
# custom_vjp: padding happens here, so residuals are the padded arrays the backward kernels read.

def _padded_shape(st: _Static, head_dim: int) -> tuple[int, int, int]:
    b = st.blocks
    return (round_up(st.q_len, max(b.block_q, b.block_q_dkv, b.block_q_dq)),
            round_up(st.kv_len, max(b.block_k, b.block_k_dkv, b.block_k_dq)),
            max(16, next_power_of_2(head_dim)))


def _pad(x, length: int, head_dim: int):  # [B, L, heads, H] -> [B, length, heads, head_dim], zeros
    return pad_axis(pad_axis(x, 1, length), 3, head_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, kv_seg, sinks, st: _Static):
    return _flash_fwd(q, k, v, q_seg, kv_seg, sinks, st)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, sinks, st: _Static):
    T, H = q.shape[1], q.shape[3]
    T_pad, S_pad, H_pad = _padded_shape(st, H)
    q_p, k_p, v_p = _pad(q, T_pad, H_pad), _pad(k, S_pad, H_pad), _pad(v, S_pad, H_pad)
    if q_seg is not None:
        q_seg, kv_seg = pad_axis(q_seg.astype(jnp.int32), 1, T_pad), pad_axis(kv_seg.astype(jnp.int32), 1, S_pad)
    o_p, lse = _forward_call(q_p, k_p, v_p, q_seg, kv_seg, sinks, st)
    return o_p[:, :T, :, :H], (q_p, k_p, v_p, q_seg, kv_seg, sinks, o_p, lse)


def _flash_bwd(st: _Static, residuals, do):
    q_p, k_p, v_p, q_seg, kv_seg, sinks, o_p, lse = residuals
    T, S, H = st.q_len, st.kv_len, do.shape[3]
    do_p = _pad(do.astype(q_p.dtype), q_p.shape[1], q_p.shape[3])  # zero rows: padded queries add nothing
    delta = (o_p.astype(jnp.float32) * do_p.astype(jnp.float32)).sum(axis=3).transpose(0, 2, 1)  # [B, N, T_pad]
    dk, dv = _dkdv_call(q_p, k_p, v_p, do_p, lse, delta, q_seg, kv_seg, st)
    dq = _dq_call(q_p, k_p, v_p, do_p, lse, delta, q_seg, kv_seg, st)
    dsinks = None
    if sinks is not None:  # dL/dsink_n = -sum over head n's rows of p_sink * delta, p_sink = exp(sink - lse)
        p_sink = jnp.exp2(sinks[None, :, None] * LOG2_E - lse)  # [B, N, T_pad]; padded rows have delta 0
        dsinks = -(p_sink * delta).sum(axis=(0, 2))
    return dq[:, :T, :, :H], dk[:, :S, :, :H], dv[:, :S, :, :H], None, None, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                    segment_ids: SegmentIds | None = None, sm_scale: float | None = None,
                    window: int | None = None, softcap: float | None = None, sinks: jax.Array | None = None,
                    chunk: int | None = None, block_sizes: BlockSizes | None = None,
                    interpret: bool = False) -> jax.Array:
    """softmax(mask(cap(q k^T * sm_scale))) v, fused; q [B, T, N, H], k/v [B, S, K, H] (K divides N) -> [B, T, N, H].

    window W (causal only): the query at key position p = t + S - T sees keys p - W < s <= p.
    softcap C: scores become C * tanh(scores / C) before masking (Gemma 2).
    sinks [N] (gpt-oss): head n's logit joins each of its rows' softmax denominators and attends to nothing:
    out = sum_s e^(x_s) v_s / (sum_s e^(x_s) + e^(sinks[n])); differentiable (d sinks too).
    chunk C (causal only; Llama 4): the query at key position p sees keys (p // C) * C <= s <= p.
    """
    st = _static(q, k, v, segment_ids, causal, sm_scale, window, softcap, block_sizes, interpret, chunk)
    q_seg, kv_seg = (None, None) if segment_ids is None else segment_ids
    return _flash(q, k, v, q_seg, kv_seg, check_sinks(sinks, q.shape[2]), st)


def flash_block_forward(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                        segment_ids: SegmentIds | None = None, sm_scale: float | None = None,
                        softcap: float | None = None, block_sizes: BlockSizes | None = None,
                        interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(o [B, T, N, H], lse [B, N, T] float32, natural log, -inf where a row sees no key): one block of a ring.

    The forward kernel's own residual, no second pass; no VJP (the caller's custom VJP uses flash_block_backward).
    """
    st = _static(q, k, v, segment_ids, causal, sm_scale, None, softcap, block_sizes, interpret)
    q_seg, kv_seg = (None, None) if segment_ids is None else segment_ids
    o, residuals = _flash_fwd(q, k, v, q_seg, kv_seg, None, st)
    lse2 = residuals[-1][:, :, :q.shape[1]]  # log2 units, +inf where no key is seen
    return o, jnp.where(jnp.isinf(lse2), -jnp.inf, lse2 / LOG2_E)


def flash_block_backward(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, lse: jax.Array,
                         delta: jax.Array, *, causal: bool = False, segment_ids: SegmentIds | None = None,
                         sm_scale: float | None = None, softcap: float | None = None,
                         block_sizes: BlockSizes | None = None,
                         interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of one block of a larger softmax, from that softmax's lse and delta = rowsum(dO * O) [B, N, T].

    lse is in natural log (flash_block_forward's, merged over all blocks); P = exp(S - lse) inside the kernels.
    """
    st = _static(q, k, v, segment_ids, causal, sm_scale, None, softcap, block_sizes, interpret)
    T, S, H = q.shape[1], k.shape[1], q.shape[3]
    T_pad, S_pad, H_pad = _padded_shape(st, H)
    q_p, k_p, v_p, do_p = _pad(q, T_pad, H_pad), _pad(k, S_pad, H_pad), _pad(v, S_pad, H_pad), _pad(do, T_pad, H_pad)
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2_E, jnp.inf).astype(jnp.float32)  # +inf: P = 0 on that row
    lse2, delta = pad_axis(lse2, 2, T_pad, jnp.inf), pad_axis(delta.astype(jnp.float32), 2, T_pad)
    q_seg, kv_seg = (None, None) if segment_ids is None else segment_ids
    if q_seg is not None:
        q_seg, kv_seg = pad_axis(q_seg.astype(jnp.int32), 1, T_pad), pad_axis(kv_seg.astype(jnp.int32), 1, S_pad)
    dk, dv = _dkdv_call(q_p, k_p, v_p, do_p, lse2, delta, q_seg, kv_seg, st)
    dq = _dq_call(q_p, k_p, v_p, do_p, lse2, delta, q_seg, kv_seg, st)
    return dq[:, :T, :, :H], dk[:, :S, :, :H], dv[:, :S, :, :H]


def _static(q, k, v, segment_ids, causal, sm_scale, window, softcap, block_sizes, interpret,
            chunk=None) -> _Static:
    """The checked, hashable description of one call (raises ValueError on bad shapes or options)."""
    _check_inputs(q, k, v, segment_ids)
    window, softcap = check_window_softcap(window, softcap, causal)
    chunk = check_chunk(chunk, causal)
    T, H, S = q.shape[1], q.shape[3], k.shape[1]
    st = _Static(
        causal=bool(causal),
        sm_scale=float(H ** -0.5 if sm_scale is None else sm_scale),
        blocks=(block_sizes or BlockSizes.default(H, q.dtype)).fitted(T, S),
        interpret=resolve_interpret(interpret, "flash_attention"),
        q_len=T, kv_len=S, window=window, softcap=softcap, chunk=chunk)
    if not st.interpret:  # tiles that cannot fit the target's shared memory fail here, before any compile
        tuning.check_flash_fits(st.blocks, H, q.dtype)
    T_pad, S_pad, H_pad = _padded_shape(st, H)
    check_addressable("q", (q.shape[0], T_pad, q.shape[2], H_pad))
    check_addressable("k", (k.shape[0], S_pad, k.shape[2], H_pad))
    return st


def _check_inputs(q, k, v, segment_ids) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    (B, T, N, H), (Bk, S, K, Hk) = q.shape, k.shape
    if (B, H) != (Bk, Hk):
        raise ValueError(f"q {q.shape} and k/v {k.shape} disagree on batch or head_dim")
    if T == 0 or S == 0:
        raise ValueError(f"sequence lengths must be >= 1, got q length {T} and kv length {S}")
    if N % K:
        raise ValueError(f"{N} query heads cannot be grouped over {K} kv heads (K must divide N)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"q, k, v must share one of float32/bfloat16/float16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if segment_ids is not None:
        if not isinstance(segment_ids, (tuple, list)) or len(segment_ids) != 2:
            raise ValueError("segment_ids must be a pair (q_segment_ids [B, T], kv_segment_ids [B, S])")
        q_seg, kv_seg = segment_ids
        if q_seg.shape != (B, T) or kv_seg.shape != (B, S):
            raise ValueError(f"segment_ids must have shapes {(B, T)} and {(B, S)}, "
                             f"got {q_seg.shape} and {kv_seg.shape}")
        if not (jnp.issubdtype(q_seg.dtype, jnp.integer) and jnp.issubdtype(kv_seg.dtype, jnp.integer)):
            raise ValueError(f"segment_ids must be integers, got {q_seg.dtype} and {kv_seg.dtype}")


# ----------------------------------------------------------------------------------------------------------

def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                              segment_ids: SegmentIds | None = None, sm_scale: float | None = None,
                              window: int | None = None, softcap: float | None = None,
                              sinks: jax.Array | None = None, chunk: int | None = None) -> jax.Array:
    """Plain-jnp attention with the kernel's exact semantics (fp32 math; rows seeing no key give 0)."""
    window, softcap = check_window_softcap(window, softcap, causal)
    chunk = check_chunk(chunk, causal)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    sm_scale = H ** -0.5 if sm_scale is None else sm_scale
    qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)  # query heads grouped by their kv head
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) * sm_scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = jnp.ones((1, T, S), bool)
    if causal:
        p, s = jnp.arange(T)[:, None] + (S - T), jnp.arange(S)[None, :]  # query and key positions
        mask = mask & (s <= p)[None]
        if window is not None:
            mask = mask & (s > p - window)[None]
        if chunk is not None:
            mask = mask & (s // chunk == p // chunk)[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[0][:, :, None] == segment_ids[1][:, None, :])  # [B, T, S]
    mask = mask[:, None, None]  # [B or 1, 1, 1, T, S]
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    if sinks is not None:
        sink = check_sinks(sinks, N).reshape(1, K, N // K, 1, 1)
        m = jnp.maximum(m, sink)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return out.reshape(B, T, N, H).astype(q.dtype)
