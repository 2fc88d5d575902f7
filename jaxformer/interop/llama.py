"""The Llama lineage: LlamaForCausalLM (Llama 2, 3.x with any RoPE scaling), Mistral, Qwen2 (q/k/v biases)
and Qwen3 (per-head q/k RMSNorm). Parameter names are jaxformer's with a "model." prefix.

transformers' modeling_llama.py, modeling_mistral.py, modeling_qwen2.py and modeling_qwen3.py are the
specification: Mistral slides every layer's window when `sliding_window` is set; Qwen2 and Qwen3 slide
the layers `layer_types` names (from `use_sliding_window` and `max_window_layers`); Qwen2 has biases on
q/k/v only; `attention_bias` (Llama, Qwen3) puts them on all four projections and needs `mlp_bias` alike,
as jaxformer has one use_bias switch for both.
"""

from __future__ import annotations

from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, activation, decoder_fields, decoder_to_hf,
                                         layer_types_from_hf, llama_style_family, require, rope_from_hf, rope_to_hf)


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf["model_type"]
    theta, scaling = rope_from_hf(hf)
    use_bias = False  # Mistral and Qwen2 have no switch: Qwen2's q/k/v biases are qkv_bias
    if model_type == "llama":
        use_bias = bool(hf.get("attention_bias", False))
        require(hf, "mlp_bias", lambda v: bool(v) == use_bias, False,
                f"it must equal attention_bias={use_bias}: jaxformer has one use_bias switch for both")
    if model_type == "qwen3":
        require(hf, "attention_bias", lambda v: not v, False, "Qwen3 with biases on the attention projections but "
                "not the MLP has no jaxformer equivalent")
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    if model_type == "llama":
        window = None
    layer_types = layer_types_from_hf(hf, window)
    if model_type in ("qwen2", "qwen3") and window is not None and layer_types is None:
        # transformers derives them: sliding from layer max_window_layers on
        start = hf.get("max_window_layers", 28)
        types = tuple("sliding_attention" if i >= start else "full_attention" for i in range(hf["num_hidden_layers"]))
        layer_types = types
    return ModelConfig.llama(
        **decoder_fields(hf), activation=activation(hf, "hidden_act"), rope_theta=theta, rope_scaling=scaling,
        use_bias=use_bias, qkv_bias=model_type == "qwen2", qk_norm="head" if model_type == "qwen3" else "none",
        sliding_window=window, layer_types=layer_types)


def _config_to_hf(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    out = {**decoder_to_hf(cfg, family), "hidden_act": ACT_TO_HF[cfg.activation],
           "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling)}
    if family.model_type in ("llama", "qwen3"):
        out["attention_bias"] = cfg.use_bias
    if family.model_type == "llama":
        out["mlp_bias"] = cfg.use_bias
    if family.model_type == "mistral":
        out["sliding_window"] = cfg.attention.sliding_window
    if family.model_type in ("qwen2", "qwen3"):
        out.update(use_sliding_window=cfg.attention.sliding_window is not None, sliding_window=cfg.attention.sliding_window,
                   max_window_layers=cfg.n_layers,
                   layer_types=[cfg.layer_type(i) for i in range(cfg.n_layers)])
    return out


FAMILIES = {t: llama_style_family(t, arch, _config_from_hf, _config_to_hf) for t, arch in (
    ("llama", "LlamaForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
)}
