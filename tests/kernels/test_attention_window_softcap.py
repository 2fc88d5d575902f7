"""Sliding windows and logit soft-capping in flash_attention and decode_attention (interpret mode on CPU).

Semantics (transformers' sliding_window_overlay and Gemma 2's eager attention): the query at key position
p sees keys p - W < s <= p; scores are soft-capped, C * tanh(scores / C), before masking and softmax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.decode_attention as da
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference

on_gpu = jax.default_backend() == "gpu"
FAST_COMPILE = {} if on_gpu else {"xla_backend_optimization_level": 0}
# Several q/kv tiles per call even at these lengths: window edges, diagonals and padded tails all occur.
SMALL = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)
DecodeBlocks = da.BlockSizes


def normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32))


def naive_attention(q, k, v, *, sm_scale, causal=True, window=None, softcap=None, segment_ids=None):
    """Independent float64 numpy attention, one (batch, head) at a time; rows that see no key give 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    p, s = np.arange(T)[:, None] + S - T, np.arange(S)[None, :]  # bottom-right aligned positions
    out = np.zeros((B, T, N, H))
    for b in range(B):
        allowed = np.ones((T, S), bool)
        if causal:
            allowed &= s <= p
        if window is not None:
            allowed &= s > p - window
        if segment_ids is not None:
            allowed &= np.asarray(segment_ids[0])[b][:, None] == np.asarray(segment_ids[1])[b][None, :]
        for n in range(N):
            kv = n // (N // K)
            logits = q[b, :, n] @ k[b, :, kv].T * sm_scale  # [T, S]
            if softcap is not None:
                logits = softcap * np.tanh(logits / softcap)
            for t in range(T):
                if allowed[t].any():
                    w = np.exp(logits[t, allowed[t]] - logits[t, allowed[t]].max())
                    out[b, t, n] = (w / w.sum()) @ v[b, :, kv][allowed[t]]
    return out


def value_and_grads(attn, q, k, v, do):
    """(out, dq, dk, dv) of attn at (q, k, v) with cotangent do, jitted."""
    def f(q, k, v):
        out, vjp = jax.vjp(attn, q, k, v)
        return (out, *vjp(do))
    return jax.jit(f, compiler_options=FAST_COMPILE)(q, k, v)


def assert_close(x, ref, what, tol=1e-5):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    err = np.abs(x - ref).max()
    assert err <= tol * max(1.0, np.abs(ref).max()), f"{what}: max |diff| {err:.2e}"


# ------------------------------------------------------------------------------------------- references

@pytest.mark.parametrize("B,T,S,N,K,window,softcap,causal,segments", [
    (1, 12, 12, 2, 1, 4, None, True, False),
    (2, 7, 15, 4, 2, 5, 0.7, True, True),  # T < S, GQA, segments
    (1, 15, 6, 2, 2, 3, None, True, False),  # T > S: early rows see nothing
    (1, 9, 11, 2, 1, None, 0.5, False, False),  # soft-cap without a mask
])
def test_flash_reference_matches_naive_numpy(B, T, S, N, K, window, softcap, causal, segments):
    rng = np.random.default_rng(T * S)
    q, k, v = normal(rng, B, T, N, 8) * 2, normal(rng, B, S, K, 8) * 2, normal(rng, B, S, K, 8)
    seg = None
    if segments:
        seg = (jnp.asarray(rng.integers(0, 2, (B, T)), jnp.int32), jnp.asarray(rng.integers(0, 2, (B, S)), jnp.int32))
    ref = jax.jit(flash_attention_reference, static_argnames=("causal", "sm_scale", "window", "softcap"))(
        q, k, v, causal=causal, segment_ids=seg, sm_scale=0.4, window=window, softcap=softcap)
    naive = naive_attention(q, k, v, sm_scale=0.4, causal=causal, window=window, softcap=softcap, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(ref), naive, atol=2e-6, rtol=1e-5)


def test_decode_reference_is_windowed_causal_attention_over_each_prefix():
    rng = np.random.default_rng(1)
    q, k, v = normal(rng, 3, 3, 4, 8), normal(rng, 3, 20, 2, 8), normal(rng, 3, 20, 2, 8)
    lengths = jnp.asarray([20, 9, 2], jnp.int32)
    dec = jax.jit(lambda *a: decode_attention_reference(*a, sm_scale=0.3, window=6, softcap=1.5))(q, k, v, lengths)
    for b, length in enumerate(np.asarray(lengths)):
        full = naive_attention(q[b:b + 1], k[b:b + 1, :length], v[b:b + 1, :length], sm_scale=0.3, window=6,
                               softcap=1.5)
        np.testing.assert_allclose(np.asarray(dec[b]), full[0], atol=2e-6)


def test_window_at_least_the_sequence_and_huge_softcap_change_nothing():
    rng = np.random.default_rng(2)
    q, k, v = normal(rng, 1, 10, 2, 8), normal(rng, 1, 14, 1, 8), normal(rng, 1, 14, 1, 8)
    ref = lambda **kw: flash_attention_reference(q, k, v, causal=True, **kw)
    plain, w14, w13, capped = jax.jit(lambda: (ref(), ref(window=14), ref(window=13), ref(softcap=1e6)))()
    np.testing.assert_array_equal(np.asarray(w14), np.asarray(plain))
    assert_close(capped, plain, "softcap 1e6")
    assert not np.allclose(np.asarray(w13), np.asarray(plain))


# ---------------------------------------------------------------------------------------- flash kernel

FLASH_CASES = [  # B, T, S, N, K, H, window, softcap, segments, block sizes
    (1, 64, 64, 2, 1, 16, 5, None, False, SMALL),  # window shorter than a tile
    (1, 100, 100, 4, 2, 64, 40, None, False, SMALL),  # window spanning tiles, padded tails
    (2, 48, 48, 4, 2, 16, None, 2.0, False, SMALL),  # soft-cap alone
    (2, 96, 80, 4, 2, 32, 33, 1.5, True, SMALL),  # window + soft-cap + GQA + segment ids, T > S
    (1, 70, 50, 2, 2, 16, 200, None, False, SMALL),  # window longer than S; T > S: rows that see nothing
    (1, 40, 72, 4, 1, 96, 24, 30.0, False, None),  # head dim 96 (padded to 128), T < S, default tiles
    (1, 40, 40, 2, 1, 256, 16, 5.0, False, None),  # head dim 256 (Gemma), default fp32 tiles
]


@pytest.mark.parametrize("B,T,S,N,K,H,window,softcap,segments,blocks", FLASH_CASES)
def test_flash_matches_reference_forward_and_gradients(B, T, S, N, K, H, window, softcap, segments, blocks):
    rng = np.random.default_rng(T + S + H)
    q, k, v, do = normal(rng, B, T, N, H), normal(rng, B, S, K, H), normal(rng, B, S, K, H), normal(rng, B, T, N, H)
    q = q * 2.0  # scores of a few units: the soft-cap bends them
    seg = None
    if segments:
        seg = (jnp.asarray(rng.integers(0, 3, (B, T)), jnp.int32), jnp.asarray(rng.integers(0, 3, (B, S)), jnp.int32))
    kw = dict(causal=True, segment_ids=seg, window=window, softcap=softcap)
    if window is None and not segments:
        kw["causal"] = False  # soft-cap alone, over the full matrix
    got = value_and_grads(lambda q, k, v: flash_attention(q, k, v, block_sizes=blocks, interpret=True, **kw),
                          q, k, v, do)
    want = value_and_grads(lambda q, k, v: flash_attention_reference(q, k, v, **kw), q, k, v, do)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.shape == ref.shape and x.dtype == ref.dtype
        assert bool(jnp.isfinite(x).all()), name
        assert_close(x, ref, name)
    if T > S:  # rows before the first key see nothing: zero output, zero gradient
        np.testing.assert_array_equal(np.asarray(got[0][:, :T - S]), 0.0)
        np.testing.assert_array_equal(np.asarray(got[1][:, :T - S]), 0.0)
    if segments is False and softcap is None:  # and the reference is right: independent numpy
        naive = naive_attention(q, k, v, sm_scale=H ** -0.5, window=window)
        np.testing.assert_allclose(np.asarray(got[0]), naive, atol=1e-5)


def test_flash_never_reads_key_tiles_before_the_window():
    """NaN in every key/value tile no query's window reaches: a visited tile (masked or not) would turn the
    output NaN (0 * NaN), so finite results equal to the reference prove those tiles are skipped, forward and
    backward, and their dK/dV come back exactly zero."""
    B, T, S, N, K, H, W = 1, 16, 128, 2, 1, 16, 16
    rng = np.random.default_rng(3)
    q, k, v, do = normal(rng, B, T, N, H), normal(rng, B, S, K, H), normal(rng, B, S, K, H), normal(rng, B, T, N, H)
    unseen = np.arange(S) < (S - T - W + 1) // 16 * 16  # whole 16-key tiles older than every window
    poison = lambda x: jnp.where(jnp.asarray(unseen)[None, :, None, None], jnp.nan, x)
    got = value_and_grads(lambda q, k, v: flash_attention(q, k, v, causal=True, window=W, block_sizes=SMALL,
                                                          interpret=True), q, poison(k), poison(v), do)
    want = value_and_grads(lambda q, k, v: flash_attention_reference(q, k, v, causal=True, window=W), q, k, v, do)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert bool(jnp.isfinite(x).all()), f"{name}: a tile outside the window was read"
        assert_close(x, ref, name)
    np.testing.assert_array_equal(np.asarray(got[2][:, unseen]), 0.0)


def test_jax_enable_x64_runs_both_kernels():
    """With jax_enable_x64 on, int64 Python scalars must not meet the kernels' int32 program ids."""
    rng = np.random.default_rng(4)
    q, k, v, do = normal(rng, 1, 16, 2, 16), normal(rng, 1, 32, 1, 16), normal(rng, 1, 32, 1, 16), normal(rng, 1, 16, 2, 16)
    lengths = jnp.asarray([32], jnp.int32)
    with jax.enable_x64(True):
        kw = dict(causal=True, window=9, softcap=3.0)
        got = value_and_grads(lambda q, k, v: flash_attention(q, k, v, block_sizes=SMALL, interpret=True, **kw),
                              q, k, v, do)
        want = value_and_grads(lambda q, k, v: flash_attention_reference(q, k, v, **kw), q, k, v, do)
        dec, dec_ref = jax.jit(lambda *a: (
            decode_attention(*a, window=9, block_sizes=DecodeBlocks(block_k=16), interpret=True),
            decode_attention_reference(*a, window=9)), compiler_options=FAST_COMPILE)(q[:, -2:], k, v, lengths)
    for name, x, ref in zip(("out", "dq", "dk", "dv", "decode"), (*got, dec), (*want, dec_ref)):
        assert x.dtype == jnp.float32, name
        assert_close(x, ref, name)


# --------------------------------------------------------------------------------------- decode kernel

@pytest.mark.parametrize("B,Tq,S,N,K,H,lengths,window,softcap,blocks", [
    (3, 1, 100, 4, 2, 16, [1, 37, 100], 10, None, DecodeBlocks(block_k=16, num_splits=3)),
    (3, 4, 128, 8, 2, 32, [0, 3, 120], 40, 2.0, DecodeBlocks(block_k=16, num_splits=2)),  # ragged, GQA, Tq > 1
    (2, 20, 96, 16, 2, 16, [96, 30], 24, None, DecodeBlocks(block_k=16, num_splits=2)),  # 160 rows: 2 row tiles
    (2, 3, 64, 4, 1, 16, [64, 5], None, 1.0, DecodeBlocks(block_k=16)),  # soft-cap alone, default splits
    (2, 2, 64, 2, 1, 256, [64, 30], 20, 3.0, None),  # head dim 256
])
def test_decode_matches_reference_on_ragged_lengths(B, Tq, S, N, K, H, lengths, window, softcap, blocks):
    rng = np.random.default_rng(S + H)
    q, k, v = normal(rng, B, Tq, N, H) * 2.0, normal(rng, B, S, K, H), normal(rng, B, S, K, H)
    lengths = jnp.asarray(lengths, jnp.int32)
    kw = dict(window=window, softcap=softcap)
    out = jax.jit(lambda *a: decode_attention(*a, block_sizes=blocks, interpret=True, **kw),
                  compiler_options=FAST_COMPILE)(q, k, v, lengths)
    assert out.shape == q.shape and bool(jnp.isfinite(out).all())
    assert_close(out, decode_attention_reference(q, k, v, lengths, **kw), "decode")


def test_decode_never_reads_cache_tiles_before_the_window():
    """NaN in the live cache before every window (and stale NaN past each length) leaves the output finite."""
    B, Tq, S, N, K, H, W = 2, 2, 128, 4, 2, 16, 20
    rng = np.random.default_rng(5)
    q, k, v = normal(rng, B, Tq, N, H), normal(rng, B, S, K, H), normal(rng, B, S, K, H)
    lengths = np.asarray([128, 77])
    first = (lengths - Tq - W + 1) // 16 * 16  # start of the tile holding each sequence's oldest visible key
    pos = np.arange(S)[None, :]
    poisoned = jnp.asarray(((pos < first[:, None]) | (pos >= lengths[:, None]))[:, :, None, None])
    kp, vp = jnp.where(poisoned, jnp.nan, k), jnp.where(poisoned, jnp.nan, v)
    lengths = jnp.asarray(lengths, jnp.int32)
    out = jax.jit(lambda *a: decode_attention(*a, window=W, block_sizes=DecodeBlocks(block_k=16, num_splits=4),
                                              interpret=True), compiler_options=FAST_COMPILE)(q, kp, vp, lengths)
    assert bool(jnp.isfinite(out).all()), "a cache tile outside the window was read"
    assert_close(out, decode_attention_reference(q, k, v, lengths, window=W), "decode")


@pytest.mark.parametrize("Tq,G,block_m,window,n_splits", [
    (1, 4, 16, 10, 3), (4, 2, 16, 40, 2), (20, 2, 16, 7, 4), (3, 1, 16, None, 2), (5, 8, 16, 1, 8),
])
def test_decode_tile_bands_cover_exactly_the_visible_tiles(Tq, G, block_m, window, n_splits):
    """Over all splits, each program row tile visits exactly the cache tiles its rows see, each tile once,
    and runs mask-free on exactly the tiles all its rows see whole."""
    S, bk = 96, 16
    n_tiles, M = S // bk, Tq * G
    base = da._Static(sm_scale=1.0, n_new=Tq, group=G, block_k=bk, tiles_per_split=1, n_tiles=n_tiles,
                      block_m=block_m, window=window)
    n_band = da._band_tiles(base)
    tps = -(-n_band // min(n_splits, n_band))
    st_ = dataclasses.replace(base, tiles_per_split=tps)
    for length in range(S + 1):
        for row_tile in range(-(-M // block_m)):
            rows = np.arange(row_tile * block_m, min((row_tile + 1) * block_m, M))
            p = length - Tq + rows // G  # positions of this tile's real rows
            s = np.arange(S)[None, :]
            visible = (s <= p[:, None]) & (s < length) & ((s > p[:, None] - window) if window else True)
            tiles = visible.reshape(len(rows), n_tiles, bk)
            visited, clear = [], []
            for split in range(-(-n_band // tps)):
                lo, clear_lo, clear_hi, hi = (int(x) for x in da._band(length, row_tile, split, st_))
                visited += range(lo, hi)
                clear += range(clear_lo, clear_hi)
            assert visited == [j for j in range(n_tiles) if tiles[:, j].any()], (length, row_tile)
            assert clear == [j for j in range(n_tiles) if tiles[:, j].all()], (length, row_tile)


# ------------------------------------------------------------------------------------------- contract

@pytest.mark.parametrize("kwargs,message", [
    (dict(causal=False, window=8), "needs causal=True"),
    (dict(causal=True, window=0), "window must be a Python int >= 1"),
    (dict(causal=True, window=2.5), "window must be a Python int >= 1"),
    (dict(causal=True, softcap=0.0), "softcap must be a finite Python float > 0"),
    (dict(causal=True, softcap=-1.0), "softcap must be a finite Python float > 0"),
])
def test_bad_window_or_softcap_raise_clear_errors(kwargs, message):
    x = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match=message):
        flash_attention(x, x, x, interpret=True, **kwargs)
    with pytest.raises(ValueError, match=message):
        flash_attention_reference(x, x, x, **kwargs)
    if "causal=True" not in message:
        kwargs.pop("causal")
        with pytest.raises(ValueError, match=message):
            decode_attention(x[:, :1], x, x, jnp.asarray([8], jnp.int32), interpret=True, **kwargs)


def test_head_dim_256_default_tiles_stay_small():
    """Gemma's H = 256: each target's measured default tiles pass its shared-memory bound (pallas_kernels.tuning;
    tests/gpu compiles them for sm_80 and sm_90), and in bf16 are no larger than those at H = 128 (fp32's
    spill-free tiles are small at every head dim from 64 up and need not shrink further: docs/gpu.md)."""
    from pallas_kernels import tuning
    from pallas_kernels.targets import compiling_for

    for target in ("a100", "h100"):
        with compiling_for(target):
            for dtype in (jnp.float32, jnp.bfloat16):
                big, small = BlockSizes.default(256, dtype), BlockSizes.default(128, dtype)
                tuning.check_flash_fits(big, 256, dtype)
                if dtype == jnp.bfloat16:
                    assert big.block_q * big.block_k <= small.block_q * small.block_k
                    assert DecodeBlocks.default(256, dtype).block_k <= DecodeBlocks.default(128, dtype).block_k
