"""GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm, GELU MLP, biases everywhere, a tied head.

transformers' modeling_gpt2.py stores q/k/v fused in `c_attn` and every projection as Conv1D, weight [in, out]:
split and transposed here alone, so that jaxformer's own names and [out, in] layout hold everywhere else.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import Family, StateDict
from jaxformer.interop.state_dict import UnsupportedCheckpointError

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                    "silu": "silu", "swish": "silu"}


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
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
        init_std=hf.get("initializer_range", 0.02))


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[cfg.activation]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "dtype": cfg.param_dtype,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len, "activation_function": act, "layer_norm_epsilon": cfg.norm_eps,
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}


_GPT2_RENAMES = [  # (HF suffix, jaxformer suffix, Conv1D weight to transpose)
    ("wte.weight", "embed_tokens.weight", False), ("wpe.weight", "embed_positions.weight", False),
    ("ln_f.weight", "norm.weight", False), ("ln_f.bias", "norm.bias", False),
    ("ln_1.weight", "input_layernorm.weight", False), ("ln_1.bias", "input_layernorm.bias", False),
    ("ln_2.weight", "post_attention_layernorm.weight", False), ("ln_2.bias", "post_attention_layernorm.bias", False),
    ("attn.c_proj.weight", "self_attn.o_proj.weight", True), ("attn.c_proj.bias", "self_attn.o_proj.bias", False),
    ("mlp.c_fc.weight", "mlp.up_proj.weight", True), ("mlp.c_fc.bias", "mlp.up_proj.bias", False),
    ("mlp.c_proj.weight", "mlp.down_proj.weight", True), ("mlp.c_proj.bias", "mlp.down_proj.bias", False),
]


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
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


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
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


FAMILY = Family("gpt2", "GPT2LMHeadModel", _config_from_hf, _config_to_hf, _from_hf, _to_hf)
FAMILIES = {"gpt2": FAMILY}
