"""Qwen3.5 and Qwen3-Next: three Gated DeltaNet layers before each gated full-attention layer.

transformers' modeling_qwen3_5.py (Qwen3_5ForCausalLM, `qwen3_5_text`; the published Qwen3_5ForConditionalGeneration
`qwen3_5` holds it as text_config, weights under model.language_model.), modeling_qwen3_5_moe.py (`qwen3_5_moe_text`,
`qwen3_5_moe`) and modeling_qwen3_next.py (Qwen3NextForCausalLM) are the specification:
- `layer_types` name each layer linear_attention (a Gated DeltaNet: jaxformer's models/delta_net.py, with
  Qwen3.5's parameter names) or full_attention (q_proj emits a gate per head, sigmoid(gate) scales the output:
  attention.output_gate; per-head q/k norms; RoPE on partial_rotary_factor of each head);
- every RMSNorm scales by (1 + weight) in float32 (norm_unit_offset), except the DeltaNet's gated norm;
- MoE layers (Qwen3.5-MoE: every layer; Qwen3-Next: decoder_sparse_step / mlp_only_layers) route as Qwen2-MoE
  (softmax over all experts, top-k, renormalised) beside a shared expert gated by sigmoid(shared_expert_gate(x)).
Qwen3-Next fuses the DeltaNet's input projections per key head: `in_proj_qkvz` rows [q_g | k_g | v_g | z_g] and
`in_proj_ba` rows [b_g | a_g] for each of the key heads g (v, z, b, a holding that head's value heads); import
reorders them into Qwen3.5's in_proj_qkv [all q | all k | all v], in_proj_z, in_proj_b, in_proj_a, export back.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.interop import moe
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         prefixed, require, rope_from_hf, rope_to_hf,
                                         text_model_config, unprefixed)

ARCHITECTURES = {"qwen3_5_text": "Qwen3_5ForCausalLM", "qwen3_5": "Qwen3_5ForConditionalGeneration",
                 "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
                 "qwen3_next": "Qwen3NextForCausalLM"}
WRAPPED = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}  # multimodal wrapper -> its text model
_FUSED = re.compile(r"(layers\.\d+\.linear_attn)\.in_proj_(qkvz|ba)\.weight")


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    wrapper = hf.get("model_type")
    if wrapper in WRAPPED:  # a multimodal checkpoint: its text model
        hf = text_model_config(hf, wrapper, WRAPPED[wrapper], tie_default=False)
    model_type = hf["model_type"]
    require(hf, "attention_bias", lambda v: not v, False, f"{model_type} has no attention biases in jaxformer")
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["linear_attention" if (i + 1) % hf.get("full_attention_interval", 4)
                                      else "full_attention" for i in range(n)]
    params = hf.get("rope_parameters") or {}
    theta, scaling = rope_from_hf(hf, {k: v for k, v in params.items()
                                       if k not in ("mrope_section", "mrope_interleaved", "partial_rotary_factor")},
                                  partial_ok=True)
    if not hf.get("intermediate_size"):  # Qwen3.5-MoE's config.json has none: every layer is sparse
        hf = {**hf, "intermediate_size": hf["moe_intermediate_size"]}
    fields = dict(decoder_fields(hf), activation=activation(hf, "hidden_act"), norm_unit_offset=True,
                  export_as=model_type if model_type not in WRAPPED else WRAPPED[model_type],
                  layer_types=tuple(types), attention=dict(qk_norm="head", output_gate=True),
                  rope=dict(theta=theta, scaling=scaling,  # transformers' default share for these families: 1/4
                            partial_factor=params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))),
                  linear=dict(key_heads=hf["linear_num_key_heads"], value_heads=hf["linear_num_value_heads"],
                              key_head_dim=hf["linear_key_head_dim"], value_head_dim=hf["linear_value_head_dim"],
                              conv_kernel=hf.get("linear_conv_kernel_dim", 4)))
    if model_type in ("qwen3_5_moe_text", "qwen3_next"):
        fields["moe"] = dict(n_experts=hf["num_experts"], n_experts_per_token=hf["num_experts_per_tok"],
                             d_ff=hf["moe_intermediate_size"], shared_d_ff=hf["shared_expert_intermediate_size"],
                             shared_gate=True, router="qwen", aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                             norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                             every=hf.get("decoder_sparse_step", 1),  # transformers skips indices past the last layer
                             dense_layers=tuple(i for i in hf.get("mlp_only_layers") or () if i < n))
    return ModelConfig.llama(**fields)


def _config_to_hf(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    lin = cfg.linear
    out = {**decoder_to_hf(cfg, family), "hidden_act": ACT_TO_HF[cfg.activation], "attention_bias": False,
           "layer_types": [cfg.layer_type(i) for i in range(cfg.n_layers)],
           "rope_parameters": {**rope_to_hf(cfg.rope.theta, cfg.rope.scaling),
                               "partial_rotary_factor": cfg.rope.partial_factor},
           "linear_num_key_heads": lin.key_heads, "linear_num_value_heads": lin.value_heads,
           "linear_key_head_dim": lin.key_head_dim, "linear_value_head_dim": lin.value_head_dim,
           "linear_conv_kernel_dim": lin.conv_kernel}
    m = cfg.moe
    if m.n_experts:
        out.update(num_experts=m.n_experts, num_experts_per_tok=m.n_experts_per_token,
                   moe_intermediate_size=cfg.expert_d_ff, shared_expert_intermediate_size=m.shared_d_ff,
                   router_aux_loss_coef=m.aux_loss_coef)
        if family.model_type == "qwen3_next":
            out.update(norm_topk_prob=m.norm_topk_prob, decoder_sparse_step=m.every,
                       mlp_only_layers=list(m.dense_layers))
    return out


def _per_key_head(cfg: ModelConfig) -> tuple[int, int, int, int]:
    lin = cfg.linear
    return lin.key_heads, lin.key_head_dim, lin.value_heads // lin.key_heads, lin.value_head_dim


def _split_fused(key: str, kind: str, w: np.ndarray, cfg: ModelConfig) -> StateDict:
    """Qwen3-Next's per-key-head in_proj_qkvz / in_proj_ba [rows, D] -> Qwen3.5's in_proj_qkv, _z / _b, _a."""
    K, Dk, r, Dv = _per_key_head(cfg)
    D = w.shape[-1]
    if kind == "ba":
        b, a = np.split(w.reshape(K, 2 * r, D), 2, axis=1)  # [K, r, D] each
        return {f"{key}.in_proj_b.weight": b.reshape(K * r, D), f"{key}.in_proj_a.weight": a.reshape(K * r, D)}
    q, k, v, z = np.split(w.reshape(K, 2 * Dk + 2 * r * Dv, D), [Dk, 2 * Dk, 2 * Dk + r * Dv], axis=1)
    qkv = np.concatenate([q.reshape(K * Dk, D), k.reshape(K * Dk, D), v.reshape(K * r * Dv, D)])
    return {f"{key}.in_proj_qkv.weight": qkv, f"{key}.in_proj_z.weight": z.reshape(K * r * Dv, D)}


def _fuse(sd: StateDict, key: str, cfg: ModelConfig) -> StateDict:
    """The inverse of _split_fused for one layer's linear_attn."""
    K, Dk, r, Dv = _per_key_head(cfg)
    qkv, z = sd.pop(f"{key}.in_proj_qkv.weight"), sd.pop(f"{key}.in_proj_z.weight")
    b, a = sd.pop(f"{key}.in_proj_b.weight"), sd.pop(f"{key}.in_proj_a.weight")
    D = qkv.shape[-1]
    q, k, v = np.split(qkv, [K * Dk, 2 * K * Dk])
    qkvz = np.concatenate([q.reshape(K, Dk, D), k.reshape(K, Dk, D), v.reshape(K, r * Dv, D),
                           z.reshape(K, r * Dv, D)], axis=1).reshape(-1, D)
    ba = np.concatenate([b.reshape(K, r, D), a.reshape(K, r, D)], axis=1).reshape(-1, D)
    return {f"{key}.in_proj_qkvz.weight": qkvz, f"{key}.in_proj_ba.weight": ba}


def _text_weights(sd: StateDict) -> StateDict:
    """A multimodal checkpoint's text weights (model.language_model. -> model.; the vision tower left out)."""
    return {k.replace("model.language_model.", "model."): v for k, v in sd.items()
            if not k.startswith(("model.visual.", "mtp."))}


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out: StateDict = {}
    for key, v in _text_weights(sd).items():
        m = _FUSED.fullmatch(key.removeprefix("model."))
        if m:
            out.update({f"model.{k}": w for k, w in _split_fused(m[1], m[2], v, cfg).items()})
        else:
            out[key] = v
    return moe._from_hf(out, cfg) if cfg.moe.n_experts else unprefixed(out, cfg)


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = dict(sd)
    if cfg.family == "qwen3_next":
        for i in range(cfg.n_layers):
            if cfg.layer_type(i) == "linear_attention":
                out.update(_fuse(out, f"layers.{i}.linear_attn", cfg))
    return moe._to_hf(out, cfg) if cfg.moe.n_experts else prefixed(out, cfg)


def _family(model_type: str) -> Family:
    family = Family(model_type, ARCHITECTURES[model_type], _config_from_hf, lambda cfg: _config_to_hf(cfg, family),
                    _from_hf, _to_hf)
    return family


FAMILIES = {t: _family(t) for t in ARCHITECTURES}
