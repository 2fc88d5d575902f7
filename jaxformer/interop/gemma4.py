"""Gemma 4 text models: Gemma4ForCausalLM (`gemma4_text`), and the text part of Gemma4ForConditionalGeneration
(`gemma4`, the published checkpoints: config.json's text_config, weights under model.language_model.; the vision and
audio towers are left out).

transformers' modeling_gemma4.py, field by field (jaxformer.models.gemma4 computes it):
  global_head_dim / num_global_key_value_heads   full-attention layers' head size and (with attention_k_eq_v) kv
      heads; transformers 5 stores them as per_layer_config on save, published configs as these two fields
  attention_k_eq_v          full layers have no v_proj: values are the key projection
  num_kv_shared_layers      the last N layers reuse the last earlier layer of their type's keys and values
  hidden_size_per_layer_input, vocab_size_per_layer_input   per-layer input embeddings (0: none)
  use_double_wide_mlp       kv-shared layers' MLPs are 2 x intermediate_size
  enable_moe_block          every layer runs num_experts experts (top_k_experts, moe_intermediate_size) beside its MLP
  rope_parameters           per layer type; full layers "proportional" with a partial_rotary_factor
Scores are scaled by 1 (q/k are RMS-normed per head, values too without a weight); layer_scalar is a stored buffer.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxformer.config import ModelConfig, RopeScaling
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         prefixed, require, text_model_config, unprefixed)
from jaxformer.interop.state_dict import UnsupportedCheckpointError

GLOBAL_HEAD_DIM = 512  # Gemma4TextConfig's default when a config names neither it nor per_layer_config


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = text_model_config(hf, "gemma4", "gemma4_text", tie_default=True)  # a multimodal checkpoint: its text model
    require(hf, "attention_bias", lambda v: not v, False, "Gemma 4 has no attention biases in jaxformer")
    require(hf, "use_bidirectional_attention", lambda v: v in (None, "vision"), None,
            "only causal text attention ('vision' makes image tokens bidirectional; text stays causal)")
    L = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(L)]
    layer_types = [*layer_types[:-1], "full_attention"]  # transformers forces the last layer to full attention
    k_eq_v = bool(hf.get("attention_k_eq_v", False))
    global_head_dim, global_kv = hf.get("global_head_dim", GLOBAL_HEAD_DIM), hf.get("num_global_key_value_heads")
    if "per_layer_config" in hf:  # what transformers 5 writes: per layer overrides (none when they equal the base)
        overrides = {int(i): dict(v) for i, v in (hf["per_layer_config"] or {}).items()}
        full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
        kinds = {tuple(sorted(v.items())) for v in overrides.values()}
        if overrides and (sorted(overrides) != full or len(kinds) != 1
                          or not set(overrides[full[0]]) <= {"head_dim", "num_key_value_heads"}):
            raise UnsupportedCheckpointError(f"gemma4_text per_layer_config={hf['per_layer_config']} is not "
                                             "supported; jaxformer takes one head_dim / num_key_value_heads override "
                                             "shared by every full-attention layer")
        same = overrides.get(full[0], {}) if overrides else {}
        global_head_dim, global_kv = same.get("head_dim", hf.get("head_dim")), same.get("num_key_value_heads")
    elif not k_eq_v:
        global_kv = None  # transformers applies num_global_key_value_heads with attention_k_eq_v only
    rp = hf.get("rope_parameters") or {}
    full_rope, local_rope = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    if local_rope.get("rope_type", "default") != "default":
        raise UnsupportedCheckpointError(f"gemma4_text sliding layers' rope_type={local_rope['rope_type']!r} is not "
                                         "supported; only the default RoPE on sliding layers")
    kind = full_rope.get("rope_type", "default")
    if kind not in ("default", "proportional"):
        raise UnsupportedCheckpointError(f"gemma4_text full layers' rope_type={kind!r} is not supported; supported: "
                                         "default, proportional")
    scaling = None if kind == "default" else RopeScaling(
        rope_type="proportional", factor=float(full_rope.get("factor", 1.0)),
        partial_rotary_factor=float(full_rope.get("partial_rotary_factor", 1.0)))
    moe = {}
    if hf.get("enable_moe_block"):
        moe = dict(n_experts=hf["num_experts"], n_experts_per_token=hf["top_k_experts"], d_ff=hf["moe_intermediate_size"],
                   router="gemma4", norm_topk_prob=True, aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)))
    window = hf.get("sliding_window", 512)
    fields = {**decoder_fields(hf), "tie_embeddings": hf.get("tie_word_embeddings", True)}
    return ModelConfig.llama(
        **fields, activation=activation(hf, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh"),
        export_as="gemma4_text", block="gemma4",
        norm_placement="sandwich", scale_embedding=True, final_logit_softcap=hf.get("final_logit_softcapping"),
        layer_types=layer_types if "sliding_attention" in layer_types else None,
        per_layer_dim=hf.get("hidden_size_per_layer_input") or 0,
        per_layer_vocab_size=hf.get("vocab_size_per_layer_input") if hf.get("hidden_size_per_layer_input") else None,
        kv_shared_layers=hf.get("num_kv_shared_layers", 0),
        double_wide_shared_mlp=bool(hf.get("use_double_wide_mlp", False)) and hf.get("num_kv_shared_layers", 0) > 0,
        rope=dict(theta=float(full_rope.get("rope_theta", 1_000_000.0)), scaling=scaling,
                  local_theta=float(local_rope.get("rope_theta", 10_000.0))),
        attention=dict(qk_norm="head", v_norm=True, scale=1.0, k_eq_v=k_eq_v, global_head_dim=global_head_dim,
                       global_kv_heads=global_kv, sliding_window=window if "sliding_attention" in layer_types else None),
        moe=moe)


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    attn, m = cfg.attention, cfg.moe
    full = {"rope_type": "default", "rope_theta": cfg.rope.theta}
    if cfg.rope.scaling is not None:
        full = {"rope_type": "proportional", "rope_theta": cfg.rope.theta,
                "partial_rotary_factor": cfg.rope.scaling.partial_rotary_factor}
        if cfg.rope.scaling.factor != 1.0:
            full["factor"] = cfg.rope.scaling.factor
    out = {**decoder_to_hf(cfg, FAMILY), "hidden_activation": ACT_TO_HF[cfg.activation], "attention_bias": False,
           "final_logit_softcapping": cfg.final_logit_softcap,
           "layer_types": [cfg.layer_type(i) for i in range(cfg.n_layers)],
           "sliding_window": attn.sliding_window or cfg.max_seq_len,
           "rope_parameters": {"full_attention": full, "sliding_attention": {
               "rope_type": "default", "rope_theta": cfg.rope.local_theta or cfg.rope.theta}},
           "attention_k_eq_v": attn.k_eq_v, "global_head_dim": attn.global_head_dim or cfg.head_dim,
           "num_kv_shared_layers": cfg.kv_shared_layers, "hidden_size_per_layer_input": cfg.per_layer_dim,
           "vocab_size_per_layer_input": cfg.per_layer_vocab_size or cfg.vocab_size,
           "use_double_wide_mlp": cfg.double_wide_shared_mlp, "enable_moe_block": m.n_experts > 0,
           "use_bidirectional_attention": None}
    if attn.global_kv_heads is not None:
        out["num_global_key_value_heads"] = attn.global_kv_heads
    if m.n_experts:
        out.update(num_experts=m.n_experts, top_k_experts=m.n_experts_per_token, moe_intermediate_size=cfg.expert_d_ff)
    return out


def gemma_text_weights(sd: StateDict) -> StateDict:
    """A Gemma 3n / 4 multimodal checkpoint's text weights (model.language_model. -> model.; the vision and audio
    towers and their embedders left out); a text checkpoint's as they are."""
    return {k.replace("model.language_model.", "model."): v for k, v in sd.items()
            if not re.match(r"model\.(vision_tower|audio_tower|embed_vision|embed_audio)\.", k)}


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    sd = gemma_text_weights(sd)
    out = {}
    for key, v in unprefixed(sd, cfg).items():
        if key.endswith(".experts.gate_up_proj"):  # [E, 2F, D]: gate rows, then up rows
            F = v.shape[1] // 2
            out[key.replace("gate_up_proj", "gate_proj")], out[key.replace("gate_up_proj", "up_proj")] = \
                v[:, :F], v[:, F:]
        else:
            out[key] = v
    return out


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = {}
    for key, v in sd.items():
        if key.endswith(".experts.gate_proj"):
            out[key.replace("gate_proj", "gate_up_proj")] = np.concatenate(
                [v, sd[key.replace("gate_proj", "up_proj")]], axis=1)
        elif not key.endswith(".experts.up_proj"):
            out[key] = v
    return prefixed(out, cfg)


FAMILY = Family("gemma4_text", "Gemma4ForCausalLM", _config_from_hf, _config_to_hf, _from_hf, _to_hf)
FAMILIES = {"gemma4_text": FAMILY, "gemma4": Family("gemma4", "Gemma4ForConditionalGeneration", _config_from_hf,
                                                    _config_to_hf, _from_hf, _to_hf)}
