"""LFM2 (Lfm2ForCausalLM): gated short-convolution layers with a few attention layers between them.

transformers' modeling_lfm2.py: each layer is x + mixer(operator_norm(x)), then x + feed_forward(ffn_norm(x)),
the mixer a `conv` (Lfm2ShortConv: jaxformer's models/short_conv.py, same names) or `self_attn` with per-head
q/k RMSNorms (`q_layernorm`, `k_layernorm`) before RoPE and an `out_proj`. The MLP is SwiGLU as w1 (gate), w3 (up),
w2 (down), `intermediate_size` shrunk to 2/3 and rounded up to `block_multiple_of` when `block_auto_adjust_ff_dim`;
the final norm is `embedding_norm`. `layer_types` says which layers attend ("full_attention") and which convolve
("conv"); older configs list the attention layers in `full_attn_idxs`.
"""

from __future__ import annotations

from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (Family, StateDict, decoder_fields, decoder_to_hf, prefixed, renamed,
                                         rope_from_hf, rope_to_hf, unprefixed)

DEFAULT_THETA = 1_000_000.0  # Lfm2Config.default_theta
# transformers' names -> jaxformer's (applied to keys without "model.")
RENAMES = {".operator_norm.": ".input_layernorm.", ".ffn_norm.": ".post_attention_layernorm.",
           ".feed_forward.w1.": ".mlp.gate_proj.", ".feed_forward.w3.": ".mlp.up_proj.",
           ".feed_forward.w2.": ".mlp.down_proj.", ".self_attn.q_layernorm.": ".self_attn.q_norm.",
           ".self_attn.k_layernorm.": ".self_attn.k_norm.", ".self_attn.out_proj.": ".self_attn.o_proj."}
FINAL_NORM = ("embedding_norm.weight", "norm.weight")  # transformers' final norm, jaxformer's


def mlp_width(hf: dict[str, Any]) -> int:
    """The MLP's hidden width as Lfm2MLP computes it from intermediate_size."""
    width = hf.get("block_ff_dim", hf.get("intermediate_size"))  # older configs' name for it, which wins there
    if hf.get("block_auto_adjust_ff_dim", True):
        width = int(2 * width / 3)
        if hf.get("block_ffn_dim_multiplier", 1.0) is not None:
            width = int(hf.get("block_ffn_dim_multiplier", 1.0) * width)
            multiple = hf.get("block_multiple_of", 256)
            width = multiple * ((width + multiple - 1) // multiple)
    return width


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        attends = hf.get("full_attn_idxs")
        attends = range(n) if attends is None else attends
        types = ["full_attention" if i in attends else "conv" for i in range(n)]
    theta, scaling = rope_from_hf({**hf, "rope_theta": hf.get("rope_theta", DEFAULT_THETA)})
    fields = decoder_fields({**hf, "intermediate_size": mlp_width(hf), "rms_norm_eps": hf.get("norm_eps", 1e-5),
                             "tie_word_embeddings": hf.get("tie_word_embeddings", hf.get("tie_embedding", True))})
    return ModelConfig.llama(**fields, activation="silu", export_as="lfm2", layer_types=tuple(types),
                             rope=dict(theta=theta, scaling=scaling), attention=dict(qk_norm="head"),
                             conv=dict(kernel=hf.get("conv_L_cache", 3), bias=bool(hf.get("conv_bias", False)))
                             if "conv" in types else {})


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = decoder_to_hf(cfg, FAMILY)
    out.pop("rms_norm_eps")
    return {**out, "norm_eps": cfg.norm_eps, "block_auto_adjust_ff_dim": False,
            "layer_types": [cfg.layer_type(i) for i in range(cfg.n_layers)],
            "conv_L_cache": cfg.conv.kernel or 3, "conv_bias": cfg.conv.bias,
            "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling)}


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = renamed(unprefixed(sd, cfg), RENAMES)
    out[FINAL_NORM[1]] = out.pop(FINAL_NORM[0])
    return out


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = renamed(sd, {new: old for old, new in RENAMES.items()})
    out[FINAL_NORM[0]] = out.pop(FINAL_NORM[1])
    return prefixed(out, cfg)


FAMILY = Family("lfm2", "Lfm2ForCausalLM", _config_from_hf, _config_to_hf, _from_hf, _to_hf)
FAMILIES = {"lfm2": FAMILY}
