"""latent_decode_attention (absorbed MLA flash-decoding, interpret mode on CPU) against float64 numpy.

Errors are elementwise, relative to the reference's max |value|. Measured on a 2-core CPU (the same pinned to one
core with taskset -c 0): float32 at most 2.0e-7 (bound 1e-5, the kernels' float32 rule), bf16 inputs 3.4e-3 (bound
2e-2), the absorbed output mapped through W_UV against the expanded per-head MLA form 1.2e-7 (bound 1e-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.latent_decode_attention as lda
from pallas_kernels.common import INTERPRET_ENV, PallasUnavailableError
from pallas_kernels.latent_decode_attention import (BlockSizes, latent_decode_attention,
                                                    latent_decode_attention_reference)

FAST_COMPILE = {"xla_backend_optimization_level": 0}  # interpret-mode kernels are large XLA programs
FP32_BOUND, BF16_BOUND = 1e-5, 2e-2


def make_inputs(B, T, N, C, R, S, lengths, *, stale_nan=True, seed=0):
    """q_lat [B,T,N,C], q_pe [B,T,N,R], c [B,S,C], pe [B,S,R] float32 numpy; with stale_nan every slot past a length
    holds NaN (the kernel must never let it reach the result)."""
    rng = np.random.default_rng(seed)
    q_lat, q_pe = rng.standard_normal((B, T, N, C), np.float32), rng.standard_normal((B, T, N, R), np.float32)
    c, pe = rng.standard_normal((B, S, C), np.float32), rng.standard_normal((B, S, R), np.float32)
    lengths = np.asarray(lengths, np.int32)
    if stale_nan:
        stale = np.arange(S)[None, :, None] >= lengths[:, None, None]
        c, pe = np.where(stale, np.nan, c), np.where(stale, np.nan, pe)
    return q_lat, q_pe, c, pe, lengths


def reference_np(q_lat, q_pe, c, pe, lengths, sm_scale, window=None):
    """float64, one query at a time over exactly the keys it sees (so stale NaN is never touched); no key: zeros."""
    q_lat, q_pe, c, pe = (np.asarray(x, np.float64) for x in (q_lat, q_pe, c, pe))
    B, T, N, C = q_lat.shape
    out = np.zeros((B, T, N, C))
    for b, length in enumerate(np.asarray(lengths)):
        for t in range(T):
            p = int(length) - T + t
            keys = np.arange(0 if window is None else max(0, p - window + 1), p + 1)
            if keys.size == 0:
                continue
            s = (q_lat[b, t] @ c[b, keys].T + q_pe[b, t] @ pe[b, keys].T) * sm_scale  # [N, keys]
            w = np.exp(s - s.max(axis=-1, keepdims=True))
            out[b, t] = (w / w.sum(axis=-1, keepdims=True)) @ c[b, keys]
    return out


def max_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def run(*args, sm_scale, window=None, blocks=None, interpret=True):
    fn = jax.jit(lambda *a: latent_decode_attention(*a, sm_scale=sm_scale, window=window, block_sizes=blocks,
                                                    interpret=interpret), compiler_options=FAST_COMPILE)
    return fn(*args)


@pytest.mark.parametrize("B,T,N,C,R,S,lengths,window,blocks", [
    (3, 1, 16, 64, 16, 100, [1, 37, 100], None, None),  # default tiles: 7 splits of one 16-slot tile, S padded
    (3, 4, 4, 48, 16, 64, [4, 30, 64], None, BlockSizes(block_k=16, num_splits=3)),  # C = 48 padded; length == T, S
    (2, 4, 16, 32, 16, 80, [80, 20], 7, BlockSizes(block_m=16, block_k=16, num_splits=2)),  # 64 rows: 4 row tiles
    (2, 1, 1, 64, 16, 200, [200, 123], 50, BlockSizes(block_k=32, num_splits=4)),  # one head, window over tiles
    (2, 4, 1, 48, 24, 40, [4, 2], 3, BlockSizes(block_k=16)),  # R = 24 padded; queries before position 0 see nothing
])
def test_matches_float64_reference(B, T, N, C, R, S, lengths, window, blocks):
    q_lat, q_pe, c, pe, lengths = make_inputs(B, T, N, C, R, S, lengths)
    scale = (C + R) ** -0.5
    out = run(q_lat, q_pe, c, pe, lengths, sm_scale=scale, window=window, blocks=blocks)
    ref = reference_np(q_lat, q_pe, c, pe, lengths, scale, window)
    assert out.shape == (B, T, N, C) and out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    assert max_err(out, ref) <= FP32_BOUND


def test_bf16_inputs_on_a_tiny_shape():
    q_lat, q_pe, c, pe, lengths = make_inputs(2, 2, 4, 48, 16, 48, [48, 17], seed=1)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q_lat, q_pe, c, pe)]
    out = run(*bf16, lengths, sm_scale=0.15, window=20, blocks=BlockSizes(block_k=16, num_splits=2))
    ref = reference_np(*(np.asarray(x.astype(jnp.float32)) for x in bf16), lengths, 0.15, 20)  # the rounded inputs
    assert out.dtype == jnp.bfloat16 and max_err(out, ref) <= BF16_BOUND


def test_absorbed_output_equals_expanded_mla():
    """o_lat W_UV^T is per-head softmax attention with q = [q_nope ; q_pe], k = [c W_UK^T ; pe], v = c W_UV^T,
    for q_lat = q_nope W_UK: the identity DeepSeek's decoding relies on (kv_b_proj's weight W [N, dn + dv, C])."""
    B, T, N, C, R, S, dn, dv = 2, 2, 4, 32, 16, 40, 24, 20
    q_lat, q_pe, c, pe, lengths = make_inputs(B, T, N, C, R, S, [40, 9], seed=2)
    rng = np.random.default_rng(3)
    W = rng.standard_normal((N, dn + dv, C)) * C ** -0.5
    w_uk, w_uv = W[:, :dn], W[:, dn:]  # [N, dn, C], [N, dv, C]
    q_nope = rng.standard_normal((B, T, N, dn))
    q_lat = np.einsum("btnd,ndc->btnc", q_nope, w_uk).astype(np.float32)
    scale = (dn + R) ** -0.5
    o_lat = run(q_lat, q_pe, c, pe, lengths, sm_scale=scale, blocks=BlockSizes(block_k=16, num_splits=2))
    absorbed = np.einsum("btnc,ndc->btnd", np.asarray(o_lat, np.float64), w_uv)

    expanded = np.zeros((B, T, N, dv))
    for b, length in enumerate(lengths):
        cb, peb = c[b, :length].astype(np.float64), pe[b, :length].astype(np.float64)  # the live cache
        for n in range(N):
            k = np.concatenate([cb @ w_uk[n].T, peb], axis=-1)  # [L, dn + R]
            v = cb @ w_uv[n].T  # [L, dv]
            q = np.concatenate([q_nope[b, :, n], q_pe[b, :, n]], axis=-1)  # [T, dn + R]
            s = q @ k.T * scale
            s = np.where(np.arange(length)[None, :] <= length - T + np.arange(T)[:, None], s, -np.inf)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            expanded[b, :, n] = (p / p.sum(axis=-1, keepdims=True)) @ v
    assert max_err(absorbed, expanded) <= FP32_BOUND


def test_reference_matches_float64():
    """The plain-jnp reference the kernel file ships (decode_attention_reference over [c ; pe]) is right too."""
    q_lat, q_pe, c, pe, lengths = make_inputs(2, 3, 4, 24, 8, 30, [30, 5], stale_nan=False, seed=4)
    ref = jax.jit(latent_decode_attention_reference, static_argnames=("sm_scale", "window"))(
        q_lat, q_pe, c, pe, lengths, sm_scale=0.2, window=4)
    assert max_err(ref, reference_np(q_lat, q_pe, c, pe, lengths, 0.2, 4)) <= FP32_BOUND


def test_interpret_none_follows_the_environment(monkeypatch):
    args = make_inputs(1, 1, 2, 16, 16, 16, [9])
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    with pytest.raises(PallasUnavailableError, match="interpret=True"):
        latent_decode_attention(*args, sm_scale=0.25)
    monkeypatch.setenv(INTERPRET_ENV, "1")
    out = run(*args, sm_scale=0.25, interpret=None)
    assert max_err(out, reference_np(*args, 0.25)) <= FP32_BOUND


@pytest.mark.parametrize("shapes,kw,message", [
    (((1, 1, 4, 32), (1, 1, 4, 16), (1, 8, 24), (1, 8, 16), (1,)), {}, "latent width"),
    (((1, 1, 4, 32), (1, 1, 4, 16), (1, 8, 32), (1, 8, 8), (1,)), {}, "pe_cache"),
    (((2, 1, 4, 32), (2, 1, 4, 16), (2, 8, 32), (2, 8, 16), (1,)), {}, "lengths"),
    (((1, 1, 4, 32), (1, 1, 4, 16), (1, 8, 32), (1, 8, 16), (1,)), {"sm_scale": None}, "sm_scale"),
    (((1, 1, 4, 32), (1, 1, 4, 16), (1, 8, 32), (1, 8, 16), (1,)), {"window": 0}, "window"),
])
def test_bad_inputs_raise_clear_errors(shapes, kw, message):
    *arrays, len_shape = shapes
    with pytest.raises(ValueError, match=message):
        latent_decode_attention(*(jnp.ones(s) for s in arrays), jnp.ones(len_shape, jnp.int32),
                                **{"sm_scale": 0.1, **kw}, interpret=True)


def test_lowers_to_valid_triton_ir(monkeypatch):
    """Every op of the split kernel lowers to Triton and passes its verifier (no GPU, no CUDA plugin needed)."""
    from jax._src.pallas.triton import lowering  # private: the only handle on the Triton module
    verified = []
    original = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*a, **kw):
        result = original(*a, **kw)
        verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    monkeypatch.setattr(lda, "resolve_interpret", lambda interpret, kernel="": False)
    sds = jax.ShapeDtypeStruct
    args = [sds((2, 2, 16, 512), jnp.bfloat16), sds((2, 2, 16, 64), jnp.bfloat16), sds((2, 1000, 512), jnp.bfloat16),
            sds((2, 1000, 64), jnp.bfloat16), sds((2,), jnp.int32)]
    jax.jit(lambda *a: latent_decode_attention(*a, sm_scale=0.07, window=300)).trace(*args).lower(
        lowering_platforms=("cuda",))
    assert verified == [True]
