"""Open any model source jaxformer knows: its own weight files or a Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

from jaxformer.checkpoint import load_run_params
from jaxformer.interop import hf, native
from jaxformer.interop.quantized import load_quantized, quantization_of
from jaxformer.interop.state_dict import from_state_dict
from jaxformer.models import DecoderLM


def load_any(src: str | Path, **config_overrides) -> DecoderLM:
    """Load a jaxformer model (directory / .safetensors; quantized ones too), a training run, or a transformers
    directory."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if src.is_dir() and quantization_of(src) is not None:  # a quantized jaxformer directory
        return load_quantized(src, **config_overrides)
    if native.is_native(src):
        return native.load(src, **config_overrides)
    if src.is_dir() and native.is_native(src / "model"):  # a finished training run
        return native.load(src / "model", **config_overrides)
    if (src / "checkpoints").is_dir():  # a run in progress (or stopped): its newest readable checkpoint
        cfg, params = load_run_params(src)
        return from_state_dict(cfg.replace(**config_overrides), params, source=f"{src}/checkpoints")
    if src.is_dir() and (src / "config.json").exists() and "model_type" in json.loads((src / "config.json").read_text()):
        return hf.load_hf(src, **config_overrides)
    raise ValueError(f"{src} is neither a jaxformer run directory or model (config.json with \"format\": \"jaxformer\", or a "
                     ".safetensors file written by jaxformer) nor a Hugging Face directory (config.json with "
                     "\"model_type\")")
