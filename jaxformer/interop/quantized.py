"""Quantized model directories: a jaxformer directory whose config.json also has a "quantization" entry.

    DIR/config.json        {"format": "jaxformer", "model": {...}, "quantization": QuantSpec.to_dict()}
    DIR/model.safetensors  the quantized state dict (int8 / packed uint8 weights, scales, zeros, float rest)

Directories written before int4 (int8 entries without "embeddings") load as int8 with float embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.interop.native import FORMAT, WEIGHTS
from jaxformer.interop.state_dict import check_shapes, param_shapes, to_numpy_state_dict
from jaxformer.models import DecoderLM, model_class
from jaxformer.models.quant import QuantSpec
from jaxformer.models.quant_layers import quant_spec_of, quantize_model


def save_quantized(model: DecoderLM, path: str | Path) -> Path:
    """Write a quantized model as a jaxformer directory with a "quantization" entry."""
    from safetensors.numpy import save_file

    spec = quant_spec_of(model)
    if spec is None:
        raise ValueError("the model is not quantized: call jaxformer.infer.quantize(model) first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "model_config": json.dumps(model.config.to_dict()),
            "quantization": json.dumps(spec.to_dict())}
    save_file(to_numpy_state_dict(model), str(path / WEIGHTS), metadata=meta)
    (path / "config.json").write_text(json.dumps({"format": FORMAT, "model": model.config.to_dict(),
                                                  "quantization": spec.to_dict()}, indent=2))
    return path


def quantization_of(path: str | Path) -> dict | None:
    """The "quantization" entry of a jaxformer directory's config.json, or None (not a quantized directory)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except ValueError:
        return None
    return data.get("quantization") if isinstance(data, dict) and data.get("format") == FORMAT else None


def load_quantized(path: str | Path, *, impl: str = "auto", **config_overrides) -> DecoderLM:
    """Read a directory written by save_quantized; `impl` picks where its matmuls run (jaxformer.models.quant)."""
    from safetensors.numpy import load_file

    path = Path(path)
    entry = quantization_of(path)
    if entry is None:
        raise ValueError(f"{path} is not a quantized jaxformer directory (its config.json has no \"quantization\")")
    spec = QuantSpec.from_dict(entry)
    cfg = ModelConfig.from_dict(json.loads((path / "config.json").read_text())["model"]).replace(**config_overrides)
    abstract = nnx.eval_shape(lambda: quantize_model(model_class(cfg)(cfg, rngs=nnx.Rngs(0)), spec, impl, empty=True))
    weights = load_file(str(path / WEIGHTS))
    check_shapes(param_shapes(abstract), {k: v.shape for k, v in weights.items()}, str(path / WEIGHTS))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    for p, var in nnx.to_flat_state(params):
        var.set_value(jnp.asarray(weights[".".join(map(str, p))], dtype=var.dtype))
    return nnx.merge(graphdef, params, rest)
