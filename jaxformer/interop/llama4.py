"""Llama 4 text models (Llama4ForCausalLM, `llama4_text`; the text part of Llama4ForConditionalGeneration, `llama4`:
config.json's text_config, weights under language_model.model. and language_model.lm_head; the vision tower is left).

transformers' modeling_llama4.py, field by field:
  no_rope_layers            1 = RoPE, 0 = NoPE per layer (every fourth layer NoPE): rope.nope_layers
  attention_chunk_size      RoPE layers attend within chunks of that many positions (layer_types chunked_attention):
                            attention.chunk_size
  use_qk_norm               q and k RMS-normalised per head without a weight, after RoPE, on RoPE layers:
                            attention.qk_norm "rms"
  attn_temperature_tuning, floor_scale, attn_scale   NoPE layers' queries times 1 + attn_scale *
                            log(1 + floor((position + 1) / floor_scale)): attention.temperature_floor / _scale
  moe_layers / interleave_moe_layer_step   the sparse layers: `num_local_experts` SwiGLU experts of
                            `intermediate_size`, top `num_experts_per_tok` by logit, the chosen ones' sigmoid scaling
                            the expert's input (moe.router "llama4"), plus an ungated shared expert of the same size;
                            dense layers are `intermediate_size_mlp` wide
RoPE pairs dims (2i, 2i + 1) (complex multiplication): the importer reorders q/k rows (hf_config.deinterleave_rope).
Experts are stored fused and transposed: `experts.gate_up_proj` [E, D, 2F] (gate columns first), `down_proj` [E, F, D].
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         deinterleave_rope, prefixed, renamed, require, rope_from_hf, rope_to_hf,
                                         text_model_config, unprefixed)

RENAMES = {".feed_forward.router.": ".mlp.gate.", ".feed_forward.": ".mlp."}


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = text_model_config(hf, "llama4", "llama4_text", tie_default=False)  # a multimodal checkpoint: its text model
    require(hf, "attention_bias", lambda v: not v, False, "Llama 4 has no attention biases in jaxformer")
    require(hf, "router_jitter_noise", lambda v: not v, 0.0, "only 0 (a training-time perturbation)")
    L = hf["num_hidden_layers"]
    interval = hf.get("no_rope_layer_interval", 4)
    no_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(L)]
    chunk = hf.get("attention_chunk_size")
    types = hf.get("layer_types") or [("chunked_attention" if r and chunk else "full_attention") for r in no_rope]
    step = hf.get("interleave_moe_layer_step", 1)
    moe_layers = hf.get("moe_layers")
    moe_layers = list(range(step - 1, L, step)) if moe_layers is None else list(moe_layers)
    theta, scaling = rope_from_hf(hf)
    F = hf["intermediate_size"]
    tuning = bool(hf.get("attn_temperature_tuning", True))
    return ModelConfig.llama(
        **{**decoder_fields(hf), "d_ff": hf.get("intermediate_size_mlp", 16384)}, activation=activation(hf, "hidden_act"),
        export_as="llama4_text", layer_types=types if "chunked_attention" in types else None,
        rope=dict(theta=theta, scaling=scaling, nope_layers=tuple(i for i, r in enumerate(no_rope) if not r)),
        attention=dict(qk_norm="rms" if hf.get("use_qk_norm", True) else "none",
                       chunk_size=chunk if "chunked_attention" in types else None,
                       temperature_floor=float(hf.get("floor_scale", 8192)) if tuning else None,
                       temperature_scale=float(hf.get("attn_scale", 0.1))),
        moe=dict(n_experts=hf.get("num_local_experts", 16), n_experts_per_token=hf.get("num_experts_per_tok", 1),
                 d_ff=F, shared_d_ff=F, router="llama4", dense_layers=tuple(i for i in range(L) if i not in moe_layers),
                 aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001))) if moe_layers else {})


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    a, m = cfg.attention, cfg.moe
    out = {**decoder_to_hf(cfg, FAMILY), "hidden_act": ACT_TO_HF[cfg.activation], "attention_bias": False,
           "intermediate_size_mlp": cfg.d_ff, "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling),
           "no_rope_layers": [int(i not in cfg.rope.nope_layers) for i in range(cfg.n_layers)],
           "layer_types": [cfg.layer_type(i) for i in range(cfg.n_layers)], "attention_chunk_size": a.chunk_size,
           "use_qk_norm": a.qk_norm == "rms", "attn_temperature_tuning": a.temperature_floor is not None,
           "floor_scale": int(a.temperature_floor or 8192), "attn_scale": a.temperature_scale,
           "router_jitter_noise": 0.0}
    if m.n_experts:
        out.update(num_local_experts=m.n_experts, num_experts_per_tok=m.n_experts_per_token,
                   intermediate_size=cfg.expert_d_ff, router_aux_loss_coef=m.aux_loss_coef,
                   moe_layers=[i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)])
    else:
        out.update(moe_layers=[], num_local_experts=1, intermediate_size=cfg.d_ff)
    return out


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    sd = {re.sub(r"^language_model\.", "", k): v for k, v in sd.items()
          if not k.startswith(("vision_model.", "multi_modal_projector."))}
    out: StateDict = {}
    for key, v in renamed(unprefixed(sd, cfg), RENAMES).items():
        if key.endswith(".mlp.experts.gate_up_proj"):  # [E, D, 2F]: gate columns, then up
            F = v.shape[2] // 2
            out[key.replace("gate_up_proj", "gate_proj")] = np.swapaxes(v[:, :, :F], 1, 2)
            out[key.replace("gate_up_proj", "up_proj")] = np.swapaxes(v[:, :, F:], 1, 2)
        elif key.endswith(".mlp.experts.down_proj"):  # [E, F, D] -> [E, D, F]
            out[key] = np.swapaxes(v, 1, 2)
        else:
            out[key] = v
    return deinterleave_rope(out, cfg)


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    sd = deinterleave_rope(sd, cfg, inverse=True)
    out: StateDict = {}
    for key, v in sd.items():
        if key.endswith(".mlp.experts.gate_proj"):
            up = sd[key.replace("gate_proj", "up_proj")]
            out[key.replace("gate_proj", "gate_up_proj")] = np.concatenate(
                [np.swapaxes(v, 1, 2), np.swapaxes(up, 1, 2)], axis=2)
        elif key.endswith(".mlp.experts.down_proj"):
            out[key] = np.swapaxes(v, 1, 2)
        elif not key.endswith(".mlp.experts.up_proj"):
            out[key] = v
    back = {".mlp.gate.": ".feed_forward.router.", ".mlp.": ".feed_forward."}
    return prefixed(renamed(out, back), cfg)


FAMILY = Family("llama4_text", "Llama4ForCausalLM", _config_from_hf, _config_to_hf, _from_hf, _to_hf)
FAMILIES = {"llama4_text": FAMILY, "llama4": Family("llama4", "Llama4ForConditionalGeneration", _config_from_hf,
                                                  _config_to_hf, _from_hf, _to_hf)}
