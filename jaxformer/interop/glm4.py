"""GLM-4 (Glm4ForCausalLM): four norms a block, partial interleaved RoPE, fused gate_up_proj, q/k/v biases.

transformers' modeling_glm4.py: x = x + post_self_attn_layernorm(attn(input_layernorm(x))); x = x +
post_mlp_layernorm(mlp(post_attention_layernorm(x))): jaxformer's sandwich block, whose norms are named
post_attention_layernorm / pre_feedforward_layernorm / post_feedforward_layernorm, so three names map across.
RoPE rotates the first head_dim x partial_rotary_factor dims (0.5 by default) in interleaved pairs (read as
rotate-half by reordering those q/k rows, hf_config.deinterleave_rope). `gate_up_proj` [2F, D] holds gate rows, then
up. `attention_bias` is on q/k/v only.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         deinterleave_rope, partial_rotary_factor, prefixed, rope_from_hf, rope_to_hf,
                                         unprefixed)

# transformers' norm names -> jaxformer's sandwich names (input_layernorm is the same in both)
NORMS = {"post_self_attn_layernorm": "post_attention_layernorm", "post_attention_layernorm": "pre_feedforward_layernorm",
         "post_mlp_layernorm": "post_feedforward_layernorm"}
_NORM = re.compile(r"(layers\.\d+)\.(\w+)\.weight")
_GATE_UP = re.compile(r"(layers\.\d+)\.mlp\.gate_up_proj\.weight")


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    theta, scaling = rope_from_hf(hf, partial_ok=True)
    return ModelConfig.llama(
        **decoder_fields(hf), activation=activation(hf, "hidden_act"), norm_placement="sandwich", export_as="glm4",
        rope=dict(theta=theta, scaling=scaling, partial_factor=partial_rotary_factor(hf)),
        attention=dict(qkv_bias=bool(hf.get("attention_bias", False))))


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**decoder_to_hf(cfg, FAMILY), "hidden_act": ACT_TO_HF[cfg.activation],
            "rope_parameters": {**rope_to_hf(cfg.rope.theta, cfg.rope.scaling),
                                "partial_rotary_factor": cfg.rope.partial_factor},
            "partial_rotary_factor": cfg.rope.partial_factor, "attention_bias": cfg.attention.qkv_bias,
            "pad_token_id": None}


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = {}
    for key, v in unprefixed(sd, cfg).items():
        norm, gate_up = _NORM.fullmatch(key), _GATE_UP.fullmatch(key)
        if gate_up:  # [2F, D]: gate rows, then up
            gate, up = np.split(v, 2, axis=0)
            out.update({f"{gate_up[1]}.mlp.gate_proj.weight": gate, f"{gate_up[1]}.mlp.up_proj.weight": up})
        elif norm and norm[2] in NORMS:
            out[f"{norm[1]}.{NORMS[norm[2]]}.weight"] = v
        else:
            out[key] = v
    return deinterleave_rope(out, cfg)


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    back = {b: a for a, b in NORMS.items()}
    out = {}
    for key, v in deinterleave_rope(sd, cfg, inverse=True).items():
        norm = _NORM.fullmatch(key)
        out[f"{norm[1]}.{back[norm[2]]}.weight" if norm and norm[2] in back else key] = v
    for i in range(cfg.n_layers):
        p = f"layers.{i}.mlp."
        out[p + "gate_up_proj.weight"] = np.concatenate([out.pop(p + "gate_proj.weight"), out.pop(p + "up_proj.weight")])
    return prefixed(out, cfg)


FAMILY = Family("glm4", "Glm4ForCausalLM", _config_from_hf, _config_to_hf, _from_hf, _to_hf)
FAMILIES = {"glm4": FAMILY}
