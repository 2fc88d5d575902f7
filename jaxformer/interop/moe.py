"""Mixture-of-Experts families: Mixtral (MixtralForCausalLM), Qwen2-MoE (Qwen1.5-MoE) and Qwen3-MoE.

transformers' modeling_mixtral.py, modeling_qwen2_moe.py and modeling_qwen3_moe.py are the specification.
Mixtral: every layer sparse, softmax over the top-k (router="mixtral"), `intermediate_size` is the expert
size, optional sliding window on every layer. Qwen2-MoE: q/k/v biases, softmax over all experts then top-k
(router="qwen", renormalised when norm_topk_prob), a shared expert of `shared_expert_intermediate_size`
gated by sigmoid(shared_expert_gate(x)), `moe_intermediate_size` experts on layers (i + 1) %
decoder_sparse_step == 0 outside mlp_only_layers, dense `intermediate_size` MLPs elsewhere. Qwen3-MoE: as
Qwen2-MoE with per-head q/k RMSNorm, no biases, no shared expert.

Weights: transformers 5 holds each layer's experts fused in memory (`mlp.experts.gate_up_proj` [E, 2F, D],
gate rows first; `mlp.experts.down_proj` [E, D, F]) but save_pretrained writes them per expert, as the
checkpoints on the Hub are: Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2.weight` (gate/up/down), Qwen
`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`. Import takes either; export writes the per-expert form
(what save_pretrained writes and from_pretrained converts).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         prefixed, require, rope_from_hf, rope_to_hf, unprefixed)

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
# per-expert checkpoint names -> jaxformer's stacked experts.{gate,up,down}_proj
PER_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
HF_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj", "gate_proj": "gate_proj", "up_proj": "up_proj",
           "down_proj": "down_proj"}
MIXTRAL_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf["model_type"]
    theta, scaling = rope_from_hf(hf)
    fields = dict(decoder_fields(hf), activation=activation(hf, "hidden_act"), rope_theta=theta, rope_scaling=scaling,
                  n_experts_per_token=hf.get("num_experts_per_tok", 2),
                  router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    if model_type == "mixtral":
        require(hf, "router_jitter_noise", lambda v: not v, 0.0, "only 0 (jitter is a training-time perturbation "
                "jaxformer does not apply)")
        return ModelConfig.llama(**fields, n_experts=hf.get("num_local_experts", 8), router="mixtral",
                                 sliding_window=hf.get("sliding_window"))
    require(hf, "use_sliding_window", lambda v: not v, False, "only false (Qwen MoE sliding windows are not "
            "supported)")
    # transformers 5 may write the count as num_local_experts (Qwen3MoeConfig maps num_experts onto it)
    n_experts = require({**hf, "num_experts": hf.get("num_experts") or hf.get("num_local_experts")}, "num_experts",
                        lambda v: isinstance(v, int) and v > 0, None, "a positive number of experts")
    fields.update(n_experts=n_experts, router="qwen", norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                  moe_d_ff=hf.get("moe_intermediate_size"), moe_every=hf.get("decoder_sparse_step", 1),
                  dense_layers=tuple(hf.get("mlp_only_layers") or ()))
    if model_type == "qwen2_moe":
        shared = require(hf, "shared_expert_intermediate_size", lambda v: isinstance(v, int) and v > 0, 5632,
                         "a positive size (transformers' Qwen2-MoE always has a shared expert)")
        return ModelConfig.llama(**fields, qkv_bias=bool(hf.get("qkv_bias", True)), shared_expert_d_ff=shared,
                                 shared_expert_gate=True)
    require(hf, "attention_bias", lambda v: not v, False, "Qwen3-MoE with attention biases has no jaxformer "
            "equivalent")
    return ModelConfig.llama(**fields, qk_norm="head")


def _config_to_hf(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    out = {**decoder_to_hf(cfg, family), "hidden_act": ACT_TO_HF[cfg.activation],
           "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling),
           "num_experts_per_tok": cfg.moe.n_experts_per_token, "router_aux_loss_coef": cfg.moe.aux_loss_coef}
    if family.model_type == "mixtral":
        return {**out, "num_local_experts": cfg.moe.n_experts, "intermediate_size": cfg.expert_d_ff,
                "sliding_window": cfg.attention.sliding_window, "router_jitter_noise": 0.0}
    out.update(num_experts=cfg.moe.n_experts, norm_topk_prob=cfg.moe.norm_topk_prob, moe_intermediate_size=cfg.expert_d_ff,
               decoder_sparse_step=cfg.moe.every, mlp_only_layers=list(cfg.moe.dense_layers), use_sliding_window=False)
    if family.model_type == "qwen2_moe":
        return {**out, "qkv_bias": cfg.attention.qkv_bias, "shared_expert_intermediate_size": cfg.moe.shared_d_ff}
    return {**out, "attention_bias": False}


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """transformers names (per-expert or fused experts) -> jaxformer's."""
    out: StateDict = {}
    per_expert: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for k, v in unprefixed(sd, cfg).items():
        k = k.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's checkpoint name of the MLP slot
        m = PER_EXPERT.match(k)
        if m:
            per_expert.setdefault((m[1], HF_PROJ[m[3]]), {})[int(m[2])] = v
        elif k.endswith(".experts.gate_up_proj"):  # [E, 2F, D]: gate rows, then up rows
            gate, up = np.split(np.asarray(v), 2, axis=1)
            out[k.replace("gate_up_proj", "gate_proj")], out[k.replace("gate_up_proj", "up_proj")] = gate, up
        else:
            out[k] = v
    for (prefix, proj), experts in per_expert.items():
        if sorted(experts) != list(range(cfg.moe.n_experts)):
            raise ValueError(f"{prefix}.*.{proj}: the checkpoint holds experts {sorted(experts)}, the config "
                             f"n_experts={cfg.moe.n_experts}")
        out[f"{prefix}.{proj}"] = np.stack([experts[e] for e in range(cfg.moe.n_experts)])  # [E, out, in]
    return out


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """jaxformer names -> the per-expert checkpoint names save_pretrained writes."""
    mixtral = cfg.family == "mixtral"
    out: StateDict = {}
    for k, v in sd.items():
        m = re.match(r"^(layers\.\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$", k)
        if m:
            slot = f"{m[1]}.block_sparse_moe" if mixtral else f"{m[1]}.mlp"
            name = MIXTRAL_PROJ[m[2]] if mixtral else m[2]
            out.update({f"{slot}.experts.{e}.{name}.weight": v[e] for e in range(v.shape[0])})
        elif mixtral and re.match(r"^layers\.\d+\.mlp\.gate\.weight$", k):
            out[k.replace(".mlp.", ".block_sparse_moe.")] = v
        else:
            out[k] = v
    return prefixed(out, cfg)


def _family(model_type: str) -> Family:
    family = Family(model_type, ARCHITECTURES[model_type], _config_from_hf, lambda cfg: _config_to_hf(cfg, family),
                    _from_hf, _to_hf)
    return family


FAMILIES = {t: _family(t) for t in ARCHITECTURES}
