"""decode_attention (Pallas flash-decoding, interpret mode on CPU) against its reference on ragged caches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.decode_attention as da
from pallas_kernels.decode_attention import BlockSizes, decode_attention, decode_attention_reference
from pallas_kernels.flash_attention import flash_attention_reference

on_gpu = jax.default_backend() == "gpu"
requires_gpu = pytest.mark.skipif(not on_gpu, reason="compiled Pallas/Triton needs an NVIDIA GPU")
# Interpret-mode kernels are large XLA programs: skipping backend optimisation halves CPU compile time.
FAST_COMPILE = {} if on_gpu else {"xla_backend_optimization_level": 0}


def make_inputs(B, Tq, S, N, K, H, lengths, *, dtype=jnp.float32, stale_nan=False, seed=0):
    """q [B,Tq,N,H], caches [B,S,K,H], lengths [B]; with stale_nan every slot past a length holds NaN."""
    rng = np.random.default_rng(seed)  # numpy: no per-shape XLA compile for the inputs
    q = rng.standard_normal((B, Tq, N, H), np.float32)
    k, v = rng.standard_normal((2, B, S, K, H), np.float32)
    lengths = np.asarray(lengths, np.int32)
    if stale_nan:
        stale = np.arange(S)[None, :, None, None] >= lengths[:, None, None, None]
        k, v = np.where(stale, np.nan, k), np.where(stale, np.nan, v)
    return (*(jnp.asarray(x.astype(dtype)) for x in (q, k, v)), jnp.asarray(lengths))


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


@pytest.mark.parametrize("B,Tq,S,N,K,H,lengths,blocks,stale_nan", [
    (3, 1, 100, 4, 2, 64, [1, 37, 100], None, False),  # default splits, cache padded 100 -> 128
    (3, 4, 256, 8, 2, 64, [0, 3, 250], BlockSizes(block_k=32, num_splits=3), True),  # empty and short rows
    (2, 3, 57, 4, 1, 32, [57, 5], BlockSizes(block_k=16, num_splits=2), False),
    (2, 1, 300, 4, 4, 128, [299, 64], BlockSizes(block_k=64, num_splits=4), True),
    (2, 20, 96, 16, 2, 32, [96, 30], BlockSizes(block_k=32, num_splits=2), False),  # 160 rows: 2 row tiles
])
def test_matches_reference_on_ragged_lengths(B, Tq, S, N, K, H, lengths, blocks, stale_nan):
    q, k, v, lengths = make_inputs(B, Tq, S, N, K, H, lengths, stale_nan=stale_nan)
    run = jax.jit(lambda *a: (decode_attention(*a, block_sizes=blocks, interpret=True), decode_attention_reference(*a)),
                  compiler_options=FAST_COMPILE)
    out, ref = run(q, k, v, lengths)
    assert out.shape == q.shape and bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    for b, length in enumerate(np.asarray(lengths)):  # queries before position 0 see nothing
        np.testing.assert_array_equal(np.asarray(out[b, :max(0, Tq - length)]), 0.0)


def test_bf16_within_1e2_of_fp32():
    q, k, v, lengths = make_inputs(2, 2, 128, 4, 1, 64, [128, 77], dtype=jnp.bfloat16)
    decode = jax.jit(lambda *a: decode_attention(*a, block_sizes=BlockSizes(block_k=32), interpret=True),
                     compiler_options=FAST_COMPILE)
    out = decode(q, k, v, lengths)
    ref = decode_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths)
    assert out.dtype == jnp.bfloat16 and rel_err(out, ref) <= 1e-2


def test_reference_agrees_with_causal_attention_over_each_prefix():
    """Decoding the last Tq tokens of a length-L prefix is bottom-right-aligned causal attention over it."""
    q, k, v, lengths = make_inputs(2, 3, 20, 4, 2, 16, [20, 9])
    dec = jax.jit(decode_attention_reference, static_argnames="sm_scale")(q, k, v, lengths, sm_scale=0.2)
    causal = jax.jit(flash_attention_reference, static_argnames=("causal", "sm_scale"))
    for b, length in enumerate(np.asarray(lengths)):
        full = causal(q[b:b + 1], k[b:b + 1, :length], v[b:b + 1, :length], causal=True, sm_scale=0.2)
        np.testing.assert_allclose(np.asarray(dec[b]), np.asarray(full[0]), atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (((1, 1, 4, 16), (1, 8, 3, 16), (1,)), "cannot be grouped"),
    (((2, 1, 4, 16), (2, 8, 2, 16), (1,)), "lengths"),
    (((1, 1, 4, 16), (1, 8, 2, 32), (1,)), "disagree"),
])
def test_bad_inputs_raise_clear_errors(args, message):
    q_shape, cache_shape, len_shape = args
    cache = jnp.ones(cache_shape)
    with pytest.raises(ValueError, match=message):
        decode_attention(jnp.ones(q_shape), cache, cache, jnp.ones(len_shape, jnp.int32), interpret=True)


@pytest.mark.parametrize("extra", [{}, {"window": 300, "softcap": 50.0}])
def test_lowers_to_valid_triton_ir(extra, monkeypatch):
    """Every op of the split kernel lowers to Triton and passes its verifier (no GPU needed)."""
    from jax._src.pallas.triton import lowering  # private: the only handle on the Triton module
    verified = []
    original = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*a, **kw):
        result = original(*a, **kw)
        verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    monkeypatch.setattr(da, "resolve_interpret", lambda interpret, kernel="": False)
    q = jax.ShapeDtypeStruct((2, 4, 8, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)
    jax.jit(lambda *a: decode_attention(*a, **extra)).trace(q, cache, cache, jax.ShapeDtypeStruct((2,), jnp.int32)).lower(
        lowering_platforms=("cuda",))
    assert verified == [True]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("B,Tq,S,N,K,H", [(4, 1, 8192, 32, 8, 128), (2, 4, 3000, 8, 1, 64)])
def test_compiled_matches_reference(B, Tq, S, N, K, H):
    lengths = np.random.default_rng(0).integers(1, S + 1, size=B)
    q, k, v, lengths = make_inputs(B, Tq, S, N, K, H, lengths, dtype=jnp.bfloat16)
    out = jax.jit(decode_attention)(q, k, v, lengths)
    ref = decode_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths)
    assert rel_err(out, ref) <= 1e-2
