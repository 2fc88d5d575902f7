"""Flat {dotted.name: array} state dicts <-> jaxformer models, with checks that name what is wrong.

jaxformer's parameter paths are torch_ref's state_dict keys, so this map is a pure flatten:
no renames and no transposes.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models import DecoderLM, model_class


class CheckpointMismatchError(ValueError):
    """Weights do not fit the model: lists missing/unexpected keys and shape mismatches."""


class UnsupportedCheckpointError(ValueError):
    """The checkpoint's architecture or one of its options has no jaxformer equivalent."""


def _name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every parameter (abstract models included)."""
    return {_name(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} a checkpoint for `cfg` must hold, computed without allocating weights."""
    return param_shapes(nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))))


def check_shapes(expected: Mapping[str, tuple], got: Mapping[str, tuple], source: str) -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected and wrongly shaped key."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    if not (missing or unexpected or wrong):
        return

    def few(keys, fmt=str):
        shown = ", ".join(fmt(k) for k in keys[:8])
        return shown + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    lines = [f"weights in {source} do not match the model config:"]
    if missing:
        lines.append(f"  missing keys: {few(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {few(unexpected)}")
    if wrong:
        lines.append("  shape mismatches: " + few(wrong, lambda k: f"{k} has {tuple(got[k])}, expected {tuple(expected[k])}"))
    lines.append("  check that the checkpoint was saved from a model with this config (vocab_size, d_model, "
                 "n_layers, n_heads, n_kv_heads, d_ff, tie_embeddings, position, use_bias)")
    raise CheckpointMismatchError("\n".join(lines))


def to_numpy_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """{name: numpy array} of every parameter, in its param dtype."""
    return {_name(p): np.asarray(jax.device_get(v[...])) for p, v in
            nnx.to_flat_state(nnx.state(model, nnx.Param))}


def to_torch_state_dict(model: nnx.Module) -> dict[str, Any]:
    """{name: torch.Tensor}, loadable into torch_ref's twin of the model with load_state_dict."""
    import torch

    out = {}
    for k, v in to_numpy_state_dict(model).items():
        if v.dtype == jnp.bfloat16:  # numpy has no native bf16: go through float32, exactly
            out[k] = torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
        else:
            out[k] = torch.from_numpy(np.array(v, copy=True))  # owned, writable
    return out


def from_state_dict(cfg: ModelConfig, state_dict: Mapping[str, Any], *, source: str = "the state dict") -> DecoderLM:
    """The model `cfg` describes (DecoderLM or EncoderDecoder) holding exactly the given weights (cast to cfg.param_dtype)."""
    abstract = nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0)))
    check_shapes(param_shapes(abstract), {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    dtype = jnp.dtype(cfg.param_dtype)
    for path, var in nnx.to_flat_state(params):
        var.set_value(jnp.asarray(_to_numpy(state_dict[_name(path)]), dtype=dtype))
    return nnx.merge(graphdef, params, rest)


def from_torch_state_dict(cfg: ModelConfig, state_dict: Mapping[str, Any]) -> DecoderLM:
    """Inverse of to_torch_state_dict (bit-exact round trip)."""
    return from_state_dict(cfg, state_dict, source="the torch state dict")


def _to_numpy(x: Any) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        import torch

        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)
