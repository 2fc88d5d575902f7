"""Command R7B / Command A (Cohere2ForCausalLM): a parallel block, LayerNorm without bias, interleaved RoPE on the
sliding layers only, scaled logits.

transformers' modeling_cohere2.py: x = x + attn(input_layernorm(x)) + mlp(input_layernorm(x)) (one norm, both
branches: norm_placement "parallel"); Cohere2LayerNorm subtracts the mean and scales, no bias
("layernorm_nobias"); RoPE with interleaved pairs (read as rotate-half by reordering q/k rows) on sliding-window
layers, none on full ones (rope.nope_layers); logits times `logit_scale` (scales.logits); embeddings tied.
`attention_bias` would bias all four attention projections but not the MLP, which jaxformer cannot express.
"""

from __future__ import annotations

from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         deinterleave_rope, layer_types_from_hf, prefixed, require, rope_from_hf,
                                         rope_to_hf, unprefixed)


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    require(hf, "attention_bias", lambda v: not v, False, "Cohere 2 biases its attention but not its MLP; jaxformer "
            "has biases on every projection or on q/k/v only")
    n, window = hf["num_hidden_layers"], hf.get("sliding_window")
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % hf.get("sliding_window_pattern", 4)
                                      else "full_attention" for i in range(n)]
    theta, scaling = rope_from_hf(hf)
    fields = {**decoder_fields(hf), "norm_eps": hf.get("layer_norm_eps", 1e-5),
              "tie_embeddings": hf.get("tie_word_embeddings", True)}
    return ModelConfig.llama(
        **fields, norm="layernorm_nobias", norm_placement="parallel", activation=activation(hf, "hidden_act"),
        rope=dict(theta=theta, scaling=scaling, nope_layers=[i for i, t in enumerate(types) if t == "full_attention"]),
        attention=dict(sliding_window=window if "sliding_attention" in types else None),
        layer_types=layer_types_from_hf({"layer_types": types}, window),
        scales=dict(logits=float(hf.get("logit_scale", 0.0625))), export_as="cohere2")


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = decoder_to_hf(cfg, FAMILY)
    del out["rms_norm_eps"]
    return {**out, "layer_norm_eps": cfg.norm_eps, "hidden_act": ACT_TO_HF[cfg.activation],
            "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling), "logit_scale": cfg.scales.logits,
            "sliding_window": cfg.attention.sliding_window or cfg.max_seq_len,  # transformers always builds the mask
            "layer_types": [cfg.layer_type(i) for i in range(cfg.n_layers)], "attention_bias": False}


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    return deinterleave_rope(unprefixed(sd, cfg), cfg)


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    return prefixed(deinterleave_rope(sd, cfg, inverse=True), cfg)


FAMILY = Family("cohere2", "Cohere2ForCausalLM", _config_from_hf, _config_to_hf, _from_hf, _to_hf)
FAMILIES = {"cohere2": FAMILY}
