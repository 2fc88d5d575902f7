"""The chunked gated delta rule (Gated DeltaNet's training form) in Pallas (Triton backend), forward and backward.

Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv:2412.06464);
Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (arXiv:2406.06484).
Semantics are jaxformer.models.gated_delta.gated_delta_chunked's (read its docstring): per token, with state
S [Dk, Dv] float32, S <- S exp(g_t); S <- S + k_t (beta_t (v_t - S^T k_t))^T; o_t = S^T q_t.

Work split. Per chunk of C tokens (row i, column j of a chunk; letters as models/gated_delta.py):

  XLA (differentiated by autodiff)   q/k l2-norm and scale; the decays of _chunk_decays (A [C, C] = exp(g_{j+1} +
        ... + g_i) for j <= i in one segment, read [C], k_decay [C] = A's last row, carry = exp(sum g), 0 after a
        reset); the UT transform's inverse Tinv = (I + strict_tril(diag(beta) K K^T * A))^-1 [C, C] by
        unit_lower_inverse (matmul-only block doubling, log2(C) batched matmuls). Precomputed rather than solved
        in the kernel: forward substitution is C dependent steps of masked [C, C] reductions (Triton cannot index
        a row of a register tile) inside a program that already holds the state, and autodiff then carries the
        kernel's dA, dTinv, dread, dk_decay, dcarry into dg, dk, dbeta.
  forward, grid (B, H, Dv / block_v)   one program per (batch, value head, Dv tile) walks the chunks in order,
        holding S [Dk, block_v] float32; per-row scalings apply to [C, block_v] products, so no float32
        [C, Dk] tile is live:
            v' = Tinv (beta (v - read (k S)))            (the UT transform: the delta rule's new values)
            o  = read (q S) + ((q k^T) * A) v'            (carried state + intra-chunk attention)
            S  = carry S + k^T (k_decay v')
  backward (states recomputed, not stored: the forward keeps no [N, Dk, Dv] residual per head; the backward runs
        the forward kernel once more, writing the state before each chunk, then three kernels):
    state_grad, grid (B, H, Dv / block_v)   walks the chunks in reverse holding dS [Dk, block_v] float32:
            dv' = ((q k^T) * A)^T do + k_decay (k dS),  dS <- carry dS + q^T (read do) - k^T (beta read (Tinv^T dv'))
        (no state needed), writing dv' and dS after each chunk, and dS0.
    chunk_grad, grid (B, H, N)   every chunk at once, looping over Dv tiles of block_v_bwd: dv, dbeta, dread,
        dk_decay, dcarry, dA, dTinv, and d(q k^T), k_decay v', d(k S) for:
    qk_grad, grid (B, H, N, Dk / block_k)   dq = d(qk) k + (read do) S^T,  dk = d(qk)^T q + (k_decay v') dS^T +
        d(kS) S^T, looping over Dv tiles; XLA sums dq, dk over the H / K value heads of each q/k head.
  The split keeps every kernel spill-free on sm_90 at Dk = Dv = 128, C = 64 in bf16 (one fused backward spilled
  ~1 KB); the price is float32 intermediates in HBM: states and dstates [B, H, N, Dk, Dv], dv', k_decay v', d(kS)
  [B, T, H, Dv], dA, dTinv, d(qk) [B, H, T, C], dq, dk [B, H, T, Dk].

q, k [B, T, K, Dk] and v [B, T, H, Dv] are read in place (block specs stride over the head axis; value head h reads
q/k head h // (H / K)); T is padded to a multiple of C (padded steps have k = 0, beta = 0, g = 0: identities), Dk
and Dv to powers of two >= 16. Tile matmuls take the input dtype's operands (bf16 on tensor cores; fp32 at full
precision, no TF32) and accumulate in float32; the state is float32 throughout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxformer.models.gated_delta import _chunk_decays, gated_delta_chunked, l2norm, unit_lower_inverse
from pallas_kernels import tuning
from pallas_kernels.common import (check_addressable, check_block, idiv, next_power_of_2, pad_axis, resolve_interpret,
                                   round_up)

MAX_KEY_DIM = 256  # the state tile [Dk, block_v] and W [C, Dk] live in registers


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (powers of two >= 16; clipped to the padded Dv, Dk) and Triton launch parameters: num_warps for the
    forward, num_warps_bwd for the three backward kernels."""

    block_v: int = 16  # forward and the reverse state walk: state columns per program
    block_v_bwd: int = 16  # the chunk-parallel gradient kernels: state columns per step of their loop over Dv
    block_k: int = 64  # dq/dk kernel: key columns per program
    num_warps: int = 4
    num_warps_bwd: int = 8
    num_stages: int = 1

    def __post_init__(self):
        check_block("block_v", self.block_v)
        check_block("block_v_bwd", self.block_v_bwd)
        check_block("block_k", self.block_k)

    @classmethod
    def default(cls, key_dim: int, dtype=jnp.bfloat16) -> "BlockSizes":
        """The current GPU target's tiles (sm_90 where none is known), found by compiling at Dk = Dv = 128, chunk 64,
        bf16 (tests/gpu/test_gpu_gated_delta_compile.py): on sm_90 every kernel is spill-free with these; on sm_80
        (mma operands in registers) no tile tried was, and 8 forward warps spilled least."""
        del key_dim, dtype
        target = tuning.current_target()
        if target is not None and target.arch == "sm_80":
            return cls(num_warps=8)
        return cls()


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable: a custom_vjp nondiff argument)."""

    chunk: int
    blocks: BlockSizes
    interpret: bool


def _dot(a, b, dtype, *, trans_a=False, trans_b=False):
    """float32-accumulated tile matmul of operands cast to `dtype` (the inputs'); float32 stays full precision."""
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return plgpu.dot(a.astype(dtype), b.astype(dtype), trans_a=trans_a, trans_b=trans_b, precision=precision)


# ----------------------------------------------------------------------------------------------------------
# Kernels. Forward and state_grad: one program per batch b, value head h, state columns [j * bv, (j + 1) * bv).

def _chunk_inputs(n, q_ref, k_ref, v_ref, beta_ref, read_ref, kdec_ref, carry_ref, a_ref, tinv_ref, C: int):
    """Chunk n's tiles: q, k [C, Dk], v [C, bv] (input dtype); beta, read, k_decay [C], carry [] (f32);
    A, Tinv [C, C] float32."""
    rows = pl.ds(n * C, C)
    return (q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], beta_ref[rows], read_ref[rows], kdec_ref[rows],
            carry_ref[n], a_ref[rows, :], tinv_ref[rows, :])


def _forward_kernel(q_ref, k_ref, v_ref, beta_ref, read_ref, kdec_ref, carry_ref, a_ref, tinv_ref, s0_ref,
                    o_ref, s_ref, states_ref, *, st: _Static):
    # q_ref, k_ref [T, Dk]; v_ref, o_ref [T, bv]; beta_ref, read_ref, kdec_ref [T] f32; carry_ref [N] f32;
    # a_ref, tinv_ref [T, C] f32 (row n * C + i: row i of chunk n's matrix); s0_ref, s_ref [Dk, bv] f32;
    # states_ref [N, Dk, bv] f32 (the state before each chunk) or None
    C, dt = st.chunk, q_ref.dtype
    n_chunks = q_ref.shape[0] // C

    def step(n, S):  # S [Dk, bv] float32
        q, k, v, beta, read, kdec, carry, A, tinv = _chunk_inputs(
            n, q_ref, k_ref, v_ref, beta_ref, read_ref, kdec_ref, carry_ref, a_ref, tinv_ref, C)
        if states_ref is not None:
            states_ref[n, :, :] = S
        # Scalings by a per-row vector apply to [C, bv] products, so no float32 [C, Dk] tile is ever live:
        # v' = Tinv (beta v) - Tinv (beta read k) S = Tinv (beta (v - read (k S)))
        x = beta[:, None] * (v.astype(jnp.float32) - read[:, None] * _dot(k, S, dt))  # [C, bv]
        v_new = _dot(tinv, x, dt)  # [C, bv]
        attn = _dot(q, k, dt, trans_b=True) * A  # [C, C], diagonal included
        o = read[:, None] * _dot(q, S, dt) + _dot(attn, v_new, dt)  # [C, bv]
        o_ref[pl.ds(n * C, C), :] = o.astype(o_ref.dtype)
        return carry * S + _dot(k, kdec[:, None] * v_new, dt, trans_a=True)

    s_ref[...] = lax.fori_loop(0, n_chunks, step, s0_ref[...])


def _state_grad_kernel(q_ref, k_ref, beta_ref, read_ref, kdec_ref, carry_ref, a_ref, tinv_ref, do_ref, ds_ref,
                      dv_new_ref, dstates_ref, ds0_ref, *, st: _Static):
    # q_ref, k_ref [T, Dk]; beta_ref, read_ref, kdec_ref [T] f32; carry_ref [N] f32; a_ref, tinv_ref [T, C] f32;
    # do_ref [T, bv]; ds_ref [Dk, bv] f32 (d final state). Writes dv_new_ref [T, bv] f32 (d v'), dstates_ref
    # [N, Dk, bv] f32 (d the state after each chunk), ds0_ref [Dk, bv] f32. Needs no state: the chain
    # dS_n-1 = carry dS_n + q^T (read do) - k^T (beta read (Tinv^T dv')), dv' = (qk * A)^T do + kdec (k dS_n)
    # involves the state only through the gradients it receives.
    C, dt = st.chunk, q_ref.dtype
    n_chunks = q_ref.shape[0] // C

    def step(i, dS):  # dS [Dk, bv]: d loss / d state after chunk n
        n = n_chunks - 1 - i
        rows = pl.ds(n * C, C)
        q, k, beta, read, kdec = q_ref[rows, :], k_ref[rows, :], beta_ref[rows], read_ref[rows], kdec_ref[rows]
        do = do_ref[rows, :].astype(jnp.float32)  # [C, bv]
        dstates_ref[n, :, :] = dS
        attn = _dot(q, k, dt, trans_b=True) * a_ref[rows, :]  # [C, C]
        dv_new = _dot(attn, do, dt, trans_a=True) + kdec[:, None] * _dot(k, dS, dt)  # [C, bv]
        dv_new_ref[rows, :] = dv_new
        d_ks = -(beta * read)[:, None] * _dot(tinv_ref[rows, :], dv_new, dt, trans_a=True)  # d(k S) [C, bv]
        return (carry_ref[n] * dS + _dot(q, read[:, None] * do, dt, trans_a=True)
                + _dot(k, d_ks, dt, trans_a=True))

    ds0_ref[...] = lax.fori_loop(0, n_chunks, step, ds_ref[...])


def _chunk_grad_kernel(q_ref, k_ref, v_ref, beta_ref, read_ref, kdec_ref, a_ref, tinv_ref, s_ref, ds_ref, do_ref,
                       dv_new_ref, dv_ref, dbeta_ref, dread_ref, dkdec_ref, dcarry_ref, da_ref, dtinv_ref, dqk_ref,
                       dk_v_ref, dk_s_ref, *, st: _Static):
    # one chunk: q_ref, k_ref [C, Dk]; v_ref, do_ref [C, Dv]; dv_new_ref [C, Dv] f32; beta_ref, read_ref,
    # kdec_ref [C] f32; a_ref, tinv_ref [C, C] f32; s_ref, ds_ref [Dk, Dv] f32 (the state before the chunk, d the
    # state after it). Writes dv_ref [C, Dv] (v's dtype) and, float32, dbeta_ref, dread_ref, dkdec_ref [C],
    # dcarry_ref [], da_ref, dtinv_ref [C, C], and for the dq/dk kernel d(qk) [C, C], kdec v' and d(kS) [C, Dv].
    dt, bv = q_ref.dtype, st.blocks.block_v_bwd
    C = q_ref.shape[0]
    q, k, beta, read, kdec, tinv = q_ref[...], k_ref[...], beta_ref[...], read_ref[...], kdec_ref[...], tinv_ref[...]

    def tile(j, carry):  # state columns [j * bv, (j + 1) * bv): the Dv-sized products, summed over the tiles
        d_attn, dtinv, dkdec, dbeta, dread, dcarry = carry
        cols = pl.ds(j * bv, bv)
        S, dS = s_ref[:, cols], ds_ref[:, cols]  # [Dk, bv]
        do, dv_new = do_ref[:, cols].astype(jnp.float32), dv_new_ref[:, cols]  # [C, bv]
        # the forward, again: x = beta (v - read kS), v' = Tinv x, o = read qS + (qk * A) v',
        # S' = carry S + k^T (kdec v')
        kS = _dot(k, S, dt)  # [C, bv]
        v_minus = v_ref[:, cols].astype(jnp.float32) - read[:, None] * kS
        x = beta[:, None] * v_minus
        v_new = _dot(tinv, x, dt)  # [C, bv]
        dx = _dot(tinv, dv_new, dt, trans_a=True)  # [C, bv]
        dv_ref[:, cols] = (beta[:, None] * dx).astype(dv_ref.dtype)
        dk_v_ref[:, cols] = kdec[:, None] * v_new  # dk += (kdec v') dS^T
        dk_s_ref[:, cols] = -(beta * read)[:, None] * dx  # d(kS): dk += d(kS) S^T
        d_attn += _dot(do, v_new, dt, trans_b=True)  # [C, C]
        dtinv += _dot(dv_new, x, dt, trans_b=True)
        dkdec += jnp.sum(v_new * _dot(k, dS, dt), axis=1)
        dbeta += jnp.sum(dx * v_minus, axis=1)
        dread += jnp.sum(do * _dot(q, S, dt), axis=1) - jnp.sum(beta[:, None] * dx * kS, axis=1)
        dcarry += jnp.sum(S * dS)
        return d_attn, dtinv, dkdec, dbeta, dread, dcarry

    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
    carry = (zeros(C, C), zeros(C, C), zeros(C), zeros(C), zeros(C), jnp.float32(0))
    d_attn, dtinv, dkdec, dbeta, dread, dcarry = lax.fori_loop(0, v_ref.shape[1] // bv, tile, carry)
    da_ref[...] = d_attn * _dot(q, k, dt, trans_b=True)
    dqk_ref[...] = d_attn * a_ref[...]
    dtinv_ref[...] = dtinv
    dkdec_ref[...], dbeta_ref[...], dread_ref[...], dcarry_ref[...] = dkdec, dbeta, dread, dcarry


def _qk_grad_kernel(q_ref, k_ref, read_ref, s_ref, ds_ref, do_ref, dqk_ref, dk_v_ref, dk_s_ref, dq_ref, dk_ref, *,
                    st: _Static):
    # one chunk, key columns [i * bk, (i + 1) * bk): q_ref, k_ref [C, bk]; read_ref [C] f32; s_ref, ds_ref [bk, Dv]
    # f32; do_ref [C, Dv]; dqk_ref [C, C] f32; dk_v_ref, dk_s_ref [C, Dv] f32. Writes dq_ref, dk_ref [C, bk] f32:
    # dq = d(qk) k + (read do) S^T;  dk = d(qk)^T q + (kdec v') dS^T + d(kS) S^T
    dt, bv = q_ref.dtype, st.blocks.block_v_bwd
    read, d_qk = read_ref[...], dqk_ref[...]

    def tile(j, carry):
        dq, dk = carry  # [C, bk]
        cols = pl.ds(j * bv, bv)
        S, dS = s_ref[:, cols], ds_ref[:, cols]  # [bk, bv]
        dq += _dot(read[:, None] * do_ref[:, cols].astype(jnp.float32), S, dt, trans_b=True)
        dk += _dot(dk_v_ref[:, cols], dS, dt, trans_b=True) + _dot(dk_s_ref[:, cols], S, dt, trans_b=True)
        return dq, dk

    dq = _dot(d_qk, k_ref[...], dt)
    dk = _dot(d_qk, q_ref[...], dt, trans_a=True)
    dq_ref[...], dk_ref[...] = lax.fori_loop(0, s_ref.shape[1] // bv, tile, (dq, dk))


# ----------------------------------------------------------------------------------------------------------
# pallas_call wrappers; arrays are padded: T % C == 0, Dk and Dv powers of two >= 16, Dv % block_v == 0.

def _specs(q, v, st: _Static):
    """Block specs over grid (b, h, j): q/k head h // G, value head h, state columns j."""
    (_, T, K, Dk), (H, bv), C = q.shape, (v.shape[2], st.blocks.block_v), st.chunk
    N, G = T // C, H // K
    qk = pl.BlockSpec((None, T, None, Dk), lambda b, h, j: (b, 0, idiv(h, G), 0))
    val = pl.BlockSpec((None, T, None, bv), lambda b, h, j: (b, 0, h, j))
    row = pl.BlockSpec((None, None, T), lambda b, h, j: (b, h, 0))
    chunk = pl.BlockSpec((None, None, N), lambda b, h, j: (b, h, 0))
    mat = pl.BlockSpec((None, None, T, C), lambda b, h, j: (b, h, 0, 0))
    state = pl.BlockSpec((None, None, Dk, bv), lambda b, h, j: (b, h, 0, j))
    states = pl.BlockSpec((None, None, N, Dk, bv), lambda b, h, j: (b, h, 0, 0, j))
    return dict(qk=qk, val=val, row=row, chunk=chunk, mat=mat, state=state, states=states)


def _forward_call(q, k, v, beta, read, kdec, carry, A, tinv, s0, st: _Static, store_states: bool):
    """(o [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] f32, states before each chunk or None)."""
    B, T, _, Dk = q.shape
    H, Dv = v.shape[2:]
    N, sp = T // st.chunk, _specs(q, v, st)
    out_specs = [sp["val"], sp["state"]]
    out_shape = [jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct(s0.shape, jnp.float32)]
    if store_states:
        out_specs.append(sp["states"])
        out_shape.append(jax.ShapeDtypeStruct((B, H, N, Dk, Dv), jnp.float32))
    kernel = _forward_kernel if store_states else functools.partial(_forward_kernel, states_ref=None)
    outs = pl.pallas_call(
        functools.partial(kernel, st=st),
        grid=(B, H, Dv // st.blocks.block_v),
        in_specs=[sp["qk"], sp["qk"], sp["val"], sp["row"], sp["row"], sp["row"], sp["chunk"], sp["mat"], sp["mat"],
                  sp["state"]],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps, num_stages=st.blocks.num_stages),
        interpret=st.interpret,
        name="gated_delta_forward_states" if store_states else "gated_delta_forward",
    )(q, k, v, beta, read, kdec, carry, A, tinv, s0)
    return outs if store_states else (*outs, None)


def _state_grad_call(q, k, beta, read, kdec, carry, A, tinv, do, ds, st: _Static):
    """(d v' [B, T, H, Dv] f32, d the state after each chunk [B, H, N, Dk, Dv] f32, dS0 [B, H, Dk, Dv] f32)."""
    B, T, _, Dk = q.shape
    H, Dv = do.shape[2:]
    N, sp = T // st.chunk, _specs(q, do, st)
    return pl.pallas_call(
        functools.partial(_state_grad_kernel, st=st),
        grid=(B, H, Dv // st.blocks.block_v),
        in_specs=[sp["qk"], sp["qk"], sp["row"], sp["row"], sp["row"], sp["chunk"], sp["mat"], sp["mat"], sp["val"],
                  sp["state"]],
        out_specs=[sp["val"], sp["states"], sp["state"]],
        out_shape=[jax.ShapeDtypeStruct(do.shape, jnp.float32), jax.ShapeDtypeStruct((B, H, N, Dk, Dv), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, Dk, Dv), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps_bwd, num_stages=st.blocks.num_stages),
        interpret=st.interpret,
        name="gated_delta_state_grad",
    )(q, k, beta, read, kdec, carry, A, tinv, do, ds)


def _chunk_grad_call(q, k, v, beta, read, kdec, A, tinv, states, dstates, do, dv_new, st: _Static):
    """Grid (B, H, N), every chunk at once: dv [B, T, H, Dv] (v's dtype); float32 dbeta, dread, dkdec [B, H, T],
    dcarry [B, H, N], dA, dTinv, d(qk) [B, H, T, C], kdec v' and d(kS) [B, T, H, Dv]."""
    B, T, K, Dk = q.shape
    H, Dv = v.shape[2:]
    C, G = st.chunk, H // K
    N = T // C
    qk = pl.BlockSpec((None, C, None, Dk), lambda b, h, n: (b, n, idiv(h, G), 0))
    val = pl.BlockSpec((None, C, None, Dv), lambda b, h, n: (b, n, h, 0))
    row = pl.BlockSpec((None, None, C), lambda b, h, n: (b, h, n))
    one = pl.BlockSpec((None, None, None), lambda b, h, n: (b, h, n))
    mat = pl.BlockSpec((None, None, C, C), lambda b, h, n: (b, h, n, 0))
    state = pl.BlockSpec((None, None, None, Dk, Dv), lambda b, h, n: (b, h, n, 0, 0))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return pl.pallas_call(
        functools.partial(_chunk_grad_kernel, st=st),
        grid=(B, H, N),
        in_specs=[qk, qk, val, row, row, row, mat, mat, state, state, val, val],
        out_specs=[val, row, row, row, one, mat, mat, mat, val, val],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), f32(B, H, T), f32(B, H, T), f32(B, H, T), f32(B, H, N),
                   f32(B, H, T, C), f32(B, H, T, C), f32(B, H, T, C), f32(*v.shape), f32(*v.shape)],
        compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps_bwd, num_stages=st.blocks.num_stages),
        interpret=st.interpret,
        name="gated_delta_chunk_grad",
    )(q, k, v, beta, read, kdec, A, tinv, states, dstates, do, dv_new)


def _qk_grad_call(q, k, read, states, dstates, do, dqk, dk_v, dk_s, st: _Static):
    """Grid (B, H, N, Dk / block_k): dq, dk [B, H, T, Dk] float32 (each value head's share)."""
    B, T, K, Dk = q.shape
    H, Dv = do.shape[2:]
    C, bk, G = st.chunk, min(st.blocks.block_k, Dk), H // K
    N = T // C
    qk = pl.BlockSpec((None, C, None, bk), lambda b, h, n, i: (b, n, idiv(h, G), i))
    val = pl.BlockSpec((None, C, None, Dv), lambda b, h, n, i: (b, n, h, 0))
    row = pl.BlockSpec((None, None, C), lambda b, h, n, i: (b, h, n))
    mat = pl.BlockSpec((None, None, C, C), lambda b, h, n, i: (b, h, n, 0))
    state = pl.BlockSpec((None, None, None, bk, Dv), lambda b, h, n, i: (b, h, n, i, 0))
    head = pl.BlockSpec((None, None, C, bk), lambda b, h, n, i: (b, h, n, i))
    return pl.pallas_call(
        functools.partial(_qk_grad_kernel, st=st),
        grid=(B, H, N, Dk // bk),
        in_specs=[qk, qk, row, state, state, val, mat, val, val],
        out_specs=[head, head],
        out_shape=[jax.ShapeDtypeStruct((B, H, T, Dk), jnp.float32)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=st.blocks.num_warps_bwd, num_stages=st.blocks.num_stages),
        interpret=st.interpret,
        name="gated_delta_qk_grad",
    )(q, k, read, states, dstates, do, dqk, dk_v, dk_s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _scan(q, k, v, beta, read, kdec, carry, A, tinv, s0, st: _Static):
    o, s, _ = _forward_call(q, k, v, beta, read, kdec, carry, A, tinv, s0, st, store_states=False)
    return o, s


def _scan_fwd(q, k, v, beta, read, kdec, carry, A, tinv, s0, st: _Static):
    o, s, _ = _forward_call(q, k, v, beta, read, kdec, carry, A, tinv, s0, st, store_states=False)
    return (o, s), (q, k, v, beta, read, kdec, carry, A, tinv, s0)


def _scan_bwd(st: _Static, residuals, cotangents):
    q, k, v, beta, read, kdec, carry, A, tinv, s0 = residuals
    do, ds = cotangents
    # the chunk start states, recomputed: one more forward pass that writes them
    _, _, states = _forward_call(q, k, v, beta, read, kdec, carry, A, tinv, s0, st, store_states=True)
    do = do.astype(v.dtype)
    dv_new, dstates, ds0 = _state_grad_call(q, k, beta, read, kdec, carry, A, tinv, do, ds.astype(jnp.float32), st)
    dv, dbeta, dread, dkdec, dcarry, dA, dtinv, dqk, dk_v, dk_s = _chunk_grad_call(
        q, k, v, beta, read, kdec, A, tinv, states, dstates, do, dv_new, st)
    dq, dk = _qk_grad_call(q, k, read, states, dstates, do, dqk, dk_v, dk_s, st)
    B, T, K, Dk = q.shape
    heads = lambda x: x.reshape(B, K, -1, T, Dk).sum(axis=2).transpose(0, 2, 1, 3)  # the H / K value heads' shares
    return heads(dq).astype(q.dtype), heads(dk).astype(k.dtype), dv, dbeta, dread, dkdec, dcarry, dA, dtinv, ds0


_scan.defvjp(_scan_fwd, _scan_bwd)


# ----------------------------------------------------------------------------------------------------------

def gated_delta(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *, chunk_size: int = 64,
                initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                use_qk_l2norm: bool = False, scale: float | None = None, block_sizes: BlockSizes | None = None,
                interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule in chunks, fused: (out [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] float32).

    q, k [B, T, K, Dk], v [B, T, H, Dv], g (log-decay <= 0), beta [B, T, H]; H value heads grouped over K q/k heads;
    initial_state [B, H, Dk, Dv]; segment_ids [B, T] reset the state where the id changes (packed documents);
    use_qk_l2norm, scale (default Dk ** -0.5): as models.gated_delta.gated_delta_chunked. Differentiable in q, k, v,
    g, beta and initial_state. interpret: Pallas interpret mode (CPU); None compiles, unless JAXFORMER_PALLAS_INTERPRET.
    """
    _check_inputs(q, k, v, g, beta, initial_state, segment_ids, chunk_size, scale)
    B, T, K, Dk = q.shape
    H, Dv = v.shape[2:]
    dtype = q.dtype
    C = min(chunk_size, max(16, next_power_of_2(T)))  # a chunk longer than T only adds padding: the result is exact
    Dk_pad, Dv_pad = max(16, next_power_of_2(Dk)), max(16, next_power_of_2(Dv))
    if Dk_pad > MAX_KEY_DIM:
        raise ValueError(f"key dim {Dk} is too large for gated_delta's kernel (the state tile [Dk, block_v] is held "
                         f"in registers; Dk <= {MAX_KEY_DIM}); use jaxformer.models.gated_delta.gated_delta_chunked")
    blocks = block_sizes or BlockSizes.default(Dk, dtype)
    blocks = dataclasses.replace(blocks, block_v=min(blocks.block_v, Dv_pad),
                                 block_v_bwd=min(blocks.block_v_bwd, Dv_pad), block_k=min(blocks.block_k, Dk_pad))
    st = _Static(chunk=C, blocks=blocks, interpret=resolve_interpret(bool(interpret), "gated_delta"))
    T_pad = round_up(T, C)
    N = T_pad // C
    check_addressable("v", (B, T_pad, H, Dv_pad))
    check_addressable("tinv", (B, H, T_pad, C))

    # q, k: normed and scaled in float32, then back to the input dtype for the kernel's tile matmuls
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * (Dk ** -0.5 if scale is None else scale)
    pad = lambda x: pad_axis(pad_axis(x, 1, T_pad), 3, Dk_pad)
    q, k = pad(q), pad(k)  # [B, T_pad, K, Dk_pad] float32; padded steps: k = 0, beta = 0, g = 0
    v = pad_axis(pad_axis(v, 1, T_pad), 3, Dv_pad)
    g, beta = (pad_axis(x.astype(jnp.float32), 1, T_pad).transpose(0, 2, 1).reshape(B, H, N, C) for x in (g, beta))
    if segment_ids is None:
        resets = jnp.zeros((B, N, C), bool)
    else:  # a reset before t when t starts a new segment; never at t = 0 (initial_state continues there)
        resets = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, T_pad - T))).reshape(B, N, C)
    A, read, carry = _chunk_decays(g, resets)  # [B, H, N, C, C], [B, H, N, C], [B, H, N]
    kk = jnp.einsum("bnckd,bnskd->bkncs", k.reshape(B, N, C, K, Dk_pad), k.reshape(B, N, C, K, Dk_pad),
                    precision=lax.Precision.HIGHEST)  # [B, K, N, C, C]
    kk = jnp.repeat(kk, H // K, axis=1) if H != K else kk  # value head h uses q/k head h // (H / K)
    tinv = unit_lower_inverse(jnp.tril(kk * beta[..., None] * A, -1))  # [B, H, N, C, C]
    s0 = (jnp.zeros((B, H, Dk_pad, Dv_pad), jnp.float32) if initial_state is None
          else pad_axis(pad_axis(initial_state.astype(jnp.float32), 2, Dk_pad), 3, Dv_pad))
    rows = lambda x: x.reshape(B, H, T_pad, *x.shape[4:])  # chunk rows laid end to end
    o, s = _scan(q.astype(dtype), k.astype(dtype), v.astype(dtype), rows(beta), rows(read), rows(A[..., -1, :]),
                 carry, rows(A), rows(tinv), s0, st)
    return o[:, :T, :, :Dv], s[:, :, :Dk, :Dv]


def _check_inputs(q, k, v, g, beta, initial_state, segment_ids, chunk_size, scale) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or g.ndim != 3 or beta.ndim != 3:
        raise ValueError(f"q, k must be [B, T, K, Dk], v [B, T, H, Dv], g and beta [B, T, H]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}, g {g.shape}, beta {beta.shape}")
    (B, T, K, Dk), (H, Dv) = q.shape, v.shape[2:]
    if k.shape != q.shape or v.shape[:2] != (B, T) or g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"shapes q {q.shape}, k {k.shape}, v {v.shape}, g {g.shape}, beta {beta.shape} do not agree: "
                         f"need q, k [B, T, K, Dk], v [B, T, H, Dv], g, beta [B, T, H]")
    if T == 0 or K == 0 or Dk == 0 or Dv == 0:
        raise ValueError(f"need at least one token, head and key/value column; got q {q.shape}, v {v.shape}")
    if H % K:
        raise ValueError(f"{H} value heads cannot be grouped over {K} q/k heads (K must divide H)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"q, k, v must share one of float32/bfloat16/float16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, Dv):
        raise ValueError(f"initial_state must be [B, H, Dk, Dv] = {(B, H, Dk, Dv)}, got {initial_state.shape}")
    if segment_ids is not None and (segment_ids.shape != (B, T)
                                    or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be integers of shape {(B, T)}, got {segment_ids.dtype} {segment_ids.shape}")
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16
            or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size must be a power of two >= 16 (a Triton tile; 64 is usual), got {chunk_size!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite Python float or None (Dk ** -0.5), got {scale!r}")


# ----------------------------------------------------------------------------------------------------------

def gated_delta_reference(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
                          chunk_size: int = 64, initial_state: jax.Array | None = None,
                          segment_ids: jax.Array | None = None, use_qk_l2norm: bool = False,
                          scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Plain jnp (float32): jaxformer.models.gated_delta.gated_delta_chunked, the same semantics."""
    return gated_delta_chunked(q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial_state,
                               segment_ids=segment_ids, use_qk_l2norm=use_qk_l2norm, scale=scale)
