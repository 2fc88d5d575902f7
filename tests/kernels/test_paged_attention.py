"""paged_decode_attention (Pallas, interpret mode on CPU) against its reference and against contiguous decoding.

Every case builds one contiguous cache per sequence first and then scatters it into a shuffled page pool, so
the second comparison, decode_attention_reference on the contiguous cache, shares no code with the paging.
The pools are hostile: every page no sequence owns is NaN, every unused table entry points at one, slots past
a length in a sequence's last page are NaN, with a window the pages wholly before every query's window are
NaN as well (a sliding-window engine frees them), and sequence 1 shares its first pages with sequence 0.

Bounds (docs/testing.md): float32 max|out - ref| <= 1e-5 * max|ref| elementwise; bf16 ||out - ref|| <= 1e-2
||ref|| against float32 math. Measured, the same under `-n 2` and pinned to one core (`taskset -c 0`), and the
same against either reference: float32 4.1e-8 .. 3.5e-7 (margin 29x; the reference alone vs contiguous
decoding 1.4e-7), bf16 1.8e-3 and 2.1e-3 (4.8x; rounding to 8 bits, the same on every machine).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.decode_attention as da
import pallas_kernels.paged_attention as pa
from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels.paged_attention import BlockSizes, paged_decode_attention, paged_decode_attention_reference

on_gpu = jax.default_backend() == "gpu"
FAST_COMPILE = {} if on_gpu else {"xla_backend_optimization_level": 0}  # interpret-mode programs compile 2x faster
F32_TOL, BF16_TOL = 1e-5, 1e-2


def paged_inputs(B, Tq, N, K, H, P, lengths, *, max_pages=None, shared=0, window=None, spare=3, dtype=jnp.float32,
                 seed=0):
    """(q, k_pages, v_pages, page_table, lengths, k, v): a shuffled pool holding the contiguous caches k, v
    [B, max_pages * P, K, H] (NaN past each length), the first `shared` pages of sequence 1 being sequence 0's.

    NaN fills every pool page no sequence owns (plus `spare` extra ones), every table entry past a sequence's
    pages points at one, and so do the entries of pages wholly before every query's window.
    """
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int64)
    used = -(-lengths // P)  # pages each sequence owns
    max_pages = max_pages or int(used.max()) + 1  # at least one unused entry per sequence
    S = max_pages * P
    q = rng.standard_normal((B, Tq, N, H), np.float32) * 2.0  # scores of a few units: soft-caps bend them
    k, v = rng.standard_normal((2, B, S, K, H), np.float32)
    if shared:
        assert B >= 2 and shared * P <= min(lengths[:2]), "only whole pages within both sequences are shared"
        k[1, :shared * P], v[1, :shared * P] = k[0, :shared * P], v[0, :shared * P]
    stale = np.arange(S)[None, :] >= lengths[:, None]
    k[stale], v[stale] = np.nan, np.nan

    owned = [(b, j) for b in range(B) for j in range(used[b]) if not (b == 1 and j < shared)]
    num_pages = len(owned) + spare + 1
    order = rng.permutation(num_pages)  # pages anywhere in the pool, in any order
    k_pages = np.full((num_pages, P, K, H), np.nan, np.float32)
    v_pages = np.full_like(k_pages, np.nan)
    nan_pages = order[len(owned):]
    table = rng.choice(nan_pages, size=(B, max_pages)).astype(np.int32)  # unused entries: NaN pages
    for (b, j), page in zip(owned, order):
        table[b, j] = page
        k_pages[page], v_pages[page] = k[b, j * P:(j + 1) * P], v[b, j * P:(j + 1) * P]
    if shared:
        table[1, :shared] = table[0, :shared]
    if window is not None:  # pages older than the oldest key any query sees: freed, here NaN
        for b in range(B):
            table[b, :max(0, lengths[b] - Tq - window + 1) // P] = nan_pages[0]
    cast = lambda x: jnp.asarray(x).astype(dtype)  # noqa: E731
    return (cast(q), cast(k_pages), cast(v_pages), jnp.asarray(table), jnp.asarray(lengths, jnp.int32),
            cast(k), cast(v))


def max_rel(x, ref) -> float:
    """max|x - ref| / max|ref| (docs/testing.md)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def norm_rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def references(q, kp, vp, table, lengths, k, v, **kw):
    """(paged reference, contiguous reference) in float32 math, jitted."""
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    return jax.jit(lambda q, kp, vp, k, v: (
        paged_decode_attention_reference(up(q), up(kp), up(vp), table, lengths, **kw),
        decode_attention_reference(up(q), up(k), up(v), lengths, **kw)))(q, kp, vp, k, v)


def kernel(q, kp, vp, table, lengths, *, blocks=None, **kw):
    return jax.jit(lambda *a: paged_decode_attention(*a, block_sizes=blocks, interpret=True, **kw),
                   compiler_options=FAST_COMPILE)(q, kp, vp, table, lengths)


CASES = [  # B, Tq, N, K, H, P, lengths, shared pages, window, softcap, block sizes
    (3, 1, 4, 4, 32, 16, [1, 37, 80], 0, None, None, BlockSizes(block_k=16, num_splits=3)),  # G 1, length 1
    (2, 3, 4, 2, 32, 16, [48, 33], 2, None, None, None),  # G 2, prefix sharing, default splits
    (2, 3, 8, 2, 16, 32, [70, 3], 0, 10, None, BlockSizes(num_splits=2)),  # G 4, window shorter than a page
    (2, 1, 8, 2, 64, 32, [100, 64], 2, 45, 2.0, BlockSizes(num_splits=2)),  # window longer than a page, soft-cap
    (2, 3, 4, 1, 32, 64, [129, 1], 0, None, 1.0, BlockSizes(block_k=16, num_splits=3)),  # 64-pages in 16-slices
    (2, 1, 2, 2, 24, 128, [200, 17], 0, 40, None, BlockSizes(block_k=32, num_splits=2)),  # H 24 padded; sliced
    (1, 20, 16, 2, 16, 16, [90], 0, 30, 3.0, BlockSizes(num_splits=2)),  # 160 query rows: two row tiles
]


@pytest.mark.parametrize("B,Tq,N,K,H,P,lengths,shared,window,softcap,blocks", CASES)
def test_float32_matches_paged_and_contiguous_references(B, Tq, N, K, H, P, lengths, shared, window, softcap, blocks):
    q, kp, vp, table, lengths_, k, v = paged_inputs(B, Tq, N, K, H, P, lengths, shared=shared, window=window)
    out = kernel(q, kp, vp, table, lengths_, blocks=blocks, window=window, softcap=softcap)
    ref, contiguous = references(q, kp, vp, table, lengths_, k, v, window=window, softcap=softcap)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.isfinite(out).all()), "a NaN page (unused entry, stale slot, freed window page) was read"
    errs = max_rel(out, ref), max_rel(out, contiguous)
    print(f"float32 max|diff|/max|ref|: paged reference {errs[0]:.2e}, contiguous {errs[1]:.2e}")
    assert max(errs) <= F32_TOL
    for b, length in enumerate(lengths):  # queries before position 0 see nothing: zeros
        np.testing.assert_array_equal(np.asarray(out[b, :max(0, Tq - length)]), 0.0)


def test_shared_prefix_pages_give_the_same_outputs_as_private_copies():
    """Two sequences whose first pages are the same pool pages, and the same two with private copies."""
    q, kp, vp, table, lengths, k, v = paged_inputs(2, 1, 4, 2, 16, 16, [64, 64], shared=3)
    copy_pages = jnp.concatenate([kp, kp[table[0, :3]]]), jnp.concatenate([vp, vp[table[0, :3]]])
    private = table.at[1, :3].set(kp.shape[0] + jnp.arange(3, dtype=jnp.int32))
    np.testing.assert_array_equal(np.asarray(kernel(q, kp, vp, table, lengths)),
                                  np.asarray(kernel(q, *copy_pages, private, lengths)))


@pytest.mark.parametrize("P,window,softcap,blocks", [
    (16, None, None, BlockSizes(num_splits=2)),
    (32, 20, 2.0, BlockSizes(block_k=16, num_splits=3)),
])
def test_bf16_within_1e2_of_float32(P, window, softcap, blocks):
    q, kp, vp, table, lengths, k, v = paged_inputs(2, 3, 8, 2, 64, P, [120, 41], shared=1, window=window,
                                                   dtype=jnp.bfloat16)
    out = kernel(q, kp, vp, table, lengths, blocks=blocks, window=window, softcap=softcap)
    ref, contiguous = references(q, kp, vp, table, lengths, k, v, window=window, softcap=softcap)  # float32 math
    errs = norm_rel(out, ref), norm_rel(out, contiguous)
    print(f"bf16 ||diff||/||ref||: paged reference {errs[0]:.2e}, contiguous {errs[1]:.2e}")
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all()) and max(errs) <= BF16_TOL


def test_reference_gathers_the_contiguous_cache():
    """The reference itself, on pools whose unused slots hold finite garbage: contiguous decoding's result."""
    q, kp, vp, table, lengths, k, v = paged_inputs(2, 2, 4, 2, 16, 16, [40, 17], shared=1, window=9)
    fill = lambda x: jnp.nan_to_num(x, nan=7.0)  # noqa: E731
    ref, contiguous = jax.jit(lambda *a: (
        paged_decode_attention_reference(q, fill(kp), fill(vp), table, lengths, window=9, softcap=1.5),
        decode_attention_reference(q, k, v, lengths, window=9, softcap=1.5)))()
    assert max_rel(ref, contiguous) <= F32_TOL


@pytest.mark.parametrize("P,block_k,Tq,G,window,n_splits", [
    (16, 128, 1, 4, None, 3), (16, 16, 3, 2, 10, 2), (32, 128, 3, 1, 40, 4), (64, 16, 1, 8, 20, 3),
    (64, 32, 20, 2, 7, 5), (128, 32, 2, 4, None, 2),
])
def test_programs_read_exactly_the_pages_their_queries_see(P, block_k, Tq, G, window, n_splits):
    """For every length: over all splits, a row tile reads the table entries (and so the pages) holding a
    position one of its queries sees, each tile once, and no other entry, so unused entries and pages freed
    behind a window may hold any index. (A read of one would be masked, so NaN pools cannot show it.)"""
    max_pages, block_m = 5, 16
    tile = min(P, block_k)
    M = Tq * G
    base = pa._Static(sm_scale=1.0, n_new=Tq, group=G, block_k=tile, tiles_per_split=1,
                      n_tiles=max_pages * (P // tile), block_m=block_m, window=window, tiles_per_page=P // tile)
    n_band = da._band_tiles(base)
    st = dataclasses.replace(base, tiles_per_split=-(-n_band // min(n_splits, n_band)))
    S = max_pages * P
    for length in range(S + 1):
        for row_tile in range(-(-M // block_m)):
            rows = np.arange(row_tile * block_m, min((row_tile + 1) * block_m, M))
            p = length - Tq + rows // G
            s = np.arange(S)[None, :]
            visible = (s <= p[:, None]) & (s < length) & ((s > p[:, None] - window) if window else True)
            tiles = []
            for split in range(-(-n_band // st.tiles_per_split)):
                lo, _, _, hi = (int(x) for x in da._band(length, row_tile, split, st))
                tiles += range(lo, hi)
            assert tiles == [t for t in range(st.n_tiles) if visible[:, t * tile:(t + 1) * tile].any()]
            entries = sorted({t // st.tiles_per_page for t in tiles})
            assert entries == [j for j in range(max_pages) if visible[:, j * P:(j + 1) * P].any()], (length, row_tile)


# ------------------------------------------------------------------------------------------- contract

def _arrays(q_shape=(2, 1, 4, 16), pages_shape=(6, 16, 2, 16), table_shape=(2, 3), lengths_shape=(2,),
            dtype=jnp.float32, v_dtype=None, table_dtype=jnp.int32):
    pages = jnp.zeros(pages_shape, dtype)
    return (jnp.zeros(q_shape, dtype), pages, pages.astype(v_dtype or dtype), jnp.zeros(table_shape, table_dtype),
            jnp.ones(lengths_shape, jnp.int32))


@pytest.mark.parametrize("arrays,kwargs,message", [
    (_arrays(pages_shape=(6, 24, 2, 16)), {}, "page size P = k_pages.shape.1. must be a power of two >= 16"),
    (_arrays(pages_shape=(6, 8, 2, 16)), {}, "allocate pages of 16, 32, 64 or 128"),
    (_arrays(q_shape=(2, 1, 3, 16)), {}, "cannot be grouped"),
    (_arrays(pages_shape=(6, 16, 2, 32)), {}, "disagree on head_dim"),
    (_arrays(q_shape=(2, 4, 16), pages_shape=(6, 16, 2, 16)), {}, r"q must be \[B, Tq, N, H\]"),
    (_arrays(v_dtype=jnp.bfloat16), {}, "must share one of float32/bfloat16/float16"),
    (_arrays(table_shape=(3, 3)), {}, r"page_table must be integers of shape \[B, max_pages\] = \[2,"),
    (_arrays(table_shape=(2,)), {}, "page_table must be integers"),
    (_arrays(table_dtype=jnp.float32), {}, "page_table must be integers"),
    (_arrays(lengths_shape=(3,)), {}, "lengths must be integers of shape"),
    (_arrays(), {"window": 0}, "window must be a Python int >= 1"),
    (_arrays(), {"softcap": -1.0}, "softcap must be a finite Python float > 0"),
])
def test_bad_inputs_raise_clear_errors(arrays, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(*arrays, interpret=True, **kwargs)


def test_bad_block_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
        BlockSizes(block_k=48)
    with pytest.raises(ValueError, match="num_splits must be a positive integer"):
        BlockSizes(num_splits=0)


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="compiled Pallas/Triton needs an NVIDIA GPU")
@pytest.mark.parametrize("Tq,N,K,H,P,window,softcap", [(1, 32, 8, 128, 16, None, None), (3, 8, 2, 64, 128, 500, 30.0)])
def test_compiled_matches_reference(Tq, N, K, H, P, window, softcap):
    lengths = np.random.default_rng(0).integers(1, 3000, size=4)
    q, kp, vp, table, lengths, k, v = paged_inputs(4, Tq, N, K, H, P, lengths, shared=1 if min(lengths) >= P else 0,
                                                   window=window, dtype=jnp.bfloat16)
    out = jax.jit(lambda *a: paged_decode_attention(*a, window=window, softcap=softcap))(q, kp, vp, table, lengths)
    ref, contiguous = references(q, kp, vp, table, lengths, k, v, window=window, softcap=softcap)
    assert bool(jnp.isfinite(out).all()) and max(norm_rel(out, ref), norm_rel(out, contiguous)) <= BF16_TOL
