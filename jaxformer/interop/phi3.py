"""Phi-3 (Phi3ForCausalLM): a Llama-style decoder whose q/k/v and gate/up projections are stored fused.

transformers' modeling_phi3.py: `qkv_proj` is [N*H + 2*K*H, D] (q rows, then k, then v) and `gate_up_proj`
[2F, D] (gate rows, then up). They are split on import and fused again on export; everything else reads as
Llama. Long-context checkpoints carry `longrope` scaling (short/long factors, chosen by sequence length),
and Phi-3-mini a sliding window on every layer.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         partial_rotary_factor, prefixed, require, rope_from_hf, rope_to_hf,
                                         unprefixed)

_FUSED = re.compile(r"layers\.(\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight")


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    require(hf, "attention_bias", lambda v: not v, False, "Phi-3 has no biases")
    theta, scaling = rope_from_hf(hf, partial_ok=True)
    return ModelConfig.llama(**decoder_fields({**hf, "rms_norm_eps": hf.get("rms_norm_eps", 1e-5)}),
                             activation=activation(hf, "hidden_act"),
                             rope=dict(theta=theta, scaling=scaling, partial_factor=partial_rotary_factor(hf)),
                             sliding_window=hf.get("sliding_window"), export_as="phi3")


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rope = rope_to_hf(cfg.rope.theta, cfg.rope.scaling)
    original = (cfg.rope.scaling.original_max_position_embeddings if cfg.rope.scaling else None) or cfg.max_seq_len
    return {**decoder_to_hf(cfg, FAMILY), "hidden_act": ACT_TO_HF[cfg.activation], "rope_parameters": rope,
            "original_max_position_embeddings": original, "sliding_window": cfg.attention.sliding_window,
            "attention_bias": False, "pad_token_id": None, "partial_rotary_factor": cfg.rope.partial_factor}


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = {}
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    for key, v in unprefixed(sd, cfg).items():
        m = _FUSED.fullmatch(key)
        if m is None:
            out[key] = v
        elif m[2] == "self_attn.qkv_proj":  # [N*H + 2*K*H, D]
            q, k, w = np.split(v, [N * H, N * H + K * H], axis=0)
            out.update({f"layers.{m[1]}.self_attn.{n}_proj.weight": x for n, x in zip("qkv", (q, k, w))})
        else:  # [2F, D]: gate rows, then up
            gate, up = np.split(v, 2, axis=0)
            out.update({f"layers.{m[1]}.mlp.gate_proj.weight": gate, f"layers.{m[1]}.mlp.up_proj.weight": up})
    return out


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    sd = dict(sd)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        sd[p + "self_attn.qkv_proj.weight"] = np.concatenate(
            [sd.pop(f"{p}self_attn.{n}_proj.weight") for n in "qkv"], axis=0)
        sd[p + "mlp.gate_up_proj.weight"] = np.concatenate(
            [sd.pop(f"{p}mlp.gate_proj.weight"), sd.pop(f"{p}mlp.up_proj.weight")], axis=0)
    return prefixed(sd, cfg)


FAMILY = Family("phi3", "Phi3ForCausalLM", _config_from_hf, _config_to_hf, _from_hf, _to_hf)
FAMILIES = {"phi3": FAMILY}
