"""pallas_kernels.gated_delta in interpret mode: outputs and final states against the float64 numpy loop of
tests/test_gated_delta.py, gradients of q, k, v, g, beta and initial_state against jax.grad of the pure-JAX
gated_delta_chunked, bf16 against float32, and argument errors.

Errors are elementwise, relative to the reference's max |value|; bounds keep >= 4x margin over what was measured.
Measured on a 2-core x86 CPU (jax 0.10.2), identical pinned to one core (taskset -c 0), printed with pytest -s:
  float32 outputs / final states vs float64 numpy   <= 2.3e-7   (bound 1e-6)
  float32 gradients vs gated_delta_chunked's        <= 2.1e-7   (bound 1e-6; q 2.1e-7, k 2.0e-7, g 2.0e-7)
  at Dk = Dv = 128, chunk 64, default tiles: outputs 1.5e-7, state 1.3e-7; gradients <= 7.2e-7 (dg; bound 3e-6)
  bf16 (inputs and tile matmuls) vs the float32 kernel on the same rounded inputs, ||x - ref|| / ||ref||:
  outputs 3.8e-3, final state 3.0e-3, gradients <= 6.7e-3 (dg)   (bound 3e-2: ARCHITECTURE's 1e-2 leaves 1.5x)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.models.gated_delta import gated_delta_chunked
from pallas_kernels import INTERPRET_ENV, PallasUnavailableError
from pallas_kernels.gated_delta import BlockSizes, gated_delta, gated_delta_reference
from tests.test_gated_delta import numpy_gated_delta, rel_err, segments

OUT_TOL = 1e-6  # float32 kernel vs the float64 numpy loop
GRAD_TOL = 1e-6  # float32 kernel gradients vs jax.grad of gated_delta_chunked
GRAD_TOL_WIDE = 3e-6  # the same at Dk = Dv = 128, chunk 64 (longer float32 sums on both sides)
BF16_TOL = 3e-2  # bf16 kernel vs float32, relative norm


def draw(seed, B, T, K, H, Dk, Dv, *, state=True, unit_k=True):
    """q, k [B,T,K,Dk], v [B,T,H,Dv], g = -softplus, beta = sigmoid, S0. k has unit norm (as models pass it, and the
    delta rule needs beta |k|^2 < 2 to stay stable) unless unit_k=False (for use_qk_l2norm, which normalises it)."""
    r = np.random.default_rng(seed)
    q, k = r.standard_normal((B, T, K, Dk)), r.standard_normal((B, T, K, Dk))
    if unit_k:
        k /= np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    v = r.standard_normal((B, T, H, Dv))
    g = -np.logaddexp(0.0, r.standard_normal((B, T, H)))
    beta = 1 / (1 + np.exp(-r.standard_normal((B, T, H))))
    S0 = r.standard_normal((B, H, Dk, Dv)) if state else None
    return tuple(None if x is None else x.astype(np.float32) for x in (q, k, v, g, beta, S0))


def numpy_reference(q, k, v, g, beta, S0, seg, use_qk_l2norm, scale=None):
    """The float64 loop of tests/test_gated_delta.py (which scales q by Dk ** -0.5), after the l2-norm, a scale
    other than Dk ** -0.5 and the q/k head repeat, in float64."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    if use_qk_l2norm:
        q, k = (x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6) for x in (q, k))
    if scale is not None:
        q = q * scale * np.sqrt(q.shape[-1])
    G = v.shape[2] // q.shape[2]
    q, k = np.repeat(q, G, axis=2), np.repeat(k, G, axis=2)  # value head h reads q/k head h // G
    return numpy_gated_delta(q, k, v, g, beta, S0=S0, seg=seg)


def kernel(chunk_size, use_qk_l2norm=False, block_sizes=None, scale=None):
    return functools.partial(gated_delta, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, scale=scale,
                             block_sizes=block_sizes, interpret=True)


# B, T, K, H, Dk, Dv, C, packed, initial state, l2norm, scale, block sizes: lengths the chunk does not divide (45,
# 37, 1), Dk/Dv padded (12 -> 16, 20 -> 32, 48 -> 64), grouped heads (H / K = 2), several Dv tiles and Dk tiles
SMALL = BlockSizes(block_v=16, block_v_bwd=16, block_k=16)
CASES = [(2, 45, 2, 2, 12, 20, 16, True, True, False, None, None),
         (1, 64, 2, 4, 16, 16, 16, False, False, True, 0.4, None),
         (2, 37, 1, 2, 32, 48, 32, True, True, True, None, SMALL),
         (1, 1, 1, 2, 8, 8, 64, False, True, False, 0.1, None)]


@pytest.mark.parametrize("B,T,K,H,Dk,Dv,C,packed,state,l2,scale,blocks", CASES)
def test_forward_matches_float64_loop(B, T, K, H, Dk, Dv, C, packed, state, l2, scale, blocks):
    q, k, v, g, beta, S0 = draw(T * 13 + H, B, T, K, H, Dk, Dv, state=state, unit_k=not l2)
    seg = segments(T + 1, B, T, max(1, T // 12), forced=(1, C, C + 1, T - 1)) if packed else None
    out, S = jax.jit(kernel(C, l2, blocks, scale))(q, k, v, g, beta, initial_state=S0, segment_ids=seg)
    ref_out, ref_S = numpy_reference(q, k, v, g, beta, S0, seg, l2, scale)
    assert out.shape == (B, T, H, Dv) and out.dtype == jnp.float32 and S.shape == (B, H, Dk, Dv)
    errs = rel_err(out, ref_out), rel_err(S, ref_S)
    print(errs)
    assert max(errs) < OUT_TOL, errs


def _run(fn, args, seg, proj):
    """(out, final state, d(sum(out * proj[0]) + sum(state * proj[1])) / d(q, k, v, g, beta, S0)), one jitted vjp."""
    def run(*a):
        (out, S), vjp = jax.vjp(lambda *x: fn(*x[:5], initial_state=x[5], segment_ids=seg), *a)
        return out, S, vjp((proj[0].astype(out.dtype), proj[1]))
    return jax.jit(run)(*args)


def _proj(seed, B, T, H, Dk, Dv):
    r = np.random.default_rng(seed)
    return r.standard_normal((B, T, H, Dv)).astype(np.float32), r.standard_normal((B, H, Dk, Dv)).astype(np.float32)


@pytest.mark.parametrize("B,T,K,H,Dk,Dv,C,l2,blocks", [(2, 45, 1, 2, 12, 20, 16, True, None),
                                                        (1, 70, 2, 4, 32, 40, 32, False, SMALL)])
def test_gradients_match_chunked_reference(B, T, K, H, Dk, Dv, C, l2, blocks):
    """d(random projection of out and final state) / d(q, k, v, g, beta, S0) with packed segments (a reset at a chunk
    start and random ones), padding, grouped heads; the second case runs several Dv and Dk tiles in every kernel."""
    args = draw(B * T + Dv, B, T, K, H, Dk, Dv, unit_k=not l2)
    seg = segments(T, B, T, 3, forced=(C,))
    proj = _proj(T + 5, B, T, H, Dk, Dv)
    *_, got = _run(kernel(C, l2, blocks), args, seg, proj)
    *_, ref = _run(functools.partial(gated_delta_chunked, chunk_size=C, use_qk_l2norm=l2), args, seg, proj)
    errs = {}
    for name, a, b in zip(("q", "k", "v", "g", "beta", "S0"), got, ref):
        assert a.shape == b.shape and np.all(np.isfinite(a)), name
        errs[name] = rel_err(a, b)
    print(errs)
    assert max(errs.values()) < GRAD_TOL, errs


def test_model_sizes_with_default_tiles():
    """Qwen3.5's head dims (Dk = Dv = 128) and chunk (64) at the default tiles (8 Dv tiles, 2 Dk tiles), 130 packed
    tokens with the l2-norm: outputs and state vs float64, every gradient vs gated_delta_chunked's."""
    B, T, K, H, Dk, Dv, C = 1, 130, 1, 2, 128, 128, 64
    args = draw(1, B, T, K, H, Dk, Dv, unit_k=False)
    seg = segments(2, B, T, 2, forced=(C,))
    proj = _proj(3, B, T, H, Dk, Dv)
    out, S, got = _run(kernel(C, use_qk_l2norm=True), args, seg, proj)
    *_, ref = _run(functools.partial(gated_delta_chunked, chunk_size=C, use_qk_l2norm=True), args, seg, proj)
    ref_out, ref_S = numpy_reference(*args, seg, True)
    errs = {"out": rel_err(out, ref_out), "state": rel_err(S, ref_S)}
    errs.update((name, rel_err(a, b)) for name, a, b in zip(("q", "k", "v", "g", "beta", "S0"), got, ref))
    print(errs)
    assert max(errs["out"], errs["state"]) < OUT_TOL and max(errs.values()) < GRAD_TOL_WIDE, errs


def test_bfloat16_against_float32():
    """bf16 q, k, v (bf16 tile matmuls, float32 state) against the float32 kernel: outputs, state, every gradient."""
    B, T, K, H, Dk, Dv, C = 1, 40, 1, 2, 16, 16, 16
    args = draw(7, B, T, K, H, Dk, Dv, unit_k=False)
    seg = segments(8, B, T, 2)
    bf16 = tuple(jnp.asarray(x, jnp.bfloat16) for x in args[:3]) + args[3:]
    exact = tuple(np.asarray(jnp.asarray(x, jnp.float32)) for x in bf16[:3]) + args[3:]  # the same rounded inputs
    fn = kernel(C, use_qk_l2norm=True)
    norm = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float32) - b) / np.linalg.norm(b))
    proj = _proj(9, B, T, H, Dk, Dv)
    out, S, got = _run(fn, bf16, seg, proj)
    ref_out, ref_S, ref = _run(fn, exact, seg, proj)
    assert out.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    errs = {"out": norm(out, ref_out), "state": norm(S, ref_S)}
    for name, x, a, b in zip(("q", "k", "v", "g", "beta", "S0"), bf16, got, ref):
        assert a.dtype == x.dtype, name
        errs[name] = norm(a, b)
    print(errs)
    assert max(errs.values()) < BF16_TOL, errs


def test_reference_is_the_chunked_model_function():
    q, k, v, g, beta, S0 = draw(3, 1, 20, 1, 1, 8, 8)
    out, S = jax.jit(functools.partial(gated_delta_reference, chunk_size=16))(q, k, v, g, beta, initial_state=S0)
    ref_out, ref_S = numpy_reference(q, k, v, g, beta, S0, None, False)
    assert max(rel_err(out, ref_out), rel_err(S, ref_S)) < OUT_TOL


def test_argument_errors(monkeypatch):
    q, k, v, g, beta, S0 = draw(5, 1, 8, 2, 4, 16, 16)
    call = functools.partial(gated_delta, interpret=True)
    with pytest.raises(ValueError, match="do not agree"):
        call(q, k[:, :4], v, g, beta)
    with pytest.raises(ValueError, match="cannot be grouped"):
        call(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="power of two >= 16"):
        call(q, k, v, g, beta, chunk_size=24)
    with pytest.raises(ValueError, match="initial_state must be"):
        call(q, k, v, g, beta, initial_state=S0[:, :, :8])
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        call(q, k, v, g, beta, segment_ids=np.zeros((1, 8), np.float32))
    with pytest.raises(ValueError, match="q, k, v must share"):
        call(q, k, v.astype(np.float16), g, beta)
    big = np.zeros((1, 8, 2, 300), np.float32)
    with pytest.raises(ValueError, match="too large for gated_delta's kernel.*gated_delta_chunked"):
        call(big, big, v, g, beta)
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    with pytest.raises(PallasUnavailableError, match="interpret=True"):
        gated_delta(q, k, v, g, beta)  # no GPU, no interpret: the error names the fix
