"""jaxformer's own weight files: safetensors keyed by parameter path, config in the metadata.

Two layouts of the same bytes:
  DIR/                 config.json ({"format": "jaxformer", "model": {...}}) + model.safetensors
  FILE.safetensors     one file; its metadata holds the config. torch_ref loads it directly,
                       because jaxformer's parameter paths are torch_ref's state_dict keys.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from jaxformer.config import ModelConfig, model_config_from_dict
from jaxformer.interop.state_dict import from_state_dict, to_numpy_state_dict
from jaxformer.models import DecoderLM

FORMAT = "jaxformer"
WEIGHTS = "model.safetensors"


def save(model: DecoderLM, path: str | Path) -> Path:
    """Write `model` as a jaxformer directory, or one .safetensors file when path ends so."""
    path = Path(path)
    meta = {"format": FORMAT, "model_config": json.dumps(model.config.to_dict())}
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(to_numpy_state_dict(model), str(path), metadata=meta)
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_file(to_numpy_state_dict(model), str(path / WEIGHTS), metadata=meta)
    (path / "config.json").write_text(json.dumps({"format": FORMAT, "model": model.config.to_dict()}, indent=2))
    return path


def is_native(path: str | Path) -> bool:
    """True for a directory or .safetensors file written by `save`."""
    path = Path(path)
    if path.is_dir():
        cfg = path / "config.json"
        return cfg.exists() and json.loads(cfg.read_text()).get("format") == FORMAT
    if path.suffix == ".safetensors" and path.exists():
        return read_config(path) is not None
    return False


def read_config(path: str | Path) -> ModelConfig | None:
    """The ModelConfig stored with native weights, or None when the file carries none."""
    path = Path(path)
    if path.is_dir():
        return model_config_from_dict(json.loads((path / "config.json").read_text())["model"])
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT or "model_config" not in meta:
        return None
    return model_config_from_dict(json.loads(meta["model_config"]))


def load(path: str | Path, **config_overrides) -> DecoderLM:
    """Read a model written by `save` (config fields like attention_impl may be overridden)."""
    path = Path(path)
    cfg = read_config(path)
    if cfg is None:
        raise ValueError(f"{path} is a safetensors file without a jaxformer config in its metadata; "
                         "write it with jaxformer.save or `jaxformer convert --to torch`")
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    weights = path / WEIGHTS if path.is_dir() else path
    return from_state_dict(cfg, load_file(str(weights)), source=str(weights))
