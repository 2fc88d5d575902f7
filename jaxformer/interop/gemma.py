"""Gemma (1), Gemma 2 and Gemma 3 text models: GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM.

What sets them apart (transformers' modeling_gemma*.py): RMSNorm scaling by (1 + weight) in float32,
embeddings times sqrt(hidden_size), GeGLU (tanh GELU, gated), head_dim apart from hidden / heads.
Gemma 2 adds sandwich norms, attention scores scaled by query_pre_attn_scalar ** -0.5, tanh soft-caps
on attention scores and final logits, and sliding windows on every other layer. Gemma 3 adds per-head
q/k RMSNorm, five sliding layers to one full one, and a RoPE base of its own for sliding layers.
"""

from __future__ import annotations

from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, activation, decoder_fields, decoder_to_hf,
                                         layer_types_from_hf, llama_style_family, require, rope_by_layer_type,
                                         rope_from_hf, rope_to_hf, rope_to_hf_by_layer_type)
from jaxformer.interop.state_dict import UnsupportedCheckpointError

SLIDING_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # transformers' default: layer i slides unless (i+1) % p == 0


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf["model_type"]
    require(hf, "attention_bias", lambda v: not v, False, "Gemma has no biases in jaxformer")
    act = activation({**hf, "hidden_act": "gelu_pytorch_tanh" if hf.get("hidden_act") == "gelu" else
                      hf.get("hidden_act")}, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
    fields: dict[str, Any] = dict(norm_unit_offset=True, scale_embedding=True, activation=act,
                                  tie_embeddings=hf.get("tie_word_embeddings", True))
    if model_type == "gemma":
        theta, scaling = rope_from_hf(hf)
        return ModelConfig.llama(**{**decoder_fields(hf), **fields}, rope_theta=theta, rope_scaling=scaling)
    window = hf.get("sliding_window", 4096)
    pattern = hf.get("sliding_window_pattern", SLIDING_PATTERN[model_type])
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(hf["num_hidden_layers"])]
    fields.update(norm_placement="sandwich", query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                  sliding_window=window, layer_types=layer_types_from_hf({"layer_types": layer_types}, window))
    if model_type == "gemma2":
        theta, scaling = rope_from_hf(hf)
        fields.update(attn_logit_softcap=hf.get("attn_logit_softcapping", 50.0),
                      final_logit_softcap=hf.get("final_logit_softcapping", 30.0))
    else:  # gemma3_text
        require(hf, "use_bidirectional_attention", lambda v: not v, False, "only causal attention")
        theta, scaling, local_theta = rope_by_layer_type(hf, 1_000_000.0, "rope_local_base_freq")
        fields.update(qk_norm="head", rope_local_theta=local_theta,
                      attn_logit_softcap=hf.get("attn_logit_softcapping"),
                      final_logit_softcap=hf.get("final_logit_softcapping"))
    if window is None and "sliding_attention" in layer_types:
        raise UnsupportedCheckpointError(f"{model_type} has sliding layers but sliding_window=null")
    return ModelConfig.llama(**{**decoder_fields(hf), **fields}, rope_theta=theta, rope_scaling=scaling)


def _config_to_hf(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    out = {**decoder_to_hf(cfg, family), "attention_bias": False}
    act = ACT_TO_HF[cfg.activation]
    if family.model_type == "gemma":
        return {**out, "hidden_act": act, "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling)}
    out.update(hidden_activation=act, query_pre_attn_scalar=cfg.attention.query_pre_attn_scalar or cfg.head_dim,
               sliding_window=cfg.attention.sliding_window or cfg.max_seq_len,  # transformers always builds the mask
               layer_types=[cfg.layer_type(i) for i in range(cfg.n_layers)],
               attn_logit_softcapping=cfg.attention.logit_softcap, final_logit_softcapping=cfg.final_logit_softcap)
    if family.model_type == "gemma2":
        return {**out, "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling)}
    return {**out, "rope_parameters": rope_to_hf_by_layer_type(cfg)}


FAMILIES = {t: llama_style_family(t, arch, _config_from_hf, _config_to_hf) for t, arch in (
    ("gemma", "GemmaForCausalLM"),
    ("gemma2", "Gemma2ForCausalLM"),
    ("gemma3_text", "Gemma3ForCausalLM"),
)}
