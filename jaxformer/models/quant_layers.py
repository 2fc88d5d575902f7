"""Quantized stand-ins for Linear and the token Embed, and `quantize_model`, which swaps them in.

Parameter names are kept: `...q_proj.weight` holds int8 (or packed int4) with a per-row `scale` beside it
(and int4's `group_scale`, `group_zero`), so a quantized model's state dict is the float one's with narrow
weights plus scales.
Formats and matmuls: jaxformer.models.quant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.models.layers import Embed, Linear
from jaxformer.models.quant import (IMPLS, QuantSpec, dequantize, gather_rows, int4_linear, int8_linear, quantize_int4,
                                    quantize_int8)


def _shapes(spec: QuantSpec, n: int, k: int) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
    """Parameter shapes and dtypes of a quantized [n, k] weight."""
    if spec.bits == 8:
        return {"weight": ((n, k), jnp.int8), "scale": ((n,), jnp.float32)}
    h, groups = -(-n // 2), -(-k // spec.group_size)
    return {"weight": ((h, groups * spec.group_size), jnp.uint8), "scale": ((2 * h,), jnp.float32),
            "group_scale": ((2 * h, groups), jnp.float16), "group_zero": ((2 * h, groups), jnp.float16)}


class _Quantized(nnx.Module):
    """A quantized [n, k] weight: int8 (weight, scale) or int4 (weight packed, scale, group_scale, group_zero)."""

    def _init_weight(self, spec: QuantSpec, n: int, k: int, axes: tuple[str | None, str | None], impl: str):
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.bits, self.group_size, self.n, self.k, self.impl = spec.bits, spec.group_size, n, k, impl
        shapes = _shapes(spec, n, k)
        # int8 rows are output channels and shard like the float weight; int4 rows pair r with h + r: replicated
        weight_axes = axes if spec.bits == 8 else (None, None)
        self.weight = nnx.Param(jnp.zeros(*shapes["weight"]), logical_axes=weight_axes)
        self.scale = nnx.Param(jnp.ones(*shapes["scale"]), logical_axes=axes[:1] if spec.bits == 8 else (None,))
        four = spec.bits == 4
        self.group_scale = nnx.Param(jnp.ones(*shapes["group_scale"]), logical_axes=(None, None)) if four else None
        self.group_zero = nnx.Param(jnp.zeros(*shapes["group_zero"]), logical_axes=(None, None)) if four else None

    def _set_weight(self, w: jax.Array) -> None:
        parts = quantize_int8(w) if self.bits == 8 else quantize_int4(w, self.group_size)
        for var, value in zip((self.weight, self.scale, self.group_scale, self.group_zero), parts):
            var[...] = value

    def _groups(self) -> tuple[jax.Array, jax.Array] | None:
        return None if self.bits == 8 else (self.group_scale[...], self.group_zero[...])

    def dequantized(self) -> jax.Array:
        """The float32 weight [n, k] this layer stands for (the plain-jnp reference)."""
        return dequantize(self.bits, self.weight[...], self.scale[...], self._groups(), self.n, self.k)

    def _matmul(self, x: jax.Array) -> jax.Array:  # [..., k] -> [..., n]
        if self.bits == 8:
            return int8_linear(x, self.weight[...], self.scale[...], self.impl)
        return int4_linear(x, self.weight[...], self.scale[...], *self._groups(), self.n, self.impl)


class QuantLinear(_Quantized):
    """y = x @ W^T + bias with W [out, in] stored int8 or int4 and read narrow (jaxformer.models.quant)."""

    def __init__(self, d_in: int, d_out: int, spec: QuantSpec, *, bias: bool = False,
                 axes: tuple[str | None, str | None] = (None, None), compute_dtype: str = "float32",
                 impl: str = "auto"):
        self._init_weight(spec, d_out, d_in, axes, impl)
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32), logical_axes=axes[:1]) if bias else None
        self.compute_dtype = jnp.dtype(compute_dtype)

    @classmethod
    def from_linear(cls, lin: Linear, spec: QuantSpec, impl: str = "auto", *, empty: bool = False) -> "QuantLinear":
        """The quantized copy of a Linear (its bias stays in its own dtype); `empty`: shapes only, to load into."""
        w = lin.weight[...]
        axes = lin.weight.get_metadata().get("logical_axes", (None, None))
        out = cls(w.shape[1], w.shape[0], spec, bias=lin.bias is not None, axes=axes,
                  compute_dtype=lin.compute_dtype.name, impl=impl)
        if not empty:
            out._set_weight(w)
        if lin.bias is not None:
            out.bias = nnx.Param(lin.bias[...], logical_axes=axes[:1])
        return out

    def dense_weight(self) -> jax.Array:
        """The dequantized [out, in] matrix, in the compute dtype (as Linear.dense_weight)."""
        return self.dequantized().astype(self.compute_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        y = self._matmul(x.astype(self.compute_dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.compute_dtype)


class QuantEmbed(_Quantized):
    """A token table [V, D] stored quantized: lookups widen only the rows asked for; `attend` (a tied LM
    head) is a quantized matmul over the whole table."""

    def __init__(self, num: int, dim: int, spec: QuantSpec, *, axes: tuple[str | None, str | None] = (None, None),
                 compute_dtype: str = "float32", impl: str = "auto"):
        self._init_weight(spec, num, dim, axes, impl)
        self.compute_dtype = jnp.dtype(compute_dtype)

    @classmethod
    def from_embed(cls, emb: Embed, spec: QuantSpec, impl: str = "auto", *, empty: bool = False) -> "QuantEmbed":
        """The quantized copy of an Embed; `empty`: shapes only, to load into."""
        w = emb.weight[...]
        axes = emb.weight.get_metadata().get("logical_axes", (None, None))
        out = cls(w.shape[0], w.shape[1], spec, axes=axes, compute_dtype=emb.compute_dtype.name, impl=impl)
        if not empty:
            out._set_weight(w)
        return out

    def __call__(self, ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        rows = gather_rows(self.bits, self.weight[...], self.scale[...], self._groups(), ids, self.k)
        return rows.astype(self.compute_dtype)

    def dense_weight(self) -> jax.Array:
        """The dequantized table [num, dim], in the compute dtype (as Embed.dense_weight)."""
        return self.dequantized().astype(self.compute_dtype)

    def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V]
        return self._matmul(x)


def quantize_model(model: nnx.Module, spec: QuantSpec, impl: str = "auto", *, empty: bool = False) -> nnx.Module:
    """A copy of `model` with every Linear (and, when spec.embeddings, the token table) quantized.

    `empty` builds the quantized layers' parameters without quantizing anything (shapes to load weights into).
    """
    model = nnx.clone(model)
    swaps = []
    for path, m in nnx.iter_modules(model):
        if isinstance(m, Linear):
            swaps.append((path, QuantLinear.from_linear(m, spec, impl, empty=empty)))
        elif isinstance(m, Embed) and spec.embeddings and path and path[-1] == "embed_tokens":
            swaps.append((path, QuantEmbed.from_embed(m, spec, impl, empty=empty)))
    return _swap(model, swaps)


def dequantized_model(qmodel: nnx.Module) -> nnx.Module:
    """A float model whose weights are the quantized model's, dequantized in plain jnp: its forward is the
    reference the quantized matmuls must match."""
    model = nnx.clone(qmodel)
    swaps = []
    for path, m in nnx.iter_modules(model):
        if isinstance(m, (QuantLinear, QuantEmbed)):
            w = m.dequantized()  # [n, k] float32
            if isinstance(m, QuantLinear):
                new = Linear(m.k, m.n, bias=m.bias is not None, axes=(None, None), compute_dtype=m.compute_dtype.name,
                             rngs=nnx.Rngs(0))
                if m.bias is not None:
                    new.bias[...] = m.bias[...]
            else:
                new = Embed(m.n, m.k, axes=(None, None), compute_dtype=m.compute_dtype.name, rngs=nnx.Rngs(0))
            new.weight[...] = w
            swaps.append((path, new))
    return _swap(model, swaps)



def _swap(model: nnx.Module, swaps) -> nnx.Module:
    """`model` with the submodule at each path replaced, in place."""
    for path, new in swaps:
        parent = model
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        setattr(parent, path[-1], new)
    return model


def is_quantized(model: nnx.Module) -> bool:
    """True when any layer of `model` holds quantized weights."""
    return any(isinstance(m, _Quantized) for _, m in nnx.iter_modules(model))


def quant_spec_of(model: nnx.Module) -> QuantSpec | None:
    """The QuantSpec a quantized model was built with (None for a float model)."""
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, _Quantized)]
    if not layers:
        return None
    embeddings = any(isinstance(m, QuantEmbed) for m in layers)
    return QuantSpec(layers[0].bits, layers[0].group_size, embeddings)


def set_impl(model: nnx.Module, impl: str) -> nnx.Module:
    """Choose where every quantized matmul of `model` runs ("auto", "xla", "pallas"), in place."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for _, m in nnx.iter_modules(model):
        if isinstance(m, _Quantized):
            m.impl = impl
    return model
