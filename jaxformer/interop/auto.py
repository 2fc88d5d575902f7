"""Open any model source jaxformer knows: its own weight files or a Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

from jaxformer.interop import hf, native
from jaxformer.model import DecoderLM


def load_any(src: str | Path, **config_overrides) -> DecoderLM:
    """Load a jaxformer directory / .safetensors file, or a transformers save_pretrained directory."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if native.is_native(src):
        return native.load(src, **config_overrides)
    if src.is_dir() and (src / "config.json").exists() and "model_type" in json.loads((src / "config.json").read_text()):
        return hf.load_hf(src, **config_overrides)
    raise ValueError(f"{src} is neither a jaxformer checkpoint (config.json with \"format\": \"jaxformer\", or a "
                     ".safetensors file written by jaxformer) nor a Hugging Face directory (config.json with "
                     "\"model_type\")")
