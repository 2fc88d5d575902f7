"""Building blocks: Linear, Embed, norms, MLP and positional encodings (rotary, sinusoidal).

Weights follow torch's layout (Linear.weight is [out, in]) so that parameter trees map onto
torch_ref and Hugging Face by renaming paths only. Every Param carries `logical_axes` metadata,
which jaxformer.sharding maps onto a device mesh; model code never sees a mesh.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig, RopeScaling
from jaxformer.sharding import sequence_is_split


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def record(capture: dict | None, name: str, x):
    """capture[name] = x when capturing (jaxformer parity / viz read the residual stream this way)."""
    if capture is not None:
        capture[name] = x


def project(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w.T, w [out, in] -> [..., out], as one [rows, in] x [in, out] product.

    The flat rows matter to the backward on XLA:CPU: the weight gradient of a [B, T, in] einsum contracts two
    axes, which it runs through a transposing copy of the activation gradient (a SwiGLU MLP's forward + backward
    1.7-2x slower: bench/flat_rows.py). Where the mesh in context splits the sequence (context parallelism), rows
    [B*T] would interleave the sequence's shards and XLA would gather them: the einsum keeps [B, T] there."""
    if sequence_is_split():
        return jnp.einsum("...i,oi->...o", x, w)
    y = jnp.einsum("ni,oi->no", x.reshape(-1, x.shape[-1]), w)  # [rows, out]
    return y.reshape(*x.shape[:-1], w.shape[0])


class Linear(nnx.Module):
    """y = x @ weight.T + bias, weight stored [out, in] as in torch."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, axes: tuple[str | None, str | None],
                 std: float = 0.02, param_dtype: str = "float32", compute_dtype: str = "float32",
                 rngs: nnx.Rngs):
        out_axis, in_axis = axes
        w = std * jax.random.normal(rngs.params(), (d_out, d_in), dtype_of(param_dtype))
        self.weight = nnx.Param(w, logical_axes=(out_axis, in_axis))
        self.bias = (nnx.Param(jnp.zeros((d_out,), dtype_of(param_dtype)), logical_axes=(out_axis,))
                     if bias else None)
        self.compute_dtype = dtype_of(compute_dtype)

    def dense_weight(self) -> jax.Array:
        """The [out, in] matrix this projection applies (LoRA and quantized projections have one too), for code
        that folds it into another product (latent attention's absorbed decoding)."""
        return self.weight[...].astype(self.compute_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        w = self.weight[...].astype(self.compute_dtype)
        y = project(x.astype(self.compute_dtype), w)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        return y


class Embed(nnx.Module):
    """Token (or position) table [num, dim]; `attend` reuses it as a tied output projection."""

    def __init__(self, num: int, dim: int, *, axes: tuple[str | None, str | None], std: float = 0.02,
                 param_dtype: str = "float32", compute_dtype: str = "float32", rngs: nnx.Rngs):
        w = std * jax.random.normal(rngs.params(), (num, dim), dtype_of(param_dtype))
        self.weight = nnx.Param(w, logical_axes=axes)
        self.compute_dtype = dtype_of(compute_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return jnp.take(self.weight[...], ids, axis=0).astype(self.compute_dtype)

    def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V]
        return project(x, self.dense_weight())

    def dense_weight(self) -> jax.Array:
        """The table [num, dim] in the compute dtype: the matrix `attend` applies (as Linear.dense_weight)."""
        return self.weight[...].astype(self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class OutputHead:
    """What turns final hidden states h [..., D] into float32 logits: cap * tanh(scale * (h @ weight.T) / cap)
    (no tanh where softcap is None); weight [V, D] in the compute dtype."""

    weight: jax.Array
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, h: jax.Array) -> jax.Array:
        return scaled_logits(project(h.astype(self.weight.dtype), self.weight), self.scale, self.softcap)


def scaled_logits(z: jax.Array, scale: float, softcap: float | None) -> jax.Array:
    """Output projections z [..., V] -> float32 logits: times `scale` (Cohere's logit_scale, Granite's
    1 / logits_scaling), then cap * tanh(z / cap) where `softcap` is set (Gemma 2)."""
    z = z.astype(jnp.float32)
    if scale != 1.0:
        z = z * scale
    return z if softcap is None else softcap * jnp.tanh(z / softcap)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and (unless bias=False: Cohere) bias; statistics in float32."""

    def __init__(self, dim: int, *, eps: float, bias: bool = True, param_dtype: str = "float32"):
        self.weight = nnx.Param(jnp.ones((dim,), dtype_of(param_dtype)), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype_of(param_dtype)), logical_axes=("norm",)) if bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        h = h * self.weight[...].astype(jnp.float32)
        if self.bias is not None:
            h = h + self.bias[...].astype(jnp.float32)
        return h.astype(x.dtype)


class QueryScale(NamedTuple):
    """What a NoPE layer with an attention temperature (Llama 4) takes in RoPE's place: its queries times `scale`
    [B, T] (float32), 1 + s * log(1 + floor((position + 1) / floor))."""

    scale: jax.Array


def query_temperature(positions: jax.Array, floor: float, scale: float) -> QueryScale:
    """Llama 4's attention temperature for NoPE layers at positions [B, T]."""
    p = positions.astype(jnp.float32)
    return QueryScale(1.0 + scale * jnp.log1p(jnp.floor((p + 1.0) / floor)))


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, in float32, returned in x's dtype (an RMSNorm without a weight: Gemma 4's
    value norm and router norm)."""
    h = x.astype(jnp.float32)
    return (h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019). Llama: normalise in float32, cast, then scale by weight.
    With `unit_offset` (Gemma): scale by (1 + weight) in float32, then cast; the weight starts at 0."""

    def __init__(self, dim: int, *, eps: float, unit_offset: bool = False, param_dtype: str = "float32"):
        init = jnp.zeros if unit_offset else jnp.ones
        self.weight = nnx.Param(init((dim,), dtype_of(param_dtype)), logical_axes=("norm",))
        self.eps = eps
        self.unit_offset = unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * h.astype(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> LayerNorm | RMSNorm:
    """The norm layer the config names (the one place that reads `cfg.norm` and `cfg.norm_unit_offset`)."""
    if cfg.norm in ("layernorm", "layernorm_nobias"):
        return LayerNorm(dim or cfg.d_model, eps=cfg.norm_eps, bias=cfg.norm == "layernorm",
                         param_dtype=cfg.param_dtype)
    return RMSNorm(dim or cfg.d_model, eps=cfg.norm_eps, unit_offset=cfg.norm_unit_offset,
                   param_dtype=cfg.param_dtype)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2's "gelu_new"
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),  # ReLU squared (So et al. 2021, Primer; Arcee)
}


XIELU_BETA, XIELU_EPS = 0.5, -1e-6  # xIELU's fixed constants (transformers' defaults, Apertus' values)


class XIELU(nnx.Module):
    """xIELU (Huang et al. 2024, arXiv 2411.13010), an activation with two learned scalars: with a_p = softplus(alpha_p)
    and a_n = beta + softplus(alpha_n), a_p x^2 + beta x for x > 0, else a_n (expm1(min(x, eps)) - x) + beta x."""

    def __init__(self, param_dtype: str = "float32"):
        init = lambda v: nnx.Param(jnp.asarray([math.log(math.expm1(v))], dtype_of(param_dtype)), logical_axes=(None,))
        self.alpha_p, self.alpha_n = init(0.8), init(0.8 - XIELU_BETA)  # a_p = a_n = 0.8 at init

    def __call__(self, x: jax.Array) -> jax.Array:
        a_p = jax.nn.softplus(self.alpha_p[...]).astype(x.dtype)
        a_n = (XIELU_BETA + jax.nn.softplus(self.alpha_n[...])).astype(x.dtype)
        neg = (jnp.expm1(jnp.minimum(x, XIELU_EPS)) - x) * a_n + XIELU_BETA * x
        return jnp.where(x > 0, a_p * x * x + XIELU_BETA * x, neg)


class MLP(nnx.Module):
    """down(act(gate(x)) * up(x)) when gated (SwiGLU, Shazeer 2020), else down(act(up(x))); a learned activation
    (xIELU) is the submodule act_fn."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_ff
        kw = dict(bias=cfg.use_bias, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs)
        self.gate_proj = Linear(D, F, axes=("mlp", "embed"), std=cfg.init_std, **kw) if cfg.gated_mlp else None
        self.up_proj = Linear(D, F, axes=("mlp", "embed"), std=cfg.init_std, **kw)
        # GPT-2 scales residual-branch outputs by 1/sqrt(2 * n_layers) at init
        self.down_proj = Linear(F, D, axes=("embed", "mlp"), std=cfg.init_std / math.sqrt(2 * cfg.n_layers), **kw)
        self.act_fn = XIELU(cfg.param_dtype) if cfg.activation == "xielu" else None
        self.act = ACTIVATIONS.get(cfg.activation)  # None: the learned act_fn

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        h = self.up_proj(x)  # [B, T, F]
        act = self.act_fn if self.act_fn is not None else self.act
        h = act(self.gate_proj(x)) * h if self.gate_proj is not None else act(h)
        return self.down_proj(h)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None, max_seq_len: int,
                  seq_len: jax.Array | int) -> tuple[jax.Array, float]:
    """RoPE inverse frequencies [H/2] and the factor on cos/sin, as transformers' modeling_rope_utils.

    `seq_len` (max position + 1 of the call, may be traced) matters to `dynamic` and `longrope` only.
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim  # [H/2]
    inv_freq = 1.0 / (theta ** exponents)
    kind = "default" if scaling is None else scaling.rope_type
    if kind == "default":
        return inv_freq, 1.0
    original = scaling.original_max_position_embeddings or max_seq_len
    factor = scaling.factor
    if kind == "linear":  # position interpolation (Chen et al. 2023): positions / factor
        return inv_freq / factor, 1.0
    if kind == "dynamic":  # NTK-aware: the base grows once the sequence passes the original context
        n = jnp.maximum(jnp.asarray(seq_len, jnp.float32), original)
        base = theta * (factor * n / original - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** exponents), 1.0
    if kind == "llama3":  # Llama 3.1: long wavelengths / factor, short ones kept, a smooth blend between
        low_wavelen = original / scaling.low_freq_factor
        high_wavelen = original / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled), 1.0
    if kind == "proportional":  # Gemma 4: the first share of the pairs rotate at the default rates, the rest not at all
        rotated = int(scaling.partial_rotary_factor * head_dim // 2)
        return jnp.where(jnp.arange(head_dim // 2) < rotated, inv_freq, 0.0) / factor, 1.0
    if kind == "yarn":  # Peng et al. 2023: NTK-by-parts between extrapolation and interpolation
        return _yarn_inv_freq(head_dim, theta, scaling, original, inv_freq)
    # longrope (Phi-3): per-frequency factors, the long set once the sequence passes the original context
    if scaling.attention_factor is not None:
        attention_factor = scaling.attention_factor
    else:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = jnp.asarray(scaling.short_factor, jnp.float32)
    long = jnp.asarray(scaling.long_factor, jnp.float32)
    ext = jnp.where(jnp.asarray(seq_len) > original, long, short)  # [H/2]
    return 1.0 / (ext * theta ** exponents), attention_factor


def _yarn_inv_freq(head_dim: int, theta: float, scaling: RopeScaling, original: int,
                   inv_freq: jax.Array) -> tuple[jax.Array, float]:
    factor = scaling.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.attention_factor is not None:
        attention_factor = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        attention_factor = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
    else:
        attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times in `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation, attention_factor


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None,
                 max_seq_len: int | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, H] for rotate-half RoPE (Su et al. 2021, Hugging Face layout), scaled as
    `scaling` says (transformers multiplies cos and sin by the scaling's attention factor)."""
    seq_len = positions.max() + 1
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling, max_seq_len or 0, seq_len)  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate [B, T, N, H] by per-position angles; computed in float32, returned in x's dtype. cos/sin [B, T, R]
    with R < H rotate the first R dims and pass the rest (partial rotary: GLM, Phi-3's partial_rotary_factor)."""
    R = cos.shape[-1]
    h, rest = x[..., :R].astype(jnp.float32), x[..., R:]
    x1, x2 = jnp.split(h, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = (h * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)
    return out if R == x.shape[-1] else jnp.concatenate([out, rest], axis=-1)


def sinusoidal_positions(positions: jax.Array, dim: int, max_timescale: float = 10000.0) -> jax.Array:
    """Vaswani et al. 2017 encodings [..., dim]: sin on the first half, cos on the second."""
    half = dim // 2
    inv = 1.0 / (max_timescale ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[..., None] * inv
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


@jax.custom_vjp
def materialize_cotangent(x: jax.Array) -> jax.Array:
    """Identity whose cotangent is materialised in the backward pass (XLA:CPU only).

    Between blocks, XLA:CPU fuses the residual stream's gradient (a chain of elementwise adds
    through every later block's norm backward) into each consumer, recomputing it per layer:
    quadratic work in depth. Passing the cotangent through a conditional, which XLA does not fuse
    across, stores it once instead (a 1.3x faster backward on this project's bench model).
    """
    return x


def _materialize_fwd(x):
    return x, None


def _materialize_bwd(_, g):
    if jax.default_backend() != "cpu":
        return (g,)
    first = g.reshape(-1)[0]
    return (jax.lax.cond(first == first, lambda a: a, lambda a: a * 1, g),)  # both branches are g


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)
