"""OLMo 2 and OLMo 3 (Olmo2ForCausalLM, Olmo3ForCausalLM): Llama-style decoders with norms after each sub-layer
and q/k RMSNorm over whole projections.

transformers' modeling_olmo2.py: x = x + post_attention_layernorm(attn(x)); x = x +
post_feedforward_layernorm(mlp(x)) (no norm before either), and q_norm / k_norm normalise the full
q projection (N*H) and k projection (K*H) before the heads are split and rotated. modeling_olmo3.py adds
sliding-window layers (`layer_types`, three sliding to one full by default) whose RoPE is its own entry of
`rope_parameters` (the full layers' may be scaled, e.g. yarn for OLMo 3's long context).
"""

from __future__ import annotations

from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, activation, decoder_fields, decoder_to_hf,
                                         layer_types_from_hf, llama_style_family, require, rope_by_layer_type,
                                         rope_from_hf, rope_to_hf, rope_to_hf_by_layer_type)


OLMO3_THETA = 500_000.0  # Olmo3Config.default_theta: the base of a missing rope_theta and of sliding layers in the
# older flat spelling


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf["model_type"]
    require(hf, "attention_bias", lambda v: not v, False, f"{model_type} has no biases in jaxformer")
    fields: dict[str, Any] = dict(norm_placement="post", attention=dict(qk_norm="proj"))
    if model_type == "olmo2":
        theta, scaling = rope_from_hf(hf)
        fields["rope"] = dict(theta=theta, scaling=scaling)
    else:  # olmo3
        theta, scaling, local_theta = rope_by_layer_type(hf, OLMO3_THETA, legacy_local_theta=OLMO3_THETA)
        window = hf.get("sliding_window")
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 4 else "full_attention"
                                          for i in range(hf["num_hidden_layers"])]
        fields.update(rope=dict(theta=theta, scaling=scaling, local_theta=local_theta), export_as="olmo3",
                      layer_types=layer_types_from_hf({"layer_types": types}, window))
        fields["attention"].update(sliding_window=window if "sliding_attention" in types else None)
    return ModelConfig.llama(**decoder_fields(hf), activation=activation(hf, "hidden_act"), **fields)


def _config_to_hf(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    out = {**decoder_to_hf(cfg, family), "hidden_act": ACT_TO_HF[cfg.activation], "attention_bias": False}
    if family.model_type == "olmo2":
        return {**out, "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling)}
    return {**out, "rope_parameters": rope_to_hf_by_layer_type(cfg),
            "sliding_window": cfg.attention.sliding_window or cfg.max_seq_len,  # transformers always builds the mask
            "layer_types": [cfg.layer_type(i) for i in range(cfg.n_layers)]}


FAMILIES = {t: llama_style_family(t, arch, _config_from_hf, _config_to_hf) for t, arch in (
    ("olmo2", "Olmo2ForCausalLM"),
    ("olmo3", "Olmo3ForCausalLM"),
)}
