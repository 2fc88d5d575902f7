"""Weight-only int8 / int4 matmuls in Pallas (Triton backend) for decoding: few rows of x, big weights.

Decoding a token reads every weight once and does two FLOPs per weight: the step is bound by memory,
so a weight stored in 8 or 4 bits should be read in 8 or 4 bits and widened in registers, never
written back out as a float copy. These kernels do that: each program owns a tile of output
features, streams its weight tile from HBM as int8 (or packed nibbles), widens and scales it in
registers and feeds a tensor-core dot with the (padded) rows of x.

  int8   w [N, K] int8, scale [N] float32 (per output channel, symmetric): y = (x @ w^T) * scale.
  int4   packed [h, Kp] uint8 with h = ceil(N / 2) and Kp = K rounded up to the group size G: byte
         (r, k) holds output row r in its low nibble and row h + r in its high nibble ("row halves",
         see pack_int4). group_scale and group_zero [2h, Kp / G] float16, one pair per G inputs of a
         row, relative to a float32 scale [2h] per row (so float16 never meets a weight's magnitude):
         w[n, k] = (nibble(n, k) * group_scale[n, k // G] + group_zero[n, k // G]) * scale[n]
         (asymmetric, nibbles 0..15): y = (x @ wq^T) * scale, as for int8. A program reads a packed
         tile once and produces both of its output tiles.

  grid   (output tiles, K splits, row tiles): when the output tiles alone leave SMs idle (a 768-wide
         projection makes 24 tiles of 32), the K range is split and the float32 partials are summed
         by one XLA reduction afterwards (split-K, as flash-decoding splits the cache).

Rows of x are padded to a power of two >= 16 (Triton's dot); weight tiles past N or K are masked
loads, so weights are read in place whatever their shape. Forward only: decoding needs no gradient.
`int8_matmul_reference` / `int4_matmul_reference` at the bottom are the plain-jnp definitions.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tuning
from pallas_kernels.common import check_addressable, check_block, next_power_of_2, pad_axis, resolve_interpret, round_up

GROUP_SIZES = (32, 64, 128)  # int4 groups: powers of two (Triton tiles) from 32 to 128 inputs
MAX_BLOCK_M = 64  # rows of x per program
DEFAULT_SMS = 132  # an H100, where no target is known


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Output features per program (int4: packed rows, i.e. twice as many outputs), input features per
    step (int8; int4 steps one group at a time), K splits (None: enough programs for two waves)."""

    block_n: int = 32
    block_k: int = 128
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_block("block_n", self.block_n)
        check_block("block_k", self.block_k)
        if self.num_splits is not None and (not isinstance(self.num_splits, int) or self.num_splits < 1):
            raise ValueError(f"num_splits must be a positive integer or None, got {self.num_splits!r}")

    @classmethod
    def default(cls, dtype) -> "BlockSizes":
        """Tiles for x of this dtype: float32 dots (3-pass HIGHEST) hold [bm, 64] steps without spilling on
        sm_80 / sm_90 (128 spills ~100 bytes); 16-bit dots take [bm, 128]."""
        return cls(block_k=64 if jnp.dtype(dtype).itemsize == 4 else 128)


@dataclasses.dataclass(frozen=True)
class _Static:
    n: int  # int8: N output rows; int4: h packed rows
    k: int  # input features read (int4: Kp, a multiple of the group)
    block_m: int
    block_n: int
    block_k: int  # int4: the group size
    steps: int  # K steps in all
    steps_per_split: int


def _dot(a, b):
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_b=True, precision=precision)  # a [M, bk] . b [bn, bk]^T -> [M, bn] f32


def _steps(st: _Static):
    lo = pl.program_id(1) * st.steps_per_split  # this split's K steps
    return lo, jnp.minimum(lo + st.steps_per_split, st.steps)


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, *, st: _Static):
    # x_ref [bm, K]; w_ref [N, K] int8; s_ref [N] float32; o_ref [bm, bn] float32 (this split's partial)
    bn, bk = st.block_n, st.block_k
    first = pl.program_id(0) * bn  # program ids are read outside loops (interpret mode needs it)
    row_ok = first + lax.broadcasted_iota(jnp.int32, (bn,), 0) < st.n

    def step(i, acc):
        cols = i * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        col_ok = cols < st.k
        x = plgpu.load(x_ref.at[:, pl.ds(i * bk, bk)], mask=col_ok[None, :], other=0)  # [bm, bk]
        w = plgpu.load(w_ref.at[pl.ds(first, bn), pl.ds(i * bk, bk)],
                       mask=row_ok[:, None] & col_ok[None, :], other=0)  # [bn, bk] int8, read as int8
        return acc + _dot(x, w.astype(x.dtype))  # int8 -> x's dtype is exact (|w| <= 127)

    acc = lax.fori_loop(*_steps(st), step, jnp.zeros((st.block_m, bn), jnp.float32))
    scale = plgpu.load(s_ref.at[pl.ds(first, bn)], mask=row_ok, other=0.0)
    o_ref[...] = acc * scale[None, :]


def _int4_kernel(x_ref, p_ref, r_ref, s_ref, z_ref, o_ref, *, st: _Static):
    # x_ref [bm, Kp]; p_ref [h, Kp] uint8; r_ref [2h] float32; s_ref, z_ref [2h, Kp/G] float16;
    # o_ref [2, bm, bn] float32: the partial outputs of packed rows r (low nibbles) and h + r (high nibbles)
    bn, G = st.block_n, st.block_k
    first = pl.program_id(0) * bn
    row_ok = first + lax.broadcasted_iota(jnp.int32, (bn,), 0) < st.n

    def affine(nibbles, half, g):  # nibbles [bn, G] -> weights [bn, G] float32
        at = (pl.ds(half * st.n + first, bn), pl.ds(g, 1))
        scale = plgpu.load(s_ref.at[at], mask=row_ok[:, None], other=0.0).astype(jnp.float32)  # [bn, 1]
        zero = plgpu.load(z_ref.at[at], mask=row_ok[:, None], other=0.0).astype(jnp.float32)
        return nibbles.astype(jnp.float32) * scale + zero

    def step(g, carry):
        acc_lo, acc_hi = carry
        x = x_ref[:, pl.ds(g * G, G)]  # [bm, G]
        p = plgpu.load(p_ref.at[pl.ds(first, bn), pl.ds(g * G, G)], mask=row_ok[:, None], other=0)  # [bn, G]
        lo, hi = affine(p & 15, 0, g), affine(p >> 4, 1, g)
        return acc_lo + _dot(x, lo.astype(x.dtype)), acc_hi + _dot(x, hi.astype(x.dtype))

    zeros = jnp.zeros((st.block_m, bn), jnp.float32)
    acc_lo, acc_hi = lax.fori_loop(*_steps(st), step, (zeros, zeros))
    row_lo = plgpu.load(r_ref.at[pl.ds(first, bn)], mask=row_ok, other=0.0)
    row_hi = plgpu.load(r_ref.at[pl.ds(st.n + first, bn)], mask=row_ok, other=0.0)
    o_ref[0] = acc_lo * row_lo[None, :]
    o_ref[1] = acc_hi * row_hi[None, :]


def _plan(M: int, n_tiles: int, steps: int, blocks: BlockSizes) -> tuple[int, int, int, int]:
    """(block_m, K steps per split, splits, M padded to block_m): enough (output tile, split, row tile)
    programs for two waves."""
    block_m = min(MAX_BLOCK_M, max(16, next_power_of_2(M)))
    target = tuning.current_target()
    programs = 2 * (target.sm_count if target is not None else DEFAULT_SMS)
    m_tiles = -(-M // block_m)
    splits = blocks.num_splits or max(1, programs // (n_tiles * m_tiles))
    per_split = -(-steps // min(splits, steps))
    return block_m, per_split, -(-steps // per_split), round_up(M, block_m)


def int8_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, *, block_sizes: BlockSizes | None = None,
                interpret: bool = False) -> jax.Array:
    """x [M, K] @ (w [N, K] int8 * scale [N, 1])^T -> [M, N] in x's dtype; w is read as int8."""
    _check_x(x)
    if w.ndim != 2 or w.dtype != jnp.int8 or w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be int8 [N, K] with K = x's {x.shape[1]} columns, got {w.dtype} {w.shape}")
    if scale.shape != (w.shape[0],):
        raise ValueError(f"scale must be [N] = {(w.shape[0],)} (one per output row), got {scale.shape}")
    interpret = resolve_interpret(interpret, "int8_matmul")
    blocks = block_sizes or BlockSizes.default(x.dtype)
    (M, K), N = x.shape, w.shape[0]
    bn, bk = blocks.block_n, blocks.block_k
    n_tiles, steps = -(-N // bn), -(-K // bk)
    block_m, per_split, splits, M_pad = _plan(M, n_tiles, steps, blocks)
    check_addressable("w", w.shape)
    st = _Static(n=N, k=K, block_m=block_m, block_n=bn, block_k=bk, steps=steps, steps_per_split=per_split)
    partial = pl.pallas_call(
        functools.partial(_int8_kernel, st=st),
        grid=(n_tiles, splits, M_pad // block_m),
        in_specs=[pl.BlockSpec((block_m, K), lambda n, s, m: (m, 0)),
                  pl.BlockSpec((N, K), lambda n, s, m: (0, 0)),
                  pl.BlockSpec((N,), lambda n, s, m: (0,))],
        out_specs=pl.BlockSpec((None, block_m, bn), lambda n, s, m: (s, m, n)),
        out_shape=jax.ShapeDtypeStruct((splits, M_pad, n_tiles * bn), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="int8_matmul",
    )(pad_axis(x, 0, M_pad), w, scale.astype(jnp.float32))
    return partial.sum(axis=0)[:M, :N].astype(x.dtype)


def int4_matmul(x: jax.Array, packed: jax.Array, scale: jax.Array, group_scale: jax.Array, group_zero: jax.Array,
                *, n: int, block_sizes: BlockSizes | None = None, interpret: bool = False) -> jax.Array:
    """x [M, K] @ dequantize_int4(...)^T -> [M, n] in x's dtype (layout: module docstring)."""
    _check_x(x)
    h, Kp, G = check_int4(packed, scale, group_scale, group_zero, n)
    if not Kp - G < x.shape[1] <= Kp:
        raise ValueError(f"x has {x.shape[1]} columns; the packed weight holds {Kp} (groups of {G}): "
                         f"x must have more than {Kp - G} and at most {Kp}")
    interpret = resolve_interpret(interpret, "int4_matmul")
    blocks = block_sizes or BlockSizes.default(x.dtype)
    M, bn = x.shape[0], blocks.block_n
    n_tiles, steps = -(-h // bn), Kp // G
    block_m, per_split, splits, M_pad = _plan(M, n_tiles, steps, blocks)
    check_addressable("packed", packed.shape)
    st = _Static(n=h, k=Kp, block_m=block_m, block_n=bn, block_k=G, steps=steps, steps_per_split=per_split)
    partial = pl.pallas_call(
        functools.partial(_int4_kernel, st=st),
        grid=(n_tiles, splits, M_pad // block_m),
        in_specs=[pl.BlockSpec((block_m, Kp), lambda n, s, m: (m, 0)),
                  pl.BlockSpec((h, Kp), lambda n, s, m: (0, 0)),
                  pl.BlockSpec((2 * h,), lambda n, s, m: (0,)),
                  pl.BlockSpec(group_scale.shape, lambda n, s, m: (0, 0)),
                  pl.BlockSpec(group_zero.shape, lambda n, s, m: (0, 0))],
        out_specs=pl.BlockSpec((None, 2, block_m, bn), lambda n, s, m: (s, 0, m, n)),
        out_shape=jax.ShapeDtypeStruct((splits, 2, M_pad, n_tiles * bn), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="int4_matmul",
    )(pad_axis(pad_axis(x, 1, Kp), 0, M_pad), packed, scale.astype(jnp.float32), group_scale, group_zero)
    halves = partial.sum(axis=0)[:, :M, :h]  # [2, M, h]: rows r and h + r
    return halves.transpose(1, 0, 2).reshape(M, 2 * h)[:, :n].astype(x.dtype)


def _check_x(x: jax.Array) -> None:
    if x.ndim != 2 or x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"x must be [M, K] float32/bfloat16/float16 (flatten leading axes first), got "
                         f"{x.dtype} {x.shape}")
    if 0 in x.shape:
        raise ValueError(f"x must have at least one row and one column, got {x.shape}")


def check_int4(packed: jax.Array, scale: jax.Array, group_scale: jax.Array, group_zero: jax.Array,
               n: int) -> tuple[int, int, int]:
    """(h, Kp, G) of a packed int4 weight for n outputs; raises ValueError when the arrays disagree."""
    if packed.ndim != 2 or packed.dtype != jnp.uint8:
        raise ValueError(f"packed must be uint8 [ceil(N / 2), Kp], got {packed.dtype} {packed.shape}")
    h, Kp = packed.shape
    if h != -(-n // 2):
        raise ValueError(f"packed has {h} rows; {n} outputs pack into ceil({n} / 2) = {-(-n // 2)}")
    if scale.shape != (2 * h,):
        raise ValueError(f"scale must be [2 * {h}] (one per packed output row), got {scale.shape}")
    gs, gz = group_scale, group_zero
    if gs.shape != gz.shape or gs.ndim != 2 or gs.shape[0] != 2 * h or Kp % gs.shape[1]:
        raise ValueError(f"group_scale and group_zero must both be [2 * {h}, groups] with groups dividing {Kp}; "
                         f"got {gs.shape} and {gz.shape}")
    G = Kp // gs.shape[1]
    if G not in GROUP_SIZES:
        raise ValueError(f"group size {G} (= {Kp} inputs / {gs.shape[1]} groups) must be one of {GROUP_SIZES}")
    return h, Kp, G


# ----------------------------------------------------------------------------------------------------------
# The int4 layout, and the plain-jnp references.

def pack_int4(nibbles: jax.Array) -> jax.Array:
    """Nibbles [N, Kp] (integers 0..15) -> uint8 [ceil(N / 2), Kp]: row r low, row h + r high (a missing
    last row of an odd N packs as 0)."""
    q = jnp.asarray(nibbles).astype(jnp.uint8)
    h = -(-q.shape[0] // 2)
    q = pad_axis(q, 0, 2 * h)
    return q[:h] | (q[h:] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """uint8 [h, Kp] -> nibbles [2h, Kp] (uint8): low nibbles are rows 0..h-1, high nibbles rows h..2h-1."""
    h, Kp = packed.shape
    shifts = jnp.array([0, 4], jnp.uint8)[:, None, None]
    return ((packed[None] >> shifts) & 15).reshape(2 * h, Kp)


def dequantize_int4(packed: jax.Array, scale: jax.Array, group_scale: jax.Array, group_zero: jax.Array,
                    n: int) -> jax.Array:
    """The float32 weights [n, Kp] a packed int4 weight stands for."""
    h, Kp, G = check_int4(packed, scale, group_scale, group_zero, n)
    q = unpack_int4(packed).astype(jnp.float32).reshape(2 * h, Kp // G, G)
    w = q * group_scale.astype(jnp.float32)[..., None] + group_zero.astype(jnp.float32)[..., None]
    return (w.reshape(2 * h, Kp) * scale.astype(jnp.float32)[:, None])[:n]


def int8_matmul_reference(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """x [M, K] @ (w * scale[:, None])^T in float32 (HIGHEST precision), cast to x's dtype."""
    deq = w.astype(jnp.float32) * scale.astype(jnp.float32)[:, None]
    return jnp.dot(x.astype(jnp.float32), deq.T, precision=lax.Precision.HIGHEST).astype(x.dtype)


def int4_matmul_reference(x: jax.Array, packed: jax.Array, scale: jax.Array, group_scale: jax.Array,
                          group_zero: jax.Array, *, n: int) -> jax.Array:
    """x [M, K] @ dequantize_int4(...)[:, :K]^T in float32 (HIGHEST precision), cast to x's dtype."""
    deq = dequantize_int4(packed, scale, group_scale, group_zero, n)[:, :x.shape[1]]
    return jnp.dot(x.astype(jnp.float32), deq.T, precision=lax.Precision.HIGHEST).astype(x.dtype)
