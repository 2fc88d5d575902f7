"""Attention sinks (gpt-oss) and chunked attention (Llama 4) in the Pallas kernels (interpret mode on CPU).

sinks [N]: head n's logit joins each of its rows' softmax denominators and attends to nothing,
out = sum_s e^(x_s - m) v_s / (sum_s e^(x_s - m) + e^(sink_n - m)), m the max over the scores and the sink;
its gradient is d sink_n = -sum over head n's rows of p_sink (dO . O), p_sink = e^(sink_n - lse).
chunk C (causal): the query at key position p sees the keys s <= p with s // C == p // C.

References, independent of the kernels: the model's own xla path (jaxformer.models.attention.xla_attention with
make_mask, proven against torch and transformers' gpt-oss attention in parity_tests) for the forward and, through
jax.grad, every gradient (dq, dk, dv, d sinks); a float64 numpy loop for the forward. Inputs are fresh random draws,
errors are max|x - ref| / max|ref| elementwise (docs/testing.md), except d sinks: each is a sum over the head's B * T
rows whose terms cancel, so its error is measured against the largest head's sum of |terms| (numpy's p_sink |dO . O|).
Bound 1e-5; measured on this CPU (printed with -s): forward 3.1e-7 (2.7e-7 against numpy), dq 7.4e-7, dk 8.3e-7,
dv 6.7e-7, d sinks 9.4e-8 (2.3e-6 of max|d sinks| where a head's terms cancel to 0.47); decode 2.1e-7, paged 2.8e-7:
12x margin at the worst.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.decode_attention as da
import pallas_kernels.flash_attention as fa
import pallas_kernels.paged_attention as pa
from jaxformer.models.attention import make_mask, xla_attention
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference
from pallas_kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference

on_gpu = jax.default_backend() == "gpu"
FAST_COMPILE = {} if on_gpu else {"xla_backend_optimization_level": 0}
TOL = 1e-5  # max|x - ref| / max|ref|, float32
# Several q/kv tiles per call even at these lengths: chunk edges, diagonals and padded tails all occur.
SMALL = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)
DecodeBlocks = da.BlockSizes


def normal(rng, *shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32) * scale)


def max_rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def naive(q, k, v, *, sm_scale, causal=True, window=None, chunk=None, softcap=None, sinks=None, segment_ids=None,
          sink_probs=False):
    """Float64 numpy attention, one (batch, head, row) at a time, bottom-right aligned; rows seeing no key give 0.
    sink_probs: also each row's sink probability p_sink [B, T, N] (1 where a row sees no key)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    p, s = np.arange(T)[:, None] + S - T, np.arange(S)[None, :]
    out, p_sink = np.zeros((B, T, N, H)), np.ones((B, T, N))
    for b in range(B):
        allowed = np.ones((T, S), bool)
        if causal:
            allowed &= s <= p
        if window is not None:
            allowed &= s > p - window
        if chunk is not None:
            allowed &= np.floor_divide(s, chunk) == np.floor_divide(p, chunk)
        if segment_ids is not None:
            allowed &= np.asarray(segment_ids[0])[b][:, None] == np.asarray(segment_ids[1])[b][None, :]
        for n in range(N):
            kv = n // (N // K)
            logits = q[b, :, n] @ k[b, :, kv].T * sm_scale
            if softcap is not None:
                logits = softcap * np.tanh(logits / softcap)
            for t in range(T):
                x = logits[t, allowed[t]]
                if not len(x):
                    continue
                m = x.max() if sinks is None else max(x.max(), float(sinks[n]))
                w = np.exp(x - m)
                denom = w.sum() + (0.0 if sinks is None else np.exp(float(sinks[n]) - m))
                out[b, t, n] = w @ v[b, :, kv][allowed[t]] / denom
                p_sink[b, t, n] = 1.0 - w.sum() / denom
    return (out, p_sink) if sink_probs else out


def xla_reference(q, k, v, sinks, *, sm_scale, causal=True, window=None, chunk=None, softcap=None, segment_ids=None):
    """The model's xla path: xla_attention over make_mask."""
    T, S = q.shape[1], k.shape[1]
    mask = make_mask(T, S, causal=causal, segment_ids=segment_ids, window=window, chunk=chunk)
    return xla_attention(q, k, v, mask, sm_scale, softcap, sinks)


def value_and_grads(attn, q, k, v, sinks, do):
    """(out, dq, dk, dv, d sinks) of attn(q, k, v, sinks) with cotangent do, jitted."""
    def f(q, k, v, sinks):
        out, vjp = jax.vjp(attn, q, k, v, sinks)
        return (out, *vjp(do))
    return jax.jit(f, compiler_options=FAST_COMPILE)(q, k, v, sinks)


# ---------------------------------------------------------------------------------------------- references

@pytest.mark.parametrize("T,S,window,chunk,softcap,segments", [
    (13, 13, None, 4, None, False), (9, 17, 5, 6, 0.8, True), (15, 7, None, 3, None, False),
    (11, 11, 4, None, None, False),
])
def test_kernel_references_match_numpy(T, S, window, chunk, softcap, segments):
    """flash_attention_reference and decode_attention_reference with sinks and chunks: float64 numpy's answer."""
    rng = np.random.default_rng(T * S)
    B, N, K, H = 2, 4, 2, 8
    q, k, v = normal(rng, B, T, N, H, scale=2.0), normal(rng, B, S, K, H), normal(rng, B, S, K, H)
    sinks = normal(rng, N, scale=2.0)
    seg = None
    if segments:
        seg = (jnp.asarray(rng.integers(0, 2, (B, T)), jnp.int32), jnp.asarray(rng.integers(0, 2, (B, S)), jnp.int32))
    kw = dict(sm_scale=0.4, window=window, chunk=chunk, softcap=softcap, sinks=sinks)
    want = naive(q, k, v, segment_ids=seg, **kw)
    got = flash_attention_reference(q, k, v, causal=True, segment_ids=seg, **kw)
    assert max_rel(got, want) <= 1e-6
    if seg is None:  # the decode reference: the last Tq = T positions of a cache of S, then of a shorter prefix
        lengths = jnp.asarray([S, max(1, S - 3)], jnp.int32)
        dec = decode_attention_reference(q, k, v, lengths, **kw)
        assert max_rel(dec[:1], want[:1]) <= 1e-6
        short = naive(q[1:], k[1:, :S - 3], v[1:, :S - 3], **kw) if S > 3 else None
        if short is not None:
            assert max_rel(dec[1:], short) <= 1e-6


# ------------------------------------------------------------------------------------------- flash kernel

FLASH_CASES = [  # B, T, S, N, K, H, window, chunk, sinks, softcap, segments, block sizes
    (1, 50, 50, 4, 2, 16, None, 8, True, None, False, SMALL),  # chunk < every tile; 50: no tile divides it
    (1, 70, 70, 4, 1, 16, None, 40, False, None, False, SMALL),  # chunk > every tile, MQA
    (2, 64, 64, 4, 2, 16, None, 16, True, None, False, SMALL),  # chunk == the kv tile: aligned, mask-free interiors
    (1, 30, 45, 4, 2, 32, None, 20, True, 2.0, False, SMALL),  # T < S (bottom-right), soft-cap
    (1, 57, 57, 4, 2, 16, 9, None, True, None, False, SMALL),  # gpt-oss: sinks + a sliding window
    (2, 40, 40, 4, 2, 16, 13, None, True, 1.5, True, SMALL),  # sinks + window + soft-cap + segment ids
    (1, 20, 33, 4, 4, 16, None, None, True, None, False, SMALL),  # sinks alone, not causal, T < S
    (1, 45, 45, 2, 1, 16, 7, 12, False, None, False, SMALL),  # window and chunk together
    (1, 40, 24, 4, 2, 16, None, 8, True, None, False, SMALL),  # T > S: the first rows see only their sink
    (1, 100, 100, 4, 2, 64, 30, None, True, None, False, None),  # default tiles, sinks + window
]


@pytest.mark.parametrize("B,T,S,N,K,H,window,chunk,sinks,softcap,segments,blocks", FLASH_CASES)
def test_flash_matches_the_xla_path_forward_and_every_gradient(B, T, S, N, K, H, window, chunk, sinks, softcap,
                                                              segments, blocks):
    rng = np.random.default_rng(T + 3 * S + H)
    q, k, v, do = (normal(rng, B, T, N, H, scale=2.0), normal(rng, B, S, K, H), normal(rng, B, S, K, H),
                   normal(rng, B, T, N, H))
    sink_arr = normal(rng, N, scale=2.0)  # some above, some below the scores
    seg = None
    if segments:
        seg = (jnp.asarray(rng.integers(0, 3, (B, T)), jnp.int32), jnp.asarray(rng.integers(0, 3, (B, S)), jnp.int32))
    causal = window is not None or chunk is not None or segments
    kw = dict(causal=causal, window=window, chunk=chunk, softcap=softcap, segment_ids=seg)
    use = (lambda s: s) if sinks else (lambda s: None)
    got = value_and_grads(lambda q, k, v, s: flash_attention(q, k, v, sinks=use(s), block_sizes=blocks,
                                                             interpret=True, **kw), q, k, v, sink_arr, do)
    want = value_and_grads(lambda q, k, v, s: xla_reference(q, k, v, use(s), sm_scale=H ** -0.5, **kw),
                           q, k, v, sink_arr, do)
    if not sinks:  # rows that see no key (segment ids): the kernel gives 0, xla's finite mask the mean of V
        assert not segments and T <= S
    naive_out, p_sink = naive(q, k, v, sm_scale=H ** -0.5, sinks=sink_arr if sinks else None, sink_probs=True, **kw)
    errs = {"out numpy": max_rel(got[0], naive_out)}
    for name, x, ref in zip(("out", "dq", "dk", "dv", "dsinks")[:5 if sinks else 4], got, want):
        assert x.shape == ref.shape and x.dtype == ref.dtype, name
        assert bool(jnp.isfinite(x).all()), name
        errs[name] = max_rel(x, ref)
    if sinks:  # d sinks_n sums -p_sink (dO . O) over B * T rows, which cancel: measured against the summands' size
        summands = (p_sink * np.abs((np.asarray(do, np.float64) * naive_out).sum(-1))).sum((0, 1))  # [N]
        errs["dsinks"] = float(np.abs(np.asarray(got[4], np.float64) - np.asarray(want[4])).max() / summands.max())
        assert float(jnp.abs(want[4]).max()) > 1e-3 * summands.max()  # a real gradient to match, not noise
    print(" ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert max(errs.values()) <= TOL, errs


def test_flash_never_reads_key_tiles_before_the_chunk():
    """NaN in every key/value tile before the chunk of the first query (and so of every query): a visited tile would
    turn the output NaN, so finite results equal to the reference prove those tiles are skipped, forward and
    backward, and their dK/dV are exactly zero."""
    B, T, S, N, K, H, C = 1, 16, 128, 2, 1, 16, 32  # queries at 112..127: chunk 96..127
    rng = np.random.default_rng(3)
    q, k, v, do = normal(rng, B, T, N, H), normal(rng, B, S, K, H), normal(rng, B, S, K, H), normal(rng, B, T, N, H)
    sinks = normal(rng, N)
    unseen = np.arange(S) < 96
    poison = lambda x: jnp.where(jnp.asarray(unseen)[None, :, None, None], jnp.nan, x)  # noqa: E731
    got = value_and_grads(lambda q, k, v, s: flash_attention(q, k, v, causal=True, chunk=C, sinks=s,
                                                             block_sizes=SMALL, interpret=True),
                          q, poison(k), poison(v), sinks, do)
    want = value_and_grads(lambda q, k, v, s: flash_attention_reference(q, k, v, causal=True, chunk=C, sinks=s),
                           q, k, v, sinks, do)
    for name, x, ref in zip(("out", "dq", "dk", "dv", "dsinks"), got, want):
        assert bool(jnp.isfinite(x).all()), f"{name}: a tile before the chunk was read"
        assert max_rel(x, ref) <= TOL, name
    np.testing.assert_array_equal(np.asarray(got[2][:, unseen]), 0.0)


def brute_force_visible(T, S, n_rows, n_cols, window, chunk):
    """[n_rows, n_cols] True where row t (padded rows continue the positions) may see key s < S, causal."""
    p, s = np.arange(n_rows)[:, None] + S - T, np.arange(n_cols)[None, :]
    visible = (s < S) & (s <= p)
    if window is not None:
        visible &= s > p - window
    if chunk is not None:
        visible &= s // chunk == np.maximum(p, 0) // chunk
    return visible


def check_band(band, tiles):
    """band (lo, clear_lo, clear_hi, hi) against tiles [n_tiles, ...] of a brute-force mask: exact on both counts."""
    lo, clear_lo, clear_hi, hi = (int(x) for x in band)
    assert 0 <= lo <= clear_lo <= clear_hi <= hi <= len(tiles)
    any_, all_ = [bool(t.any()) for t in tiles], [bool(t.all()) for t in tiles]
    assert list(range(lo, hi)) == [i for i, a in enumerate(any_) if a], (band, any_)
    assert list(range(clear_lo, clear_hi)) == [i for i, a in enumerate(all_) if a], (band, all_)


@pytest.mark.parametrize("T,S,bq,bk,window,chunk", [
    (100, 100, 32, 16, None, 8), (100, 100, 16, 32, None, 40), (128, 128, 32, 16, None, 16),
    (40, 130, 32, 16, None, 24), (130, 40, 16, 16, None, 8), (97, 97, 16, 32, 9, 20), (64, 64, 32, 32, None, 1000),
    (64, 64, 16, 16, None, 1),
])
def test_flash_tile_bands_with_chunks_are_exact(T, S, bq, bk, window, chunk):
    """Forward/dQ and dK/dV loop bounds against a brute-force mask: exactly the tiles with a visible key are visited,
    and exactly those every row sees whole run mask-free; a chunk shorter than S visits fewer tiles than causal."""
    st = fa._Static(causal=True, sm_scale=1.0, blocks=BlockSizes(), interpret=True, q_len=T, kv_len=S, window=window,
                    chunk=chunk)
    n_q, n_kv = -(-T // bq), -(-S // bk)
    visible = brute_force_visible(T, S, n_q * bq, n_kv * bk, window, chunk)
    for i in range(n_q):
        check_band(fa._kv_band(i, bq, bk, st, segmented=False),
                   visible[i * bq:(i + 1) * bq].reshape(bq, n_kv, bk).transpose(1, 0, 2))
    for j in range(n_kv):
        check_band(fa._q_band(j, bq, bk, st, segmented=False), visible[:, j * bk:(j + 1) * bk].reshape(n_q, bq, bk))
    if window is None and chunk + bq < S:
        visits = lambda st: sum(int(b[3]) - int(b[0]) for b in (fa._kv_band(i, bq, bk, st, False) for i in range(n_q)))
        assert visits(st) < visits(dataclasses.replace(st, chunk=None))


# --------------------------------------------------------------------------------------- decode kernels

DECODE_CASES = [  # B, Tq, S, N, K, H, lengths, window, chunk, sinks, softcap, block sizes
    (3, 1, 100, 4, 2, 16, [1, 37, 100], None, 8, True, None, DecodeBlocks(block_k=16, num_splits=3)),  # chunk < tile
    (3, 4, 128, 8, 2, 32, [2, 50, 120], None, 40, True, 2.0, DecodeBlocks(block_k=16, num_splits=2)),  # chunk > tile
    (2, 20, 96, 16, 2, 16, [96, 30], None, 16, False, None, DecodeBlocks(block_k=16, num_splits=2)),  # 2 row tiles
    (2, 3, 64, 4, 1, 16, [64, 5], 10, None, True, None, DecodeBlocks(block_k=16)),  # gpt-oss: window + sinks
    (2, 2, 90, 4, 2, 16, [90, 41], 7, 12, True, None, DecodeBlocks(block_k=32, num_splits=2)),  # window and chunk
]


@pytest.mark.parametrize("B,Tq,S,N,K,H,lengths,window,chunk,sinks,softcap,blocks", DECODE_CASES)
def test_decode_matches_numpy_on_ragged_lengths(B, Tq, S, N, K, H, lengths, window, chunk, sinks, softcap, blocks):
    """Each sequence's last Tq tokens against its own prefix; cache slots past a length and before the band of the
    oldest query's chunk are NaN (never read)."""
    rng = np.random.default_rng(S + H + Tq)
    q, k, v = normal(rng, B, Tq, N, H, scale=2.0), normal(rng, B, S, K, H), normal(rng, B, S, K, H)
    sink_arr = normal(rng, N, scale=2.0) if sinks else None
    pos, lens = np.arange(S)[None, :], np.asarray(lengths)[:, None]
    first = np.maximum(lens - Tq, 0) // chunk * chunk // blocks.block_k * blocks.block_k if chunk else 0
    poisoned = jnp.asarray(((pos >= lens) | (pos < first))[:, :, None, None])
    kw = dict(window=window, chunk=chunk, softcap=softcap, sinks=sink_arr)
    out = jax.jit(lambda *a: decode_attention(*a, block_sizes=blocks, interpret=True, **kw),
                  compiler_options=FAST_COMPILE)(q, jnp.where(poisoned, jnp.nan, k), jnp.where(poisoned, jnp.nan, v),
                                                 jnp.asarray(lengths, jnp.int32))
    assert out.shape == q.shape and bool(jnp.isfinite(out).all()), "a NaN slot was read"
    want = np.zeros(q.shape)
    for b, length in enumerate(lengths):  # queries before position 0 see nothing: zeros in both
        want[b] = naive(q[b:b + 1], k[b:b + 1, :length], v[b:b + 1, :length], sm_scale=H ** -0.5, **kw)[0]
    err = max_rel(out, want)
    print(f"decode {err:.1e}")
    assert err <= TOL


@pytest.mark.parametrize("Tq,G,window,chunk,n_splits", [
    (1, 4, None, 8, 3), (4, 2, None, 40, 2), (20, 2, None, 16, 4), (3, 1, 10, 20, 2), (5, 8, None, 1, 8),
])
def test_decode_tile_bands_with_chunks_cover_exactly_the_visible_tiles(Tq, G, window, chunk, n_splits):
    """Over all splits, each row tile visits exactly the cache tiles its rows see, each once, mask-free exactly
    where all its rows see the whole tile; the splits share out at most _band_tiles tiles."""
    S, bk, block_m = 96, 16, 16
    n_tiles, M = S // bk, Tq * G
    base = da._Static(sm_scale=1.0, n_new=Tq, group=G, block_k=bk, tiles_per_split=1, n_tiles=n_tiles,
                      block_m=block_m, window=window, chunk=chunk)
    n_band = da._band_tiles(base)
    st = dataclasses.replace(base, tiles_per_split=-(-n_band // min(n_splits, n_band)))
    for length in range(S + 1):
        for row_tile in range(-(-M // block_m)):
            rows = np.arange(row_tile * block_m, min((row_tile + 1) * block_m, M))
            p = length - Tq + rows // G
            s = np.arange(S)[None, :]
            visible = (s <= p[:, None]) & (s < length) & (s // chunk == np.maximum(p, 0)[:, None] // chunk)
            if window:
                visible &= s > p[:, None] - window
            tiles = visible.reshape(len(rows), n_tiles, bk)
            visited, clear = [], []
            for split in range(-(-n_band // st.tiles_per_split)):
                lo, clear_lo, clear_hi, hi = (int(x) for x in da._band(length, row_tile, split, st))
                visited += range(lo, hi)
                clear += range(clear_lo, clear_hi)
            assert visited == [j for j in range(n_tiles) if tiles[:, j].any()], (length, row_tile)
            assert clear == [j for j in range(n_tiles) if tiles[:, j].all()], (length, row_tile)


@pytest.mark.parametrize("P,Tq,lengths,window,chunk,blocks", [
    (16, 1, [70, 9, 33], None, 8, pa.BlockSizes(num_splits=3)),  # chunk < page
    (16, 3, [100, 40, 3], 20, None, pa.BlockSizes(num_splits=2)),  # gpt-oss: window + sinks
    (32, 2, [90, 64, 17], None, 48, pa.BlockSizes(block_k=16, num_splits=2)),  # chunk > page; pages in 16-slices
])
def test_paged_matches_numpy_with_hostile_pools(P, Tq, lengths, window, chunk, blocks):
    """A shuffled pool: table entries of pages no query's chunk or window reaches point at a NaN page, as do unused
    entries; slots past each length are NaN. Against float64 numpy on the contiguous keys, and the paged reference."""
    B, N, K, H = len(lengths), 8, 2, 16
    rng = np.random.default_rng(P + Tq)
    max_pages = -(-max(lengths) // P) + 1
    S = max_pages * P
    q, k, v = normal(rng, B, Tq, N, H, scale=2.0), normal(rng, B, S, K, H), normal(rng, B, S, K, H)
    sinks = normal(rng, N, scale=2.0)
    n_pages = B * max_pages + 1
    order = rng.permutation(n_pages)  # pool page of (b, j) = order[b * max_pages + j]; the last one is all NaN
    k_pool, v_pool = np.full((2, n_pages, P, K, H), np.nan, np.float32)
    table = order[:B * max_pages].reshape(B, max_pages).astype(np.int32)
    for b, length in enumerate(lengths):
        oldest = max(length - Tq, 0)
        oldest = oldest // chunk * chunk if chunk else max(oldest - window + 1, 0)
        for j in range(max_pages):
            live = min(max(length - j * P, 0), P)
            if live == 0 or (j + 1) * P <= oldest:  # unused, or wholly before every query's reach
                table[b, j] = order[-1]
                continue
            k_pool[table[b, j], :live] = k[b, j * P:j * P + live]
            v_pool[table[b, j], :live] = v[b, j * P:j * P + live]
    kw = dict(window=window, chunk=chunk, sinks=sinks)
    args = (q, jnp.asarray(k_pool), jnp.asarray(v_pool), jnp.asarray(table), jnp.asarray(lengths, jnp.int32))
    out = jax.jit(lambda *a: paged_decode_attention(*a, block_sizes=blocks, interpret=True, **kw),
                  compiler_options=FAST_COMPILE)(*args)
    assert bool(jnp.isfinite(out).all()), "a NaN page or slot was read"
    want = np.stack([naive(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], sm_scale=H ** -0.5, **kw)[0]
                     for b, n in enumerate(lengths)])
    errs = max_rel(out, want), max_rel(paged_decode_attention_reference(*args, **kw), want)
    print(f"paged {errs[0]:.1e}, paged reference {errs[1]:.1e}")
    assert max(errs) <= TOL


# ------------------------------------------------------------------------------------------- contract

@pytest.mark.parametrize("kwargs,message", [
    (dict(causal=False, chunk=8), "needs causal=True"),
    (dict(causal=True, chunk=0), "chunk must be a Python int >= 1"),
    (dict(causal=True, chunk=4.0), "chunk must be a Python int >= 1"),
    (dict(causal=True, sinks=jnp.zeros((3,))), r"sinks must be a float array of shape \(2,\)"),
    (dict(causal=True, sinks=jnp.zeros((2,), jnp.int32)), "sinks must be a float array"),
])
def test_bad_sinks_or_chunk_raise_clear_errors(kwargs, message):
    x = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match=message):
        flash_attention(x, x, x, interpret=True, **kwargs)
    if "causal=True" not in message:
        kwargs.pop("causal")
        with pytest.raises(ValueError, match=message):
            decode_attention(x[:, :1], x, x, jnp.asarray([8], jnp.int32), interpret=True, **kwargs)


def test_sinks_and_chunks_lower_to_valid_triton_ir(monkeypatch):
    """The compiled path cannot run here, but every op (the per-head sink load, the chunk arithmetic, the backward)
    must lower to Triton and pass its verifier: flash forward, dK/dV, dQ, decode and paged split kernels."""
    from jax._src.pallas.triton import lowering  # private: the only handle on the Triton module
    verified = []
    original = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*a, **kw):
        result = original(*a, **kw)
        verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    for module in (fa, da, pa):
        monkeypatch.setattr(module, "resolve_interpret", lambda interpret, kernel="": False)
    sds = jax.ShapeDtypeStruct
    q, kv, sinks = sds((2, 300, 4, 64), jnp.bfloat16), sds((2, 300, 2, 64), jnp.bfloat16), sds((4,), jnp.float32)

    def loss(q, k, v, sinks):
        out = flash_attention(q, k, v, causal=True, window=128, chunk=96, sinks=sinks)
        return out.astype(jnp.float32).sum()

    def decode(q_new, cache, pool, table, lengths, sinks):
        return (decode_attention(q_new, cache, cache, lengths, chunk=96, sinks=sinks),
                paged_decode_attention(q_new, pool, pool, table, lengths, window=100, chunk=64, sinks=sinks))

    jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, kv, kv, sinks).lower(lowering_platforms=("cuda",))
    jax.jit(decode).trace(sds((2, 2, 4, 64), jnp.bfloat16), sds((2, 1000, 2, 64), jnp.bfloat16),
                          sds((40, 32, 2, 64), jnp.bfloat16), sds((2, 20), jnp.int32), sds((2,), jnp.int32),
                          sinks).lower(lowering_platforms=("cuda",))
    assert verified == [True] * 5
