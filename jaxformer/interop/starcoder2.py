"""StarCoder2 (Starcoder2ForCausalLM): LayerNorm with biases, a non-gated GELU MLP (c_fc, c_proj), biases on every
projection (`use_bias`), and an optional sliding window on every layer.

transformers' modeling_starcoder2.py: pre-norm blocks with nn.LayerNorm (eps `norm_epsilon`), q/k/v/o and
c_fc/c_proj biased together by `use_bias`, `hidden_act` gelu_pytorch_tanh, the embedding tied by default.
jaxformer's MLP names its non-gated projections up_proj / down_proj: c_fc / c_proj are renamed both ways.
"""

from __future__ import annotations

from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         prefixed, renamed, rope_from_hf, rope_to_hf, unprefixed)

RENAMES = {".mlp.c_fc.": ".mlp.up_proj.", ".mlp.c_proj.": ".mlp.down_proj."}


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    theta, scaling = rope_from_hf(hf)
    fields = {**decoder_fields(hf), "norm_eps": hf.get("norm_epsilon", 1e-5),
              "tie_embeddings": hf.get("tie_word_embeddings", True)}
    return ModelConfig(**fields, position="rope", norm="layernorm", gated_mlp=False,
                       activation=activation(hf, "hidden_act", default="gelu_pytorch_tanh"),
                       use_bias=bool(hf.get("use_bias", True)), rope=dict(theta=theta, scaling=scaling),
                       attention=dict(sliding_window=hf.get("sliding_window")), export_as="starcoder2")


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = decoder_to_hf(cfg, FAMILY)
    del out["rms_norm_eps"]
    return {**out, "norm_epsilon": cfg.norm_eps, "hidden_act": ACT_TO_HF[cfg.activation], "use_bias": cfg.use_bias,
            "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling),
            "sliding_window": cfg.attention.sliding_window}


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    return renamed(unprefixed(sd, cfg), RENAMES)


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    return prefixed(renamed(sd, {b: a for a, b in RENAMES.items()}), cfg)


FAMILY = Family("starcoder2", "Starcoder2ForCausalLM", _config_from_hf, _config_to_hf, _from_hf, _to_hf)
FAMILIES = {"starcoder2": FAMILY}
