"""Gated DeltaNet as a token mixer (Qwen3-Next, Qwen3.5): projections, a causal depthwise conv on q/k/v, the gated
delta rule (models/gated_delta.py) and a gated RMSNorm before the output projection.

Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv:2412.06464). The
specification is transformers' Qwen3_5GatedDeltaNet (models/qwen3_5): parameter names, layouts and dtypes follow it,
so the Hugging Face map is a pure rename (Qwen3-Next's fused in_proj_qkvz / in_proj_ba are split by its importer).

Letters: B batch, T sequence, D model, K query/key heads, H value heads (a multiple of K), Dk / Dv their head dims,
C = 2 K Dk + H Dv the conv channels (q, k, v concatenated), W the conv taps (cfg.linear.conv_kernel).

The decode state (DeltaNetState) is the last W - 1 conv inputs and the [H, Dk, Dv] delta-rule matrix per sequence;
it does not grow with the sequence.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.gated_delta import gated_delta_chunked, gated_delta_recurrent, gated_delta_state_norms
from jaxformer.models.layers import Linear, dtype_of


def conv_channels(cfg: ModelConfig) -> int:
    """C = 2 K Dk + H Dv: the conv runs over q, k and v concatenated."""
    lin = cfg.linear
    return 2 * lin.key_heads * lin.key_head_dim + lin.value_heads * lin.value_head_dim


class DeltaNetState(NamedTuple):
    """One Gated DeltaNet layer's decode state (a pytree): what a sequence needs to continue."""

    conv: jax.Array  # [B, W-1, C] the last W - 1 conv inputs (compute dtype), oldest first
    recurrent: jax.Array  # [B, H, Dk, Dv] float32, the delta-rule matrix

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int) -> "DeltaNetState":
        """Zeros: the state before a sequence's first token."""
        lin = cfg.linear
        return cls(jnp.zeros((batch, lin.conv_kernel - 1, conv_channels(cfg)), dtype_of(cfg.compute_dtype)),
                   jnp.zeros((batch, lin.value_heads, lin.key_head_dim, lin.value_head_dim), jnp.float32))

    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in (self.conv, self.recurrent))


class CausalConv1d(nnx.Module):
    """Depthwise causal convolution with SiLU, weight [C, 1, W] as torch's Conv1d(C, C, W, groups=C, bias=False).

    Output t is silu(sum_j weight[:, 0, j] x[t - (W-1-j)]); taps before position 0 read `tail` (the previous inputs),
    taps reaching into an earlier segment read zeros. Products are summed in float32 (as torch's conv1d accumulates).
    """

    def __init__(self, channels: int, kernel: int, *, std: float, param_dtype: str, rngs: nnx.Rngs):
        w = std * jax.random.normal(rngs.params(), (channels, 1, kernel), dtype_of(param_dtype))  # HF: normal(std)
        self.weight = nnx.Param(w, logical_axes=("heads", None, None))
        self.kernel = kernel

    def __call__(self, x: jax.Array, tail: jax.Array, segment: jax.Array | None = None) -> jax.Array:
        """x [B,T,C], tail [B,W-1,C], segment [B,T] int (0: continues tail; None: one segment) -> [B,T,C]."""
        B, T, C = x.shape
        W = self.kernel
        full = jnp.concatenate([tail.astype(x.dtype), x], axis=1)  # [B, W-1+T, C]
        w = self.weight[...][:, 0, :].astype(jnp.float32)  # [C, W]
        out = jnp.zeros((B, T, C), jnp.float32)
        for j in range(W):  # tap j reads position t - s
            s = W - 1 - j
            xs = full[:, j:j + T].astype(jnp.float32)  # [B, T, C]
            if segment is not None and s > 0:
                earlier = jnp.pad(segment, ((0, 0), (s, 0)))[:, :T]  # [B, T] segment of position t - s (0 before 0)
                xs = jnp.where((earlier == segment)[..., None], xs, 0.0)
            out = out + xs * w[:, j]
        return jax.nn.silu(out).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """transformers' Qwen3_5RMSNormGated: weight * rmsnorm(x) (cast back to x's dtype first) * silu(gate), in float32,
    returned in x's dtype. The weight starts at 1."""

    def __init__(self, dim: int, *, eps: float, param_dtype: str):
        self.weight = nnx.Param(jnp.ones((dim,), dtype_of(param_dtype)), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
        h = self.weight[...] * h.astype(x.dtype)  # promotes as torch does (float32 weight: float32)
        return (h * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


def _segment_index(segment_ids: jax.Array) -> jax.Array:
    """[B,T] ids -> [B,T] int: 0 for the first segment of a row, +1 at each change of id (gated_delta's resets)."""
    starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))  # [B, T]
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


class GatedDeltaNet(nnx.Module):
    """Gated DeltaNet token mixer; parameters named as transformers' Qwen3_5GatedDeltaNet.

    Tensor parallelism: in_proj_z/b/a, dt_bias, A_log and the conv split over value heads ("heads"), out_proj on its
    input (row-parallel). in_proj_qkv's output is q, k, v concatenated, so an even split of it does not follow each
    part's head boundaries: correct (GSPMD reshards the slices), not yet communication-optimal.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        lin = cfg.linear
        D, K, H, Dk, Dv = cfg.d_model, lin.key_heads, lin.value_heads, lin.key_head_dim, lin.value_head_dim
        if not K:
            raise ValueError("GatedDeltaNet needs cfg.linear (key_heads, value_heads, key_head_dim, value_head_dim)")
        C = conv_channels(cfg)
        kw = dict(bias=False, std=cfg.init_std, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                  rngs=rngs)
        self.in_proj_qkv = Linear(D, C, axes=("heads", "embed"), **kw)
        self.in_proj_z = Linear(D, H * Dv, axes=("heads", "embed"), **kw)
        self.in_proj_b = Linear(D, H, axes=("heads", "embed"), **kw)
        self.in_proj_a = Linear(D, H, axes=("heads", "embed"), **kw)
        self.conv1d = CausalConv1d(C, lin.conv_kernel, std=cfg.init_std, param_dtype=cfg.param_dtype, rngs=rngs)
        pdt = dtype_of(cfg.param_dtype)
        self.dt_bias = nnx.Param(jnp.ones((H,), pdt), logical_axes=("heads",))  # as transformers' _init_weights
        A = jax.random.uniform(rngs.params(), (H,), jnp.float32, 0.01, 16.0)  # lower bound keeps log(A) finite
        self.A_log = nnx.Param(jnp.log(A).astype(pdt), logical_axes=("heads",))
        self.norm = GatedRMSNorm(Dv, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        kw.update(std=cfg.init_std / math.sqrt(2 * cfg.n_layers))  # residual output (GPT-2 init, as o_proj)
        self.out_proj = Linear(H * Dv, D, axes=("embed", "heads"), **kw)
        self.key_heads, self.value_heads, self.key_dim, self.value_dim = K, H, Dk, Dv
        self.chunk_size = lin.chunk_size
        self.fused = cfg.attention_impl == "pallas"  # the chunked rule through pallas_kernels.gated_delta

    def _rule_inputs(self, x, segment_ids, state, valid):
        """The delta rule's inputs from x [B, T, D]: (qkv [B, T, C] before the conv, the conv tail it continues,
        z [B, T, H, Dv], q, k [B, T, K, Dk], v [B, T, H, Dv], g [B, T, H] float32 log-decays, beta [B, T, H])."""
        B, T, _ = x.shape
        K, H, Dk, Dv = self.key_heads, self.value_heads, self.key_dim, self.value_dim
        qkv = self.in_proj_qkv(x)  # [B, T, C]
        if valid is not None:
            qkv = jnp.where(valid[..., None], qkv, 0)
        z = self.in_proj_z(x).reshape(B, T, H, Dv)  # [B, T, H, Dv]
        b, a = self.in_proj_b(x), self.in_proj_a(x)  # [B, T, H]

        W = self.conv1d.kernel
        tail = jnp.zeros((B, W - 1, qkv.shape[-1]), qkv.dtype) if state is None else state.conv  # [B, W-1, C]
        segment = None if segment_ids is None else _segment_index(segment_ids)
        mixed = self.conv1d(qkv, tail, segment)  # [B, T, C]
        q = mixed[..., :K * Dk].reshape(B, T, K, Dk)  # [B, T, K, Dk]
        k = mixed[..., K * Dk:2 * K * Dk].reshape(B, T, K, Dk)  # [B, T, K, Dk]
        v = mixed[..., 2 * K * Dk:].reshape(B, T, H, Dv)  # [B, T, H, Dv]

        beta = jax.nn.sigmoid(b)  # [B, T, H], compute dtype
        # g in float32 (transformers: A_log.float(), a.float()); dt_bias joins by type promotion
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a.astype(jnp.float32) + self.dt_bias[...])
        if valid is not None:  # identities on the state: no decay, no write
            g = jnp.where(valid[..., None], g, 0.0)
            beta = jnp.where(valid[..., None], beta, 0)

        return qkv, tail, z, q, k, v, g, beta

    def dynamics(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """What the layer does with a prompt x [B, T, D], for learners (jaxformer viz): each value head's decay
        exp(g_t) [B, T, H] (the share of its state kept from one token to the next) and the Frobenius norm of its
        state matrix after each token [B, T, H] (how much the layer holds in memory)."""
        _, _, _, q, k, v, g, beta = self._rule_inputs(x, None, None, None)
        return jnp.exp(g), gated_delta_state_norms(q, k, v, g, beta, use_qk_l2norm=True)

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None, *, state: DeltaNetState | None = None,
                 valid: jax.Array | None = None) -> jax.Array | tuple[jax.Array, DeltaNetState]:
        """x [B,T,D] -> y [B,T,D]; with `state`, (y, new state) continuing each row from it.

        segment_ids [B,T]: packed documents (conv taps and the delta-rule state do not cross a change of id; the
        first segment continues `state`). valid [B,T] bool: False positions leave the state as it was (their output is
        unspecified; their conv inputs read as zeros, as transformers' masked padding).
        """
        B, T, _ = x.shape
        H, Dv = self.value_heads, self.value_dim
        qkv, tail, z, q, k, v, g, beta = self._rule_inputs(x, segment_ids, state, valid)
        S0 = None if state is None else state.recurrent
        kw = dict(initial_state=S0, segment_ids=segment_ids, use_qk_l2norm=True)
        if state is not None and T == 1:
            core, S = gated_delta_recurrent(q, k, v, g, beta, **kw)  # core [B, T, H, Dv]
        elif self.fused:  # imported here: the kernel file reads models/gated_delta.py (its reference, chunk decays)
            from pallas_kernels.gated_delta import gated_delta as fused_gated_delta

            core, S = fused_gated_delta(q, k, v, g, beta, chunk_size=self.chunk_size, **kw)
        else:
            core, S = gated_delta_chunked(q, k, v, g, beta, chunk_size=self.chunk_size, **kw)
        y = self.norm(core, z).reshape(B, T, H * Dv)  # [B, T, H*Dv]
        y = self.out_proj(y)  # [B, T, D]
        if state is None:
            return y
        return y, DeltaNetState(_conv_tail(tail, qkv, valid), S)


def _conv_tail(tail: jax.Array, qkv: jax.Array, valid: jax.Array | None) -> jax.Array:
    """The W - 1 conv inputs ending at each row's last valid position (tail itself when a row has none)."""
    B, T, _ = qkv.shape
    n = tail.shape[1]
    full = jnp.concatenate([tail.astype(qkv.dtype), qkv], axis=1)  # [B, W-1+T, C]
    if valid is None:
        return full[:, T:]
    last = jnp.max(jnp.where(valid, jnp.arange(1, T + 1), 0), axis=1)  # [B] positions up to the last valid one
    idx = last[:, None] + jnp.arange(n)  # [B, W-1] indices into full
    return jnp.take_along_axis(full, idx[..., None], axis=1)  # [B, W-1, C]
