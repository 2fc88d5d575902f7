"""EXAONE 4.0 (Exaone4ForCausalLM): OLMo 2's post-norms with per-head q/k RMSNorm, sliding-window layers, and no
RoPE on the full-attention layers.

transformers' modeling_exaone4.py: x = x + post_attention_layernorm(attn(x)); x = x +
post_feedforward_layernorm(mlp(x)); q_norm / k_norm over each head before RoPE; `layer_types` from
`sliding_window_pattern` (every pattern-th layer full). RoPE applies when `sliding_window` is null (every layer)
or on sliding layers only: with a window, full layers see no positions (NoPE), as `rope.nope_layers` says.
"""

from __future__ import annotations

from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, activation, decoder_fields, decoder_to_hf,
                                         layer_types_from_hf, prefixed, rope_from_hf, rope_to_hf, unprefixed)


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    n, window = hf["num_hidden_layers"], hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is None:
        pattern = hf.get("sliding_window_pattern", 4) if window is not None else 0
        types = ["sliding_attention" if pattern and (i + 1) % pattern else "full_attention" for i in range(n)]
    theta, scaling = rope_from_hf(hf)
    nope = [i for i, t in enumerate(types) if t == "full_attention"] if window is not None else []
    return ModelConfig.llama(**decoder_fields(hf), activation=activation(hf, "hidden_act"), norm_placement="post",
                             rope=dict(theta=theta, scaling=scaling, nope_layers=nope),
                             attention=dict(qk_norm="head",
                                            sliding_window=window if "sliding_attention" in types else None),
                             layer_types=layer_types_from_hf({"layer_types": types}, window), export_as="exaone4")


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    # full layers without RoPE need a window in config.json (any: no layer slides when all are full)
    window = cfg.attention.sliding_window or (cfg.max_seq_len if cfg.rope.nope_layers else None)
    return {**decoder_to_hf(cfg, FAMILY), "hidden_act": ACT_TO_HF[cfg.activation],
            "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling), "sliding_window": window,
            "layer_types": [cfg.layer_type(i) for i in range(cfg.n_layers)]}


FAMILY = Family("exaone4", "Exaone4ForCausalLM", _config_from_hf, _config_to_hf, unprefixed, prefixed)
FAMILIES = {"exaone4": FAMILY}
