"""flash_attention (Pallas, interpret mode on CPU) against its reference, and the reference against numpy."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pallas_kernels.flash_attention as fa
from pallas_kernels import INTERPRET_ENV, PallasUnavailableError
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference

on_gpu = jax.default_backend() == "gpu"
requires_gpu = pytest.mark.skipif(not on_gpu, reason="compiled Pallas/Triton needs an NVIDIA GPU")
# Interpret-mode kernels are large XLA programs: skipping backend optimisation halves CPU compile time.
FAST_COMPILE = {} if on_gpu else {"xla_backend_optimization_level": 0}

# Small, deliberately unequal tiles: several q/kv tiles per call even at these lengths, so the
# unmasked/masked loop split, diagonal tiles and padded tails are all exercised in interpret mode.
SMALL = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)


def make_inputs(B, T, S, N, K, H, *, dtype=jnp.float32, segments=False, seed=0):
    """Random q [B,T,N,H], k/v [B,S,K,H], cotangent do [B,T,N,H]; unsorted random segment ids in {0,1,2}."""
    rng = np.random.default_rng(seed)  # numpy: no per-shape XLA compile for the inputs
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))
    q, k, v, do = normal(B, T, N, H), normal(B, S, K, H), normal(B, S, K, H), normal(B, T, N, H)
    seg = None
    if segments:
        seg = (jnp.asarray(rng.integers(0, 3, (B, T)), jnp.int32), jnp.asarray(rng.integers(0, 3, (B, S)), jnp.int32))
    return q, k, v, do, seg


def value_and_grads(attn, q, k, v, do):
    """(out, (dq, dk, dv)) of <attn(q, k, v), do>, jitted."""
    def loss(q, k, v):
        out = attn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out
    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), compiler_options=FAST_COMPILE)(q, k, v)
    return out, grads


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def assert_close_fp32(x, ref, what):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    err = np.abs(x - ref).max()
    assert err <= 1e-5 * max(1.0, np.abs(ref).max()), f"{what}: max |diff| {err:.2e}"


def naive_attention(q, k, v, *, causal, segment_ids, sm_scale):
    """Independent float64 numpy softmax attention, one (batch, head) at a time."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            kv = n // (N // K)
            logits = q[b, :, n] @ k[b, :, kv].T * sm_scale  # [T, S]
            allowed = np.ones((T, S), bool)
            if causal:
                allowed &= np.arange(S)[None, :] <= np.arange(T)[:, None] + S - T
            if segment_ids is not None:
                allowed &= np.asarray(segment_ids[0])[b][:, None] == np.asarray(segment_ids[1])[b][None, :]
            for t in range(T):
                if allowed[t].any():
                    w = np.exp(logits[t, allowed[t]] - logits[t, allowed[t]].max())
                    out[b, t, n] = (w / w.sum()) @ v[b, :, kv][allowed[t]]
    return out


@pytest.mark.parametrize("B,T,S,N,K,H,causal,segments", [
    (1, 7, 7, 2, 2, 8, True, False),
    (2, 5, 9, 4, 2, 8, True, True),
    (2, 9, 5, 4, 1, 16, True, False),  # T > S: the first rows see no key
    (1, 6, 11, 2, 1, 8, False, True),
])
def test_reference_matches_naive_numpy(B, T, S, N, K, H, causal, segments):
    q, k, v, _, seg = make_inputs(B, T, S, N, K, H, segments=segments)
    ref = jax.jit(flash_attention_reference, static_argnames=("causal", "sm_scale"))(
        q, k, v, causal=causal, segment_ids=seg, sm_scale=0.3)
    naive = naive_attention(q, k, v, causal=causal, segment_ids=seg, sm_scale=0.3)
    np.testing.assert_allclose(np.asarray(ref), naive, atol=1e-5, rtol=1e-5)


FP32_CASES = [  # B, T, S, N, K, H, causal, segments, block sizes
    (1, 1, 1, 4, 4, 32, True, False, None),
    (2, 17, 17, 4, 2, 64, True, False, None),
    (1, 17, 100, 4, 1, 32, True, False, SMALL),  # T < S: bottom-right causal alignment
    (2, 100, 100, 4, 4, 64, False, False, SMALL),
    (1, 100, 100, 4, 2, 128, True, True, SMALL),
    (2, 257, 257, 4, 2, 64, True, False, None),  # default tiles, padded 257 -> 384
    (1, 257, 100, 4, 1, 64, True, False, SMALL),  # T > S: fully masked rows
    (1, 100, 257, 4, 4, 32, False, True, SMALL),
    (2, 64, 64, 4, 2, 80, True, True, SMALL),  # head dim 80 padded to 128
    (1, 128, 128, 4, 2, 64, True, False, SMALL),  # exact tile multiples: interior tiles run mask-free
    (2, 100, 17, 4, 2, 64, False, True, None),
    (1, 257, 257, 4, 1, 128, False, False, None),
    (2, 1, 257, 4, 2, 64, True, True, SMALL),  # one new token against a long packed context
    (1, 17, 17, 4, 4, 32, False, True, None),
]


@pytest.mark.parametrize("B,T,S,N,K,H,causal,segments,blocks", FP32_CASES)
def test_matches_reference_fp32(B, T, S, N, K, H, causal, segments, blocks):
    q, k, v, do, seg = make_inputs(B, T, S, N, K, H, segments=segments, seed=T + S)
    out, grads = value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=seg, block_sizes=blocks, interpret=True),
        q, k, v, do)
    ref_out, ref_grads = value_and_grads(
        lambda q, k, v: flash_attention_reference(q, k, v, causal=causal, segment_ids=seg), q, k, v, do)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert x.shape == ref.shape and x.dtype == ref.dtype
        assert_close_fp32(x, ref, name)


@pytest.mark.parametrize("dtype,B,T,S,N,K,H,causal,segments,blocks", [
    (jnp.bfloat16, 1, 100, 100, 4, 2, 64, True, True, SMALL),
    (jnp.bfloat16, 2, 257, 257, 4, 1, 128, True, False, None),
    (jnp.float16, 1, 64, 100, 4, 2, 64, False, False, None),
])
def test_low_precision_within_1e2_of_fp32(dtype, B, T, S, N, K, H, causal, segments, blocks):
    q, k, v, do, seg = make_inputs(B, T, S, N, K, H, dtype=dtype, segments=segments)
    out, grads = value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=seg, block_sizes=blocks, interpret=True),
        q, k, v, do)
    up = [x.astype(jnp.float32) for x in (q, k, v, do)]
    ref_out, ref_grads = value_and_grads(
        lambda q, k, v: flash_attention_reference(q, k, v, causal=causal, segment_ids=seg), *up)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert rel_err(x, ref) <= 1e-2, f"{name}: relative error {rel_err(x, ref):.2e}"


def test_rows_that_see_no_key_give_zeros_and_finite_grads():
    B, T, S, N, K, H = 1, 40, 40, 2, 1, 32
    q, k, v, do, _ = make_inputs(B, T, S, N, K, H)
    q_seg = jnp.where(jnp.arange(T) < 10, 7, 1)[None]  # segment 7 has no keys
    kv_seg = jnp.where(jnp.arange(S) < 25, 1, 2)[None]
    out, grads = value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, causal=True, segment_ids=(q_seg, kv_seg), block_sizes=SMALL,
                                        interpret=True), q, k, v, do)
    assert all(bool(jnp.isfinite(x).all()) for x in (out, *grads))
    np.testing.assert_array_equal(np.asarray(out[:, :10]), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0][:, :10]), 0.0)  # dq of the empty rows
    ref_out, ref_grads = value_and_grads(
        lambda q, k, v: flash_attention_reference(q, k, v, causal=True, segment_ids=(q_seg, kv_seg)), q, k, v, do)
    for x, ref in zip((out, *grads), (ref_out, *ref_grads)):
        assert_close_fp32(x, ref, "masked rows")


def test_default_scale_is_inverse_sqrt_head_dim_and_custom_scale_applies():
    q, k, v, _, _ = make_inputs(1, 20, 20, 2, 2, 64)
    run = jax.jit(lambda q, k, v: (flash_attention(q, k, v, interpret=True),
                                   flash_attention(q, k, v, sm_scale=0.05, interpret=True)),
                  compiler_options=FAST_COMPILE)
    default, custom = run(q, k, v)
    assert_close_fp32(default, flash_attention_reference(q, k, v, sm_scale=64 ** -0.5), "default scale")
    assert_close_fp32(custom, flash_attention_reference(q, k, v, sm_scale=0.05), "sm_scale=0.05")


@settings(max_examples=5, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 70), S=st.integers(1, 70), K=st.sampled_from([1, 2]),
       G=st.sampled_from([1, 2]), H=st.sampled_from([16, 32]), causal=st.booleans(), segments=st.booleans())
def test_random_shapes_match_reference(B, T, S, K, G, H, causal, segments):
    q, k, v, do, seg = make_inputs(B, T, S, K * G, K, H, segments=segments)
    out, grads = value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=seg, block_sizes=SMALL, interpret=True),
        q, k, v, do)
    ref_out, ref_grads = value_and_grads(
        lambda q, k, v: flash_attention_reference(q, k, v, causal=causal, segment_ids=seg), q, k, v, do)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert_close_fp32(x, ref, name)


def brute_force_visible(T, S, n_rows, n_cols, causal, window):
    """[n_rows, n_cols] True where row t (padded rows continue the positions) may see key s < S."""
    p, s = np.arange(n_rows)[:, None] + S - T, np.arange(n_cols)[None, :]
    visible = (s < S) & ((s <= p) | (not causal))
    return visible & (s > p - window) if window is not None else visible


def check_band(band, tiles):
    """band (lo, clear_lo, clear_hi, hi) against tiles [n_tiles, ...] of a brute-force mask: exact on both counts."""
    lo, clear_lo, clear_hi, hi = (int(x) for x in band)
    assert 0 <= lo <= clear_lo <= clear_hi <= hi <= len(tiles)
    any_ = [bool(t.any()) for t in tiles]
    all_ = [bool(t.all()) for t in tiles]
    visited = list(range(lo, hi))
    if any(any_):  # visits exactly the tiles with a visible key: the band is contiguous
        assert visited == [i for i, a in enumerate(any_) if a], (band, any_)
    else:
        assert not visited, band
    assert list(range(clear_lo, clear_hi)) == [i for i, a in enumerate(all_) if a], (band, all_)


@pytest.mark.parametrize("T,S,bq,bk,causal,window", [
    (100, 100, 32, 16, True, None), (17, 100, 16, 32, True, None), (257, 100, 32, 16, True, None),
    (100, 257, 16, 16, False, None), (128, 128, 32, 32, True, None),
    (128, 128, 32, 16, True, 5),  # window inside one tile
    (100, 100, 16, 32, True, 40),  # window across tiles, padded tails
    (40, 130, 32, 16, True, 33),  # T < S
    (130, 40, 16, 16, True, 16),  # T > S: early rows see nothing
    (64, 64, 16, 16, True, 1000),  # window longer than the sequence
])
def test_tile_bands_visit_exactly_the_visible_tiles_and_mask_only_where_needed(T, S, bq, bk, causal, window):
    """Kernel loop bounds against a brute-force mask: tiles outside the band are never visited, none inside are
    skipped, and exactly the tiles that every row sees whole run without a mask (forward/dQ and dK/dV)."""
    st_ = fa._Static(causal=causal, sm_scale=1.0, blocks=BlockSizes(), interpret=True, q_len=T, kv_len=S,
                     window=window)
    n_q, n_kv = -(-T // bq), -(-S // bk)
    visible = brute_force_visible(T, S, n_q * bq, n_kv * bk, causal, window)  # [rows, cols], padded rows included
    for i in range(n_q):
        check_band(fa._kv_band(i, bq, bk, st_, segmented=False),
                   visible[i * bq:(i + 1) * bq].reshape(bq, n_kv, bk).transpose(1, 0, 2))
    for j in range(n_kv):
        check_band(fa._q_band(j, bq, bk, st_, segmented=False),
                   visible[:, j * bk:(j + 1) * bk].reshape(n_q, bq, bk))
    if window is not None and window + bq < S:  # the window really skips: fewer tiles than causal alone
        causal_only = dataclasses.replace(st_, window=None)
        n_visits = lambda st: sum(int(b[3]) - int(b[0]) for b in (fa._kv_band(i, bq, bk, st, False) for i in range(n_q)))
        assert n_visits(st_) < n_visits(causal_only)


def test_segment_ids_mask_every_visited_tile_but_keep_the_window_bounds():
    st_ = fa._Static(causal=True, sm_scale=1.0, blocks=BlockSizes(), interpret=True, q_len=128, kv_len=128, window=40)
    for i in range(4):
        lo, clear_lo, clear_hi, hi = (int(x) for x in fa._kv_band(i, 32, 16, st_, segmented=True))
        assert (lo, hi) == tuple(int(x) for x in fa._kv_band(i, 32, 16, st_, segmented=False))[::3]
        assert clear_lo == clear_hi == hi
    for j in range(8):
        lo, clear_lo, clear_hi, hi = (int(x) for x in fa._q_band(j, 32, 16, st_, segmented=True))
        assert (lo, hi) == tuple(int(x) for x in fa._q_band(j, 32, 16, st_, segmented=False))[::3]
        assert clear_lo == clear_hi == hi


# ---------------------------------------------------------------------------------------------- contract

@pytest.mark.parametrize("shapes,kwargs,message", [
    (((1, 8, 4, 16), (1, 8, 3, 16), (1, 8, 3, 16)), {}, "cannot be grouped"),
    (((1, 8, 4, 16), (1, 8, 2, 32), (1, 8, 2, 32)), {}, "disagree"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 9, 2, 16)), {}, "same shape"),
    (((8, 4, 16),) * 3, {}, "batch, seq, heads, head_dim"),
    (((1, 8, 2, 16),) * 3, {"segment_ids": (jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 7), jnp.int32))}, "shapes"),
])
def test_bad_inputs_raise_clear_errors(shapes, kwargs, message):
    q, k, v = (jnp.ones(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, interpret=True, **kwargs)


def test_block_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_q=48)
    assert BlockSizes.default(128).fitted(17, 1000).block_q == 32


@pytest.mark.skipif(on_gpu, reason="checks the no-GPU error")
def test_without_gpu_asks_for_interpret_mode(monkeypatch):
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(PallasUnavailableError, match=f"interpret=True.*{INTERPRET_ENV}=1"):
        flash_attention(q, q, q)
    monkeypatch.setenv(INTERPRET_ENV, "1")
    assert flash_attention(q, q, q).shape == q.shape


# ------------------------------------------------------------------------------------- compiled (Triton)

def lower_for_cuda(fn, *args, monkeypatch) -> list[bool]:
    """Lower `fn` for CUDA on this host (Pallas emits Triton IR without a GPU); verifier result per kernel."""
    from jax._src.pallas.triton import lowering  # private: the only handle on the Triton module
    verified = []
    original = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*a, **kw):
        result = original(*a, **kw)
        verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return verified


@pytest.mark.parametrize("causal,segments,H,dtype,extra", [
    (True, False, 64, jnp.bfloat16, {}), (False, False, 64, jnp.float32, {}), (False, True, 128, jnp.float16, {}),
    (True, True, 80, jnp.bfloat16, {}),
    (True, True, 256, jnp.bfloat16, {"window": 100, "softcap": 50.0}),  # Gemma 2: sliding window + soft-cap
])
def test_lowers_to_valid_triton_ir(causal, segments, H, dtype, extra, monkeypatch):
    """The compiled path cannot run here, but every op must lower to Triton and pass its verifier."""
    monkeypatch.setattr(fa, "resolve_interpret", lambda interpret, kernel="": False)
    q = jax.ShapeDtypeStruct((2, 300, 4, H), dtype)
    kv = jax.ShapeDtypeStruct((2, 200, 2, H), dtype)
    seg = (jax.ShapeDtypeStruct((2, 300), jnp.int32), jax.ShapeDtypeStruct((2, 200), jnp.int32)) if segments else None

    def loss(q, k, v, seg):
        return flash_attention(q, k, v, causal=causal, segment_ids=seg, **extra).astype(jnp.float32).sum()

    assert lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg, monkeypatch=monkeypatch) == [True] * 3


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("B,T,S,N,K,H,causal,segments", [
    (2, 1024, 1024, 8, 2, 64, True, True),
    (1, 1000, 3000, 4, 1, 128, True, False),
    (2, 777, 777, 4, 4, 128, False, False),
])
def test_compiled_matches_reference(dtype, tol, B, T, S, N, K, H, causal, segments):
    q, k, v, do, seg = make_inputs(B, T, S, N, K, H, dtype=dtype, segments=segments)
    out, grads = value_and_grads(lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=seg), q, k, v, do)
    up = [x.astype(jnp.float32) for x in (q, k, v, do)]
    ref_out, ref_grads = value_and_grads(
        lambda q, k, v: flash_attention_reference(q, k, v, causal=causal, segment_ids=seg), *up)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert rel_err(x, ref) <= tol, f"{name}: relative error {rel_err(x, ref):.2e}"
