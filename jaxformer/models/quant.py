"""Weight-only quantized weights and the matmuls that read them narrow: int8 per output channel, int4 by groups.

Formats (a weight W [N, K] = [out, in], as Linear stores it):
  int8  q = round(W / s) in [-127, 127] (int8 [N, K]) with s = max|W_row| / 127 (float32 [N]): W ~ q * s.
  int4  a float32 scale r = max|W_row| per row, then per group of G consecutive inputs of the row (G in
        32, 64, 128) of W / r, asymmetric: gs = (max - min) / 15 and gz = min (float16 [2h, Kp / G]),
        nibble = round((W / r - gz) / gs) in 0..15, W ~ (nibble * gs + gz) * r. Two nibbles a byte,
        uint8 [h, Kp] with h = ceil(N / 2) and Kp = K rounded up to G: row r in the low nibble, row h + r
        in the high one (pallas_kernels.quant_matmul.pack_int4). Packing rows, not inputs, keeps the
        input axis contiguous in every unpacked row: what lets XLA:CPU vectorise the fused dot below.
        Both formats end in y = (x @ Wq^T) * scale: that multiply also keeps a bias add from fusing
        into the dot (see _fused_rows).

Matmuls (x [..., K] -> [..., N]): where each runs is `impl` ("auto", "xla" or "pallas").
  pallas (auto on a GPU, or when compiling for one) and at most KERNEL_MAX_ROWS rows of x:
        pallas_kernels.quant_matmul, which streams int8 / packed tiles and widens them in registers.
  xla with at most FUSED_MAX_ROWS rows (decoding on CPU): one vector-matrix product per row of x,
        `x[m] @ widen(W).T`. XLA:CPU fuses a vector-matrix dot with the elementwise producers of its
        matrix operand into one loop ("copy_dot_fusion": the convert, nibble shifts and scales run inside
        the dot's vectorised inner loop and the parameter it reads is s8 / u8); a [M, K] x [K, N] dot, an
        einsum with a batch axis, or a multiply-reduce instead widens the whole weight into a float32 copy
        first (a "wrapped_convert" fusion), or becomes a YNNPACK reduction that is 20x slower
        (bench/RESULTS.md, "Quantized decoding", has the HLO). Rows past the first re-read the weight,
        mostly from cache.
  otherwise (prefill, large batches): widen the weight once and do one matmul (compute-bound there).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul import (GROUP_SIZES, check_int4, dequantize_int4, int4_matmul, int8_matmul, pack_int4,
                                         unpack_int4)
from pallas_kernels.targets import compile_target

FUSED_MAX_ROWS = 8  # CPU: rows of x done as fused vector-matrix products (bench/quant_decode.py at batch 8)
KERNEL_MAX_ROWS = 64  # GPU: rows the Pallas kernel takes; more is a prefill: widen once, one matmul
IMPLS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How a model is quantized: 8 or 4 bits, the int4 group size, and whether token embeddings are too."""

    bits: int = 8
    group_size: int | None = None  # int4 only: inputs per scale (32, 64 or 128)
    embeddings: bool = True  # the token table (a tied LM head is read in full every token)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 8 (int8 per output channel) or 4 (int4 by groups), got {self.bits!r}")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("int8 has one scale per output channel; group_size is for bits=4 only")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {GROUP_SIZES} (inputs sharing a scale), "
                             f"got {self.group_size!r}")

    @classmethod
    def of(cls, bits: int = 8, group_size: int | None = None, embeddings: bool = True) -> "QuantSpec":
        """A spec with int4's default group size (64) filled in."""
        return cls(bits, group_size if bits == 8 or group_size is not None else 64, embeddings)

    def to_dict(self) -> dict:
        """The "quantization" entry of a quantized directory's config.json."""
        if self.bits == 8:
            out = {"method": "int8-weight-only", "granularity": "per-output-channel", "symmetric": True}
        else:
            out = {"method": "int4-weight-only", "granularity": "group", "group_size": self.group_size,
                   "symmetric": False, "packing": "row-halves", "scale_dtype": "float16"}
        return {**out, "embeddings": self.embeddings}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        """Inverse of to_dict; an entry without "embeddings" (written before they were quantized) means False."""
        methods = {"int8-weight-only": 8, "int4-weight-only": 4}
        if not isinstance(d, dict) or d.get("method") not in methods:
            raise ValueError(f"unknown quantization entry {d!r}; expected a method in {sorted(methods)}")
        return cls(methods[d["method"]], d.get("group_size"), bool(d.get("embeddings", False)))


# ----------------------------------------------------------------------------------------------------------
# Quantizing a weight

@jax.jit
def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """W [N, K] -> (int8 [N, K], float32 scale [N]) with W ~= q * scale[:, None]."""
    w = w.astype(jnp.float32)
    amax = jnp.abs(w).max(axis=1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale[:, None]), -127, 127).astype(jnp.int8)
    return q, scale


@functools.partial(jax.jit, static_argnames="group_size")
def quantize_int4(w: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """W [N, K] -> (packed uint8 [h, Kp], scale float32 [2h], group_scale, group_zero float16 [2h, Kp / G])."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    w = w.astype(jnp.float32)
    N, K = w.shape
    h, G = -(-N // 2), group_size
    Kp = -(-K // G) * G
    w = jnp.pad(w, ((0, 0), (0, Kp - K)), mode="edge")  # a short last group keeps its own range
    w = jnp.pad(w, ((0, 2 * h - N), (0, 0)))  # [2h, Kp]
    amax = jnp.abs(w).max(axis=1)
    scale = jnp.where(amax > 0, amax, 1.0)  # rows of W / scale lie in [-1, 1]: float16 groups keep precision
    g = (w / scale[:, None]).reshape(2 * h, Kp // G, G)
    lo, hi = g.min(-1), g.max(-1)
    gs = ((hi - lo) / 15.0).astype(jnp.float16)
    gs = jnp.where(gs > 0, gs, jnp.float16(1.0))  # a constant group: every nibble 0 gives its value
    gz = lo.astype(jnp.float16)
    q = jnp.round((g - gz.astype(jnp.float32)[..., None]) / gs.astype(jnp.float32)[..., None])
    return pack_int4(jnp.clip(q, 0, 15).reshape(2 * h, Kp)), scale, gs, gz


def dequantize_int8(w: jax.Array, scale: jax.Array) -> jax.Array:
    """The float32 weights [N, K] an int8 weight stands for."""
    return w.astype(jnp.float32) * scale.astype(jnp.float32)[:, None]


def dequantize(bits: int, weight: jax.Array, scale: jax.Array, groups: tuple[jax.Array, jax.Array] | None,
               n: int, k: int) -> jax.Array:
    """Float32 W [n, k] of a quantized weight (int4: groups = (group_scale, group_zero)): the plain-jnp
    reference every matmul here is tested against."""
    if bits == 8:
        return dequantize_int8(weight, scale)
    return dequantize_int4(weight, scale, *groups, n)[:, :k]


# ----------------------------------------------------------------------------------------------------------
# Matmuls

def _use_kernel(impl: str) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return jax.default_backend() == "gpu" or compile_target() is not None
    return impl == "pallas"


def _fused_rows(x2: jax.Array, w: jax.Array) -> jax.Array:
    """x2 [M, K] float32 @ w^T, w [N, K] an elementwise expression of a narrow weight: one vector-matrix
    dot per row, the form XLA:CPU fuses with w's producers (module docstring). Callers multiply the result
    by a per-output scale: XLA:CPU fuses a dot with its producers or with a consumer add (a bias), not both,
    and a dot fused with the add would leave the widened weight materialised; the multiply sits between."""
    return jnp.stack([x2[m] @ w.T for m in range(x2.shape[0])])  # [M, N]


def int8_linear(x: jax.Array, w: jax.Array, scale: jax.Array, impl: str = "auto") -> jax.Array:
    """x [..., K] @ (w int8 [N, K] * scale [N])^T -> [..., N] in x's dtype, reading w as int8."""
    lead, (N, K) = x.shape[:-1], w.shape
    x2 = x.reshape(-1, K)  # [M, K]
    M = x2.shape[0]
    if _use_kernel(impl) and M <= KERNEL_MAX_ROWS:
        y = int8_matmul(x2, w, scale)
    elif M <= FUSED_MAX_ROWS:
        y = (_fused_rows(x2.astype(jnp.float32), w.astype(jnp.float32)) * scale).astype(x.dtype)
    else:
        y = (x2 @ w.astype(x.dtype).T) * scale.astype(x.dtype)
    return y.reshape(*lead, N)


def int4_linear(x: jax.Array, packed: jax.Array, scale: jax.Array, group_scale: jax.Array, group_zero: jax.Array,
                n: int, impl: str = "auto") -> jax.Array:
    """x [..., K] @ W^T for a packed int4 weight of n outputs -> [..., n] in x's dtype, reading it as uint8."""
    h, Kp, G = check_int4(packed, scale, group_scale, group_zero, n)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)  # [M, K]
    M = x2.shape[0]
    if _use_kernel(impl) and M <= KERNEL_MAX_ROWS:
        return int4_matmul(x2, packed, scale, group_scale, group_zero, n=n).reshape(*lead, n)
    q = unpack_int4(packed).astype(jnp.float32).reshape(2 * h, Kp // G, G)
    gs, gz = group_scale.astype(jnp.float32)[..., None], group_zero.astype(jnp.float32)[..., None]
    w = (q * gs + gz).reshape(2 * h, Kp)  # W / scale, rows [2h]
    x2 = jnp.pad(x2, ((0, 0), (0, Kp - K)))  # padded inputs meet the padded group's weights: adds 0
    if M <= FUSED_MAX_ROWS:
        y = _fused_rows(x2.astype(jnp.float32), w) * scale
    else:
        y = (x2 @ w.astype(x.dtype).T) * scale.astype(x.dtype)
    return y[:, :n].astype(x.dtype).reshape(*lead, n)


def gather_rows(bits: int, weight: jax.Array, scale: jax.Array, groups: tuple[jax.Array, jax.Array] | None,
                ids: jax.Array, k: int) -> jax.Array:
    """Rows `ids` [...] of a quantized table [n, k], widened: [..., k] float32 (an embedding lookup)."""
    row_scale = jnp.take(scale, ids, axis=0)[..., None]  # [..., 1]
    if bits == 8:
        return jnp.take(weight, ids, axis=0).astype(jnp.float32) * row_scale
    h, Kp = weight.shape
    G = Kp // groups[0].shape[1]
    byte = jnp.take(weight, ids % h, axis=0)  # [..., Kp]: row id sits in row id % h, high nibble when id >= h
    q = (byte >> jnp.where(ids >= h, 4, 0).astype(jnp.uint8)[..., None]) & 15
    q = q.astype(jnp.float32).reshape(*ids.shape, Kp // G, G)
    gs, gz = (jnp.take(a, ids, axis=0).astype(jnp.float32)[..., None] for a in groups)
    return ((q * gs + gz).reshape(*ids.shape, Kp) * row_scale)[..., :k]


# ----------------------------------------------------------------------------------------------------------
# int8 KV cache

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantKV:
    """One layer's keys (or values) stored int8, one float32 scale per (sequence, position, kv head):
    x ~ values * scale[..., None], symmetric, scale = max|x| / 127 over the head dim (KIVI-style
    per-token-per-head; 4 bytes of scale per H int8 bytes). Written by attention.write_cache."""

    values: jax.Array  # int8, the cache layout ([B, K, S, H] or [B, S, K, H])
    scale: jax.Array  # float32, the same layout without H

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def dtype(self) -> jnp.dtype:
        return self.values.dtype

    def dequantize(self, dtype) -> jax.Array:
        """The float keys / values this entry holds, in `dtype`."""
        return (self.values.astype(jnp.float32) * self.scale[..., None]).astype(dtype)


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (int8 [..., H], float32 scale [...]) with x ~ q * scale[..., None]."""
    x = x.astype(jnp.float32)
    amax = jnp.abs(x).max(axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8), scale
