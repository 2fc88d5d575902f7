"""The gated delta rule (models/gated_delta.py): the scan and the chunked form against an independent float64 numpy
loop, against each other (gradients), against finite differences, and against transformers' torch functions.

Errors are elementwise, relative to the reference's max |value|; bounds keep >= 4x margin over measured errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.models.gated_delta import gated_delta_chunked, gated_delta_recurrent, unit_lower_inverse

# measured on a 2-core x86 CPU (the same pinned to one core): outputs/states vs float64 <= 2.0e-7, vs transformers
# <= 4.3e-7, gradients chunked vs scan <= 4.3e-7, scan gradient vs float64 finite differences <= 1.5e-7,
# block inverse vs numpy <= 3e-7
OUT_TOL = 2e-6  # float32 vs the float64 numpy loop: outputs and final states
HF_TOL = 3e-6  # float32 vs transformers' float32 torch functions
GRAD_TOL = 3e-6  # chunked vs recurrent gradients (both float32)
FD_TOL = 1e-6  # recurrent (float32) gradient vs float64 central differences of the numpy loop


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def draw(seed, B, T, H, Dk, Dv, *, state=True):
    """q, k (l2-normalised, as the models pass it), v, g = -softplus, beta = sigmoid, S0: float32 numpy."""
    r = np.random.default_rng(seed)
    q = r.standard_normal((B, T, H, Dk))
    k = r.standard_normal((B, T, H, Dk))
    k /= np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    v = r.standard_normal((B, T, H, Dv))
    g = -np.logaddexp(0.0, r.standard_normal((B, T, H)))
    beta = 1 / (1 + np.exp(-r.standard_normal((B, T, H))))
    S0 = r.standard_normal((B, H, Dk, Dv)) if state else None
    cast = lambda x: None if x is None else x.astype(np.float32)
    return tuple(map(cast, (q, k, v, g, beta, S0)))


def segments(seed, B, T, n_resets, forced=()):
    """Segment ids [B,T] int32 with resets at random positions plus the `forced` ones (each row its own draw)."""
    r = np.random.default_rng(seed)
    starts = np.zeros((B, T), np.int32)
    for b in range(B):
        pos = r.choice(np.arange(1, T), size=min(n_resets, T - 1), replace=False)
        starts[b, pos] = 1
        starts[b, [p for p in forced if p < T]] = 1
    return np.cumsum(starts, axis=1).astype(np.int32) + 3  # ids need not start at 0


def numpy_gated_delta(q, k, v, g, beta, S0=None, seg=None):
    """Independent float64 reference: the token-by-token gated delta rule, one (b, h) at a time."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    out = np.zeros((B, T, H, Dv))
    S_all = np.zeros((B, H, Dk, Dv)) if S0 is None else np.array(S0, np.float64)
    for b in range(B):
        for h in range(H):
            S = S_all[b, h].copy()
            for t in range(T):
                if seg is not None and t > 0 and seg[b, t] != seg[b, t - 1]:
                    S = np.zeros_like(S)
                S = S * np.exp(g[b, t, h])
                S = S + np.outer(k[b, t, h], beta[b, t, h] * (v[b, t, h] - S.T @ k[b, t, h]))
                out[b, t, h] = S.T @ q[b, t, h] / np.sqrt(Dk)
            S_all[b, h] = S
    return out, S_all


def test_unit_lower_inverse():
    """(I + L)^-1 by block doubling vs numpy, for sizes that are and are not powers of two."""
    r = np.random.default_rng(3)
    for C in (5, 48):  # padded to 8 and 64 inside; the chunked tests run 16 and 64
        L = np.tril(r.standard_normal((3, C, C)) * 0.3, -1)
        ref = np.linalg.inv(np.eye(C) + L)
        err = rel_err(jax.jit(unit_lower_inverse)(jnp.asarray(L, jnp.float32)), ref)
        assert err < OUT_TOL, (C, err)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def chunked(q, k, v, g, beta, S0, seg, chunk_size):
    return gated_delta_chunked(q, k, v, g, beta, chunk_size=chunk_size, initial_state=S0, segment_ids=seg)


@jax.jit
def recurrent(q, k, v, g, beta, S0, seg):
    return gated_delta_recurrent(q, k, v, g, beta, initial_state=S0, segment_ids=seg)


def test_recurrent_matches_numpy():
    args = draw(0, 2, 37, 4, 16, 8)
    seg = segments(1, 2, 37, 3, forced=(1, 36))
    for s in (None, seg):
        out, S = recurrent(*args, s)
        ref_out, ref_S = numpy_gated_delta(*args, seg=s)
        assert out.shape == (2, 37, 4, 8) and S.shape == (2, 4, 16, 8) and S.dtype == jnp.float32
        errs = rel_err(out, ref_out), rel_err(S, ref_S)
        assert max(errs) < OUT_TOL, errs


@pytest.mark.parametrize("T,C,H,packed", [(1, 16, 1, False), (1, 64, 4, False), (7, 16, 4, True), (7, 64, 1, False),
                                          (64, 16, 1, True), (64, 64, 4, False), (100, 16, 4, True),
                                          (100, 64, 1, False), (257, 16, 1, False), (257, 64, 4, True)])
def test_chunked_matches_numpy(T, C, H, packed):
    """Lengths the chunk does not divide, Dk != Dv, with and without an initial state; packed cases reset at random
    positions, at chunk starts (local position 0), right after one, at t = 1 and at the last position."""
    args = draw(T * 7 + C + H, 2, T, H, 12, 20, state=(T % 2 == 1 or H == 4))
    seg = segments(T + C, 2, T, max(1, T // 20), forced=(1, C, C + 1, 2 * C, T - 1)) if packed else None
    out, S = chunked(*args, seg, C)
    ref_out, ref_S = numpy_gated_delta(*args, seg=seg)
    assert out.shape == (2, T, H, 20) and S.shape == (2, H, 12, 20)
    errs = rel_err(out, ref_out), rel_err(S, ref_S)
    assert max(errs) < OUT_TOL, errs


def _loss(fn, proj, q, k, v, g, beta, S0, seg):
    out, S = fn(q, k, v, g, beta, initial_state=S0, segment_ids=seg)
    return jnp.sum(out * proj[0]) + jnp.sum(S * proj[1])


def test_gradients_chunked_vs_recurrent():
    """d(random projection of out and final state) / d(q, k, v, g, beta, S0), with packed segments."""
    B, T, H, Dk, Dv, C = 2, 45, 2, 12, 20, 16
    args = draw(11, B, T, H, Dk, Dv)
    seg = segments(12, B, T, 3, forced=(C,))
    r = np.random.default_rng(13)
    proj = (r.standard_normal((B, T, H, Dv)).astype(np.float32), r.standard_normal((B, H, Dk, Dv)).astype(np.float32))
    grad = lambda fn: jax.jit(jax.grad(functools.partial(_loss, fn, proj), argnums=range(6)))(*args, seg)
    got = grad(functools.partial(gated_delta_chunked, chunk_size=C))
    ref = grad(gated_delta_recurrent)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "S0"), got, ref):
        assert np.all(np.isfinite(a)) and rel_err(a, b) < GRAD_TOL, (name, rel_err(a, b))


def test_recurrent_gradient_vs_finite_differences():
    """jax.grad of the float32 scan vs float64 central differences of the numpy loop, on a tiny case."""
    B, T, H, Dk, Dv = 1, 6, 1, 3, 2
    args = draw(21, B, T, H, Dk, Dv)
    seg = np.array([[0, 0, 0, 1, 1, 1]], np.int32)
    r = np.random.default_rng(22)
    proj = (r.standard_normal((B, T, H, Dv)), r.standard_normal((B, H, Dk, Dv)))

    def loss64(xs):
        out, S = numpy_gated_delta(*xs[:5], S0=xs[5], seg=seg)
        return np.sum(out * proj[0]) + np.sum(S * proj[1])

    xs = [np.asarray(x, np.float64) for x in args]
    got = jax.grad(functools.partial(_loss, gated_delta_recurrent, proj), argnums=range(6))(*args, seg)
    eps = 1e-6
    for i, name in enumerate(("q", "k", "v", "g", "beta", "S0")):
        fd = np.zeros_like(xs[i])
        for idx in np.ndindex(xs[i].shape):
            plus = [x.copy() for x in xs]
            minus = [x.copy() for x in xs]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            fd[idx] = (loss64(plus) - loss64(minus)) / (2 * eps)
        assert rel_err(got[i], fd) < FD_TOL, (name, rel_err(got[i], fd))


def test_matches_transformers():
    """transformers' torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule, with its in-kernel l2norm and
    grouped value heads (2 q/k heads, 4 value heads)."""
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_next.modeling_qwen3_next import (torch_chunk_gated_delta_rule,
                                                                    torch_recurrent_gated_delta_rule)
    B, T, K, H, Dk, Dv = 2, 75, 2, 4, 16, 24
    r = np.random.default_rng(31)
    q, k = (r.standard_normal((B, T, K, Dk)).astype(np.float32) for _ in range(2))  # l2norm happens inside
    v = r.standard_normal((B, T, H, Dv)).astype(np.float32)
    g = (-np.logaddexp(0.0, r.standard_normal((B, T, H)))).astype(np.float32)
    beta = (1 / (1 + np.exp(-r.standard_normal((B, T, H))))).astype(np.float32)
    S0 = r.standard_normal((B, H, Dk, Dv)).astype(np.float32)
    t = [torch.from_numpy(x) for x in (q, k, v, g, beta, S0)]
    kw = dict(initial_state=t[5], output_final_state=True, use_qk_l2norm_in_kernel=True)
    ref_chunk = torch_chunk_gated_delta_rule(*t[:5], chunk_size=32, **kw)
    ref_rec = torch_recurrent_gated_delta_rule(*t[:5], **kw)
    ours_chunk = jax.jit(functools.partial(gated_delta_chunked, chunk_size=32, use_qk_l2norm=True))(
        q, k, v, g, beta, initial_state=S0)
    ours_rec = jax.jit(functools.partial(gated_delta_recurrent, use_qk_l2norm=True))(q, k, v, g, beta, initial_state=S0)
    for ours, ref in ((ours_chunk, ref_chunk), (ours_rec, ref_rec), (ours_chunk, ref_rec)):
        for a, b in zip(ours, ref):
            assert rel_err(a, b.numpy()) < HF_TOL, rel_err(a, b.numpy())
