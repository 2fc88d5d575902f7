"""OLMo 2 (Olmo2ForCausalLM): a Llama-style decoder with norms after each sub-layer and q/k RMSNorm over
whole projections.

transformers' modeling_olmo2.py: x = x + post_attention_layernorm(attn(x)); x = x +
post_feedforward_layernorm(mlp(x)) (no norm before either), and q_norm / k_norm normalise the full
q projection (N*H) and k projection (K*H) before the heads are split and rotated.
"""

from __future__ import annotations

from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, activation, decoder_fields, decoder_to_hf, prefixed,
                                         require, rope_from_hf, rope_to_hf, unprefixed)


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    require(hf, "attention_bias", lambda v: not v, False, "OLMo 2 has no biases in jaxformer")
    theta, scaling = rope_from_hf(hf)
    return ModelConfig.llama(**decoder_fields(hf), activation=activation(hf, "hidden_act"), rope_theta=theta,
                             rope_scaling=scaling, norm_placement="post", qk_norm="proj")


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**decoder_to_hf(cfg, FAMILY), "hidden_act": ACT_TO_HF[cfg.activation],
            "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling), "attention_bias": False}


FAMILY = Family("olmo2", "Olmo2ForCausalLM", _config_from_hf, _config_to_hf, unprefixed, prefixed)
FAMILIES = {"olmo2": FAMILY}
