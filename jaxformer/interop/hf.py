"""Hugging Face transformers checkpoints <-> jaxformer (GPT2LMHeadModel, LlamaForCausalLM, MarianMTModel).

Reads what `save_pretrained` writes (model.safetensors, sharded safetensors with an index,
pytorch_model.bin via torch.load(weights_only=True)) and writes directories that
`transformers.AutoModelForCausalLM.from_pretrained` loads. Llama names differ from ours only by
a "model." prefix; GPT-2's fused c_attn and Conv1D ([in, out]) layout are handled here alone.
MarianMTModel (the encoder-decoder, jaxformer.models.encdec) has its own tables in jaxformer.interop.marian;
`model_type` picks the importer, the config's `family` the exporter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxformer.config import EncDecConfig, ModelConfig
from jaxformer.interop import marian
from jaxformer.interop.state_dict import UnsupportedCheckpointError, from_state_dict, to_numpy_state_dict
from jaxformer.models import DecoderLM

SUPPORTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "marian": "MarianMTModel"}
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                    "silu": "silu", "swish": "silu"}
# buffers some transformers versions store beside the weights; they carry no learned values
IGNORED_HF_KEYS = re.compile(r".*\.attn\.(bias|masked_bias)$|.*rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------- configs

def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """A ModelConfig equal in architecture to a transformers config.json dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        archs = hf.get("architectures")
        raise UnsupportedCheckpointError(
            f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
            f"jaxformer imports {', '.join(f'{k} ({v})' for k, v in SUPPORTED.items())}")
    return {"gpt2": _gpt2_config, "llama": _llama_config, "marian": marian.config_from_hf}[model_type](hf, overrides)


def _gpt2_config(hf: dict, overrides: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise UnsupportedCheckpointError(f"GPT-2 activation_function={act!r} is not supported; "
                                         f"supported: {sorted(GPT2_ACTIVATIONS)}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("add_cross_attention"):
        raise UnsupportedCheckpointError("GPT-2 options scale_attn_by_inverse_layer_idx / add_cross_attention "
                                         "are not supported")
    if hf.get("scale_attn_weights", True) is False:
        raise UnsupportedCheckpointError("GPT-2 with scale_attn_weights=false is not supported")
    d = hf["n_embd"]
    return ModelConfig.gpt2(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=GPT2_ACTIVATIONS[act], tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02), **overrides)


def _llama_config(hf: dict, overrides: dict) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedCheckpointError(f"Llama hidden_act={hf['hidden_act']!r} is not supported; only 'silu'")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedCheckpointError(f"Llama rope_type={rope_type!r} (RoPE scaling) is not supported; "
                                         "only the default RoPE")
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        raise UnsupportedCheckpointError(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} is not "
                                         "supported; jaxformer has one use_bias switch for both")
    n_heads = hf["num_attention_heads"]
    return ModelConfig.llama(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), use_bias=attention_bias,
        tie_embeddings=hf.get("tie_word_embeddings", False), init_std=hf.get("initializer_range", 0.02), **overrides)


def config_to_hf(cfg: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    """config.json contents for the Hugging Face architecture matching `cfg`."""
    if isinstance(cfg, EncDecConfig):
        return marian.config_to_hf(cfg, eos_token_id=eos_token_id)
    family = cfg.family
    if family is None:
        raise UnsupportedCheckpointError(
            f"this config matches neither GPT-2 nor Llama (position={cfg.position}, norm={cfg.norm}, "
            f"activation={cfg.activation}, gated_mlp={cfg.gated_mlp}, use_bias={cfg.use_bias}); "
            "Hugging Face export needs one of those two component sets")
    eos = cfg.vocab_size - 1 if eos_token_id is None else eos_token_id
    bos = eos if bos_token_id is None else bos_token_id
    common = {"architectures": [SUPPORTED[family]], "model_type": family, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
              "bos_token_id": bos, "eos_token_id": eos, "dtype": cfg.param_dtype}
    if family == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[cfg.activation]
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len, "activation_function": act,
                "layer_norm_epsilon": cfg.norm_eps, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {**common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.d_ff, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
            "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias}


# ----------------------------------------------------------------------------- weight names

def _llama_from_hf(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    out = {(k if k == "lm_head.weight" else k.removeprefix("model.")): v for k, v in sd.items()}
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)  # some writers store the tied copy
    return out


def _llama_to_hf(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    return {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in sd.items()}


_GPT2_RENAMES = [  # (HF suffix, jaxformer suffix, Conv1D weight to transpose)
    ("wte.weight", "embed_tokens.weight", False), ("wpe.weight", "embed_positions.weight", False),
    ("ln_f.weight", "norm.weight", False), ("ln_f.bias", "norm.bias", False),
    ("ln_1.weight", "input_layernorm.weight", False), ("ln_1.bias", "input_layernorm.bias", False),
    ("ln_2.weight", "post_attention_layernorm.weight", False), ("ln_2.bias", "post_attention_layernorm.bias", False),
    ("attn.c_proj.weight", "self_attn.o_proj.weight", True), ("attn.c_proj.bias", "self_attn.o_proj.bias", False),
    ("mlp.c_fc.weight", "mlp.up_proj.weight", True), ("mlp.c_fc.bias", "mlp.up_proj.bias", False),
    ("mlp.c_proj.weight", "mlp.down_proj.weight", True), ("mlp.c_proj.bias", "mlp.down_proj.bias", False),
]


def _gpt2_from_hf(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, v in sd.items():
        k = key.removeprefix("transformer.")
        m = re.fullmatch(r"h\.(\d+)\.(.+)", k)
        prefix, rest = (f"layers.{m[1]}.", m[2]) if m else ("", k)
        if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
            leaf = rest.rsplit(".", 1)[1]
            fused = v.T if leaf == "weight" else v  # Conv1D [D, 3D] -> [3D, D]
            for name, part in zip("qkv", np.split(fused, 3, axis=0)):
                out[f"{prefix}self_attn.{name}_proj.{leaf}"] = part
            continue
        if k == "lm_head.weight" and cfg.tie_embeddings:
            continue
        for hf_name, ours, transpose in _GPT2_RENAMES:
            if rest == hf_name:
                out[prefix + ours] = v.T if transpose else v
                break
        else:
            out[key] = v  # unknown: kept under its own name so the mismatch report shows it
    return out


def _gpt2_to_hf(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        for leaf in ("weight", "bias"):
            q, k, v = (sd.pop(f"{p}self_attn.{n}_proj.{leaf}") for n in "qkv")
            fused = np.concatenate([q, k, v], axis=0)
            out[f"transformer.h.{i}.attn.c_attn.{leaf}"] = fused.T if leaf == "weight" else fused
    for key, v in sd.items():
        if key == "lm_head.weight":
            out[key] = v
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        prefix, rest = (f"transformer.h.{m[1]}.", m[2]) if m else ("transformer.", key)
        hf_name, _, transpose = next(r for r in _GPT2_RENAMES if r[1] == rest)
        out[prefix + hf_name] = v.T if transpose else v
    return out


_FROM_HF: dict[str, Callable] = {"gpt2": _gpt2_from_hf, "llama": _llama_from_hf, "marian": marian.from_hf}
_TO_HF: dict[str, Callable] = {"gpt2": _gpt2_to_hf, "llama": _llama_to_hf, "marian": marian.to_hf}


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
    cfg = config_from_hf(json.loads((path / "config.json").read_text()), **config_overrides)
    weights = _FROM_HF[cfg.family](read_hf_weights(path), cfg)
    return from_state_dict(cfg, weights, source=str(path))


def save_hf(model: DecoderLM, path: str | Path, *, max_shard_bytes: int | None = None,
            bos_token_id: int | None = None, eos_token_id: int | None = None) -> Path:
    """Write config.json + safetensors (sharded with an index past max_shard_bytes) for transformers."""
    from safetensors.numpy import save_file

    cfg = model.config
    hf_config = config_to_hf(cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    weights = _TO_HF[cfg.family](to_numpy_state_dict(model), cfg)
    # safetensors writes raw buffers: transposed views must be made contiguous first
    weights = {k: np.ascontiguousarray(v) for k, v in weights.items()}
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
