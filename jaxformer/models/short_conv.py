"""LFM2's gated short convolution, a token mixer (Liquid AI 2025, LFM2; transformers' Lfm2ShortConv).

Per token, with D = d_model and K = conv.kernel (transformers' conv_L_cache):

    b, c, x = split(in_proj(h), 3)              in_proj [3D, D]: b, c, x [B, T, D] in that order
    u = b * x                                   the convolution's input
    v_t = sum_j w[:, 0, j] u_{t-K+1+j} + bias   causal depthwise conv1d, conv.weight [D, 1, K] as torch's Conv1d
    y = out_proj(c * v)                         out_proj [D, D]

conv.bias exists, and in_proj/out_proj have biases, only when conv.bias (transformers' conv_bias covers all three).
The convolution runs in float32 (transformers runs it in the weight dtype) and returns to the compute dtype.

Decoding keeps a ConvState: the last K - 1 values of u per sequence (transformers' cache keeps K, one never read).
segment_ids [B, T] (packed documents): taps reaching before the start of the current token's document read zeros;
a document starts where the segment id differs from the previous position's. With a state, the row's first
document continues the one the state holds (as gated_delta.py's initial_state), and the new state keeps only the
values of the row's last document (zeros before its start), so the next token continues that document alone.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.layers import Linear, dtype_of
from jaxformer.sharding import constrain

STATE_AXES = ("batch", None, "act_mlp")  # ConvState.conv [B, K - 1, D]: channels split as in_proj's outputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConvState:
    """One short-convolution layer's decode state: conv [B, K - 1, D], the last K - 1 inputs u = b * x of the
    convolution of each sequence (oldest first)."""

    conv: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, dtype=None) -> "ConvState":
        """Zeros (the state before a sequence's first token), in `dtype` (default: the compute dtype)."""
        dtype = jnp.dtype(dtype or cfg.compute_dtype)
        return cls(conv=constrain(jnp.zeros((batch, cfg.conv.kernel - 1, cfg.d_model), dtype), STATE_AXES))

    def nbytes(self) -> int:
        return int(self.conv.size) * self.conv.dtype.itemsize

    def replace(self, **changes) -> "ConvState":
        return dataclasses.replace(self, **changes)


class DepthwiseConv(nnx.Module):
    """The parameters of torch's Conv1d(D, D, K, groups=D): weight [D, 1, K], bias [D]; applied by causal_conv."""

    def __init__(self, dim: int, kernel: int, *, bias: bool, std: float, param_dtype: str, rngs: nnx.Rngs):
        w = std * jax.random.normal(rngs.params(), (dim, 1, kernel), dtype_of(param_dtype))
        self.weight = nnx.Param(w, logical_axes=("mlp", None, None))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype_of(param_dtype)), logical_axes=("mlp",)) if bias else None


def document_starts(segment_ids: jax.Array, kernel: int) -> jax.Array:
    """[B, T] -> [B, T] int32: where each token's document starts, as an index into the state-extended sequence
    (position t is index t + K - 1); 0 for the row's first document, which continues the state."""
    T = segment_ids.shape[1]
    new = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))  # [B, T]: a document starts at t
    return jax.lax.cummax(jnp.where(new, jnp.arange(T) + kernel - 1, 0), axis=1)


def causal_conv(u_ext: jax.Array, weight: jax.Array, bias: jax.Array | None,
                starts: jax.Array | None = None) -> jax.Array:
    """Depthwise causal conv of u_ext [B, T + K - 1, D] (the K - 1 previous inputs, then T new ones) with weight
    [D, 1, K]: [B, T, D] float32; tap j of token t reads index t + j, zero below starts [B, T] when given."""
    K = weight.shape[-1]
    T = u_ext.shape[1] - K + 1
    u_ext, w = u_ext.astype(jnp.float32), weight[:, 0].astype(jnp.float32)  # w [D, K]
    v = jnp.zeros((u_ext.shape[0], T, u_ext.shape[2]), jnp.float32)
    for j in range(K):  # K is small (LFM2: 3): K shifted multiply-adds, which XLA fuses into one loop
        tap = u_ext[:, j:j + T]  # [B, T, D]
        if starts is not None:
            tap = jnp.where((jnp.arange(T) + j >= starts)[..., None], tap, 0.0)
        v = v + tap * w[:, j]
    return v if bias is None else v + bias.astype(jnp.float32)


def final_state(u_ext: jax.Array, valid: jax.Array | None, starts: jax.Array | None, K: int) -> jax.Array:
    """The K - 1 values of u_ext [B, T + K - 1, D] up to each row's last valid token ([B, T] bool, a prefix of the
    row; None: all), zeroed before that token's document start: [B, K - 1, D]."""
    B, S, _ = u_ext.shape
    T = S - K + 1
    n = jnp.full((B,), T, jnp.int32) if valid is None else valid.sum(axis=1, dtype=jnp.int32)  # [B] valid tokens
    idx = n[:, None] + jnp.arange(K - 1)  # [B, K - 1]: tokens n - K + 1 .. n - 1 (index t + K - 1)
    tail = jnp.take_along_axis(u_ext, idx[..., None], axis=1)  # [B, K - 1, D]
    if starts is not None:
        last = jnp.take_along_axis(starts, jnp.maximum(n - 1, 0)[:, None], axis=1)  # [B, 1]
        keep = (idx >= last) | (n[:, None] == 0)  # a row without valid tokens keeps its state
        tail = jnp.where(keep[..., None], tail, 0)
    return tail


class ShortConv(nnx.Module):
    """LFM2's gated short convolution; parameter names as transformers': in_proj, conv.weight [D, 1, K], conv.bias,
    out_proj."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, K = cfg.d_model, cfg.conv.kernel
        if K < 1:
            raise ValueError("a short-convolution layer needs conv.kernel >= 1 (transformers' conv_L_cache)")
        kw = dict(bias=cfg.conv.bias, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs)
        self.in_proj = Linear(D, 3 * D, axes=("mlp", "embed"), std=cfg.init_std, **kw)
        self.conv = DepthwiseConv(D, K, bias=cfg.conv.bias, std=cfg.init_std, param_dtype=cfg.param_dtype, rngs=rngs)
        # GPT-2 scales residual-branch outputs by 1/sqrt(2 * n_layers) at init
        self.out_proj = Linear(D, D, axes=("embed", "mlp"), std=cfg.init_std / math.sqrt(2 * cfg.n_layers), **kw)
        self.kernel = K

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None, *, state: ConvState | None = None,
                 valid: jax.Array | None = None):
        """x [B, T, D] -> y [B, T, D]; with `state`, the T >= 1 tokens continue each sequence and (y, new state) is
        returned, the state taken at each row's last `valid` [B, T] token (padding at the ends of rows)."""
        if valid is not None and state is None:
            raise ValueError("valid marks padding for a state update; it needs a state")
        B, T, D = x.shape
        K = self.kernel
        b, c, h = jnp.split(self.in_proj(x), 3, axis=-1)  # [B, T, 3D] -> 3 x [B, T, D]
        u = b * h  # [B, T, D]
        prev = jnp.zeros((B, K - 1, D), u.dtype) if state is None else state.conv.astype(u.dtype)
        u_ext = jnp.concatenate([prev, u], axis=1)  # [B, K - 1 + T, D]
        starts = None if segment_ids is None else document_starts(segment_ids, K)  # [B, T]
        v = causal_conv(u_ext, self.conv.weight[...], None if self.conv.bias is None else self.conv.bias[...], starts)
        y = self.out_proj(c * v.astype(c.dtype))  # [B, T, D]
        if state is None:
            return y
        new = final_state(u_ext, valid, starts, K).astype(state.conv.dtype)  # [B, K - 1, D]
        return y, state.replace(conv=constrain(new, STATE_AXES))
