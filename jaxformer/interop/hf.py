"""Hugging Face transformers checkpoints <-> jaxformer: files, and dispatch to one module per family.

Reads what `save_pretrained` writes (model.safetensors, sharded safetensors with an index,
pytorch_model.bin via torch.load(weights_only=True)) and writes directories that
`transformers.AutoModelForCausalLM.from_pretrained` loads. config.json's `model_type` picks the importer
(gpt2, llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, olmo2: jaxformer.interop.<family>;
mixtral, qwen2_moe, qwen3_moe: jaxformer.interop.moe; the families since (llama_kin, olmo2, exaone4, starcoder2,
glm4, cohere2, gpt_oss, glm4_moe, gemma4, gemma3n, minimax_m2, llama4, deepseek_v3 / kimi_k2, lfm2, qwen3_5 /
qwen3_5_moe / qwen3_next): their modules; marian: the
encoder-decoder; block-scaled fp8 weights are dequantized first, interop/fp8.py); the config's `family`
(export_as, or inferred from its fields) the exporter, which refuses, naming the fields, a config the
architecture cannot express.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxformer.config import EncDecConfig, ModelConfig
from jaxformer.interop import (cohere2, deepseek_v3, exaone4, fp8, gemma, gemma3n, gemma4, glm4, glm4_moe, gpt2,
                               gpt_oss, lfm2, llama, llama4, llama_kin, marian, minimax_m2, moe, olmo2, phi3,
                               qwen3_5, starcoder2)
from jaxformer.interop.hf_config import Family, check_expressible
from jaxformer.interop.state_dict import UnsupportedCheckpointError, from_state_dict, to_numpy_state_dict
from jaxformer.models import DecoderLM
from jaxformer.models.quant_layers import is_quantized

FAMILIES: dict[str, Family] = {**gpt2.FAMILIES, **llama.FAMILIES, **gemma.FAMILIES, **phi3.FAMILIES, **olmo2.FAMILIES,
                               **moe.FAMILIES, **llama_kin.FAMILIES, **exaone4.FAMILIES, **starcoder2.FAMILIES,
                               **glm4.FAMILIES, **cohere2.FAMILIES, **gpt_oss.FAMILIES, **glm4_moe.FAMILIES,
                               **gemma4.FAMILIES, **gemma3n.FAMILIES, **minimax_m2.FAMILIES,
                               **llama4.FAMILIES, **deepseek_v3.FAMILIES, **lfm2.FAMILIES,
                               **qwen3_5.FAMILIES}
SUPPORTED = {**{t: f.architecture for t, f in FAMILIES.items()}, "marian": "MarianMTModel"}
# buffers some transformers versions store beside the weights; they carry no learned values
IGNORED_HF_KEYS = re.compile(r".*\.attn\.(bias|masked_bias)$|.*rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------- configs

def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """A ModelConfig equal in architecture to a transformers config.json dict."""
    model_type = hf.get("model_type")
    if model_type == "marian":
        return marian.config_from_hf(hf, overrides)
    if model_type not in FAMILIES:
        archs = hf.get("architectures")
        raise UnsupportedCheckpointError(
            f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
            f"jaxformer imports {', '.join(f'{k} ({v})' for k, v in SUPPORTED.items())}")
    cfg = FAMILIES[model_type].config_from_hf(hf)
    return cfg.replace(**overrides) if overrides else cfg


def family_of(cfg: ModelConfig) -> Family:
    """The Hugging Face family `cfg` exports as (its `family`: export_as, or inferred from its fields)."""
    name = cfg.family
    if name not in FAMILIES:
        raise UnsupportedCheckpointError(
            f"no Hugging Face architecture matches this config (position={cfg.position}, norm={cfg.norm}, "
            f"activation={cfg.activation}, gated_mlp={cfg.gated_mlp}, use_bias={cfg.use_bias}, "
            f"export_as={cfg.export_as}); set model.export_as to one of {sorted(FAMILIES)} to get told which fields "
            "that architecture cannot express")
    return FAMILIES[name]


def config_to_hf(cfg: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    """config.json contents for the Hugging Face architecture matching `cfg` (every field checked to carry over)."""
    if isinstance(cfg, EncDecConfig):
        return marian.config_to_hf(cfg, eos_token_id=eos_token_id)
    family = family_of(cfg)
    out = family.config_to_hf(cfg)
    check_expressible(cfg, family, out)
    eos = cfg.vocab_size - 1 if eos_token_id is None else eos_token_id
    return {**out, "bos_token_id": eos if bos_token_id is None else bos_token_id, "eos_token_id": eos}


# ----------------------------------------------------------------------------- files

def read_hf_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a save_pretrained directory, as numpy; pickles are read weights-only."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").exists():
        files = _index_files(path, "model.safetensors.index.json")
    elif (path / "pytorch_model.bin").exists():
        files = [path / "pytorch_model.bin"]
    elif (path / "pytorch_model.bin.index.json").exists():
        files = _index_files(path, "pytorch_model.bin.index.json")
    else:
        raise FileNotFoundError(f"{path} holds no model.safetensors, model.safetensors.index.json or "
                                "pytorch_model.bin[.index.json]: is it a Hugging Face save_pretrained directory?")
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(_read_file(f))
    return {k: v for k, v in out.items() if not IGNORED_HF_KEYS.fullmatch(k)}


def _index_files(path: Path, index_name: str) -> list[Path]:
    weight_map = json.loads((path / index_name).read_text())["weight_map"]
    files = [path / name for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.exists()]
    if absent:
        raise FileNotFoundError(f"{index_name} in {path} lists shard files that are missing: {absent}")
    return files


def _read_file(f: Path) -> dict[str, np.ndarray]:
    if f.suffix == ".safetensors":
        from safetensors.numpy import load_file

        with open(f, "rb") as fh:  # numpy has no float8: such files are read by fp8.read_safetensors
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        if any(str(v.get("dtype", "")).startswith("F8") for k, v in header.items() if k != "__metadata__"):
            return fp8.read_safetensors(f)
        return load_file(str(f))
    import torch

    sd = torch.load(str(f), map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    return {k: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for k, t in sd.items()}


def load_hf(path: str | Path, **config_overrides: Any) -> DecoderLM:
    """A jaxformer model (config at `model.config`) from a transformers save_pretrained directory.

    GPT-2 and Llama give a DecoderLM, Marian an EncoderDecoder (`model(src, tgt, src_mask) -> logits`).
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}/config.json not found: not a Hugging Face model directory")
    hf = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(hf, **config_overrides)
    weights = read_hf_weights(path)
    quantization = hf.get("quantization_config") or {}
    if quantization.get("quant_method") == "fp8":  # DeepSeek-V3, MiniMax-M2: block-scaled fp8, dequantized here
        weights = fp8.dequantize_fp8(weights, quantization)
    elif quantization and hf.get("model_type") != "gpt_oss":  # gpt-oss's mxfp4 experts: its importer dequantizes them
        raise UnsupportedCheckpointError(f"{path}: quantization_config.quant_method="
                                         f"{quantization.get('quant_method')!r} is not supported; jaxformer reads "
                                         "float checkpoints, block-scaled fp8 and gpt-oss's mxfp4")
    weights = (marian.from_hf if isinstance(cfg, EncDecConfig) else family_of(cfg).from_hf)(weights, cfg)
    return from_state_dict(cfg, weights, source=str(path))


def save_hf(model: DecoderLM, path: str | Path, *, max_shard_bytes: int | None = None,
            bos_token_id: int | None = None, eos_token_id: int | None = None) -> Path:
    """Write config.json + safetensors (sharded with an index past max_shard_bytes) for transformers."""
    from safetensors.numpy import save_file

    if is_quantized(model):
        raise ValueError("save_hf writes float checkpoints, and this model holds int8/int4 weights: keep it with "
                         "jaxformer.infer.save_quantized(model, path) (what `jaxformer quantize` writes), or export its "
                         "float twin with save_hf(jaxformer.infer.dequantized_model(model), path)")
    cfg = model.config
    hf_config = config_to_hf(cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    weights = (marian.to_hf if isinstance(cfg, EncDecConfig) else family_of(cfg).to_hf)(to_numpy_state_dict(model), cfg)
    # safetensors writes raw buffers: transposed views must be made contiguous first (np.require keeps 0-d arrays,
    # e.g. xIELU's buffers, 0-d where np.ascontiguousarray would make them [1])
    weights = {k: np.require(v, requirements="C") for k, v in weights.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    shards = _shard(weights, max_shard_bytes)
    meta = {"format": "pt"}  # transformers expects this marker
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
        return path
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata=meta)
        weight_map.update({k: name for k in shard})
        total += sum(v.nbytes for v in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def _shard(weights: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
    if not max_bytes:
        return [weights]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k, v in weights.items():
        if shards[-1] and size + v.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    return shards
