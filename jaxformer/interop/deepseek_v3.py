"""DeepSeek-V3 / V3.1 / R1 and Kimi-K2 (DeepseekV3ForCausalLM): multi-head latent attention and DeepSeek's MoE.

transformers' modeling_deepseek_v3.py: attention is multi-head latent attention (jaxformer's `latent.*`,
models/latent_attention.py; parameter names equal). Its RoPE rotates each head's last qk_rope_head_dim q/k dims in
interleaved pairs (`rope_interleave`, true in every published config; false is refused): the importer reorders those rows of q_b_proj (or q_proj)
and kv_a_proj_with_mqa evens first (hf_config.deinterleave_rope's rule), the exporter back. A yarn scaling's
mscale_all_dim also scales the softmax (ModelConfig.layer_attention_scale). The first `first_k_dense_replace`
layers keep a dense MLP; the rest are `n_routed_experts` SwiGLU experts routed as GLM-4.5 routes (interop/glm4_moe.py:
sigmoid scores, correction bias, groups, routed scaling) plus an ungated shared expert. The published checkpoints
carry a multi-token-prediction layer after the last (`num_nextn_predict_layers`): skipped, as transformers does;
their fp8 weights are dequantized on import (interop/fp8.py). Kimi-K2's config.json says model_type `kimi_k2` with
this architecture: read the same way, exported as deepseek_v3.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.interop import glm4_moe
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         require, rope_from_hf, rope_to_hf)

Q_ROWS = re.compile(r"\.self_attn\.(q_b_proj|q_proj)\.weight$")  # [N * H, in]: each head's last R rows rotate
KV_A_ROWS = re.compile(r"\.self_attn\.kv_a_proj_with_mqa\.(weight|bias)$")  # [C + R, (D)]: the last R rows rotate


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    require(hf, "scoring_func", lambda v: v == "sigmoid", "sigmoid", "only sigmoid scores (DeepSeek-V3's router)")
    require(hf, "topk_method", lambda v: v == "noaux_tc", "noaux_tc", "only noaux_tc (DeepSeek-V3's router)")
    require(hf, "moe_layer_freq", lambda v: v == 1, 1, "only 1 (every layer past the dense ones is sparse)")
    require(hf, "rope_interleave", lambda v: v is True, True, "only true, the published checkpoints' interleaved "
            "RoPE pairs (the importer reorders their rows as rotate-half)")
    theta, scaling = rope_from_hf(hf)
    N, R = hf["num_attention_heads"], hf["qk_rope_head_dim"]
    E, F, L = hf["n_routed_experts"], hf["moe_intermediate_size"], hf["num_hidden_layers"]
    first_dense = min(hf.get("first_k_dense_replace", 0), L)
    moe = {} if first_dense == L else dict(
        n_experts=E, n_experts_per_token=hf["num_experts_per_tok"], d_ff=F,
        shared_d_ff=F * (hf.get("n_shared_experts") or 0), router="deepseek", n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1, norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), dense_layers=tuple(range(first_dense)),
        aux_loss_coef=float(hf.get("aux_loss_alpha", hf.get("router_aux_loss_coef", 0.001))))
    return ModelConfig.llama(
        **{**decoder_fields(hf), "n_kv_heads": N, "head_dim": hf["qk_nope_head_dim"] + R},
        activation=activation(hf, "hidden_act"), export_as="deepseek_v3", rope=dict(theta=theta, scaling=scaling),
        latent=dict(kv_rank=hf["kv_lora_rank"], q_rank=hf.get("q_lora_rank") or 0, rope_dim=R,
                    v_head_dim=hf["v_head_dim"], bias=bool(hf.get("attention_bias", False))), moe=moe)


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    lat, m = cfg.latent, cfg.moe
    out = {**decoder_to_hf(cfg, FAMILY), "hidden_act": ACT_TO_HF[cfg.activation],
           "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling), "rope_interleave": True,
           "kv_lora_rank": lat.kv_rank, "q_lora_rank": lat.q_rank or None, "qk_rope_head_dim": lat.rope_dim,
           "qk_nope_head_dim": cfg.head_dim - lat.rope_dim, "v_head_dim": cfg.v_head_dim, "head_dim": lat.rope_dim,
           "attention_bias": lat.bias, "num_nextn_predict_layers": 0, "pad_token_id": None}
    if not m.n_experts:  # every layer dense
        return {**out, "first_k_dense_replace": cfg.n_layers, "n_routed_experts": 1, "num_experts_per_tok": 1,
                "n_group": 1, "topk_group": 1, "moe_intermediate_size": cfg.d_ff}
    first_dense = len(m.dense_layers)
    return {**out, "n_routed_experts": m.n_experts, "num_experts_per_tok": m.n_experts_per_token,
            "moe_intermediate_size": cfg.expert_d_ff, "n_shared_experts": m.shared_d_ff // cfg.expert_d_ff,
            "n_group": m.n_group, "topk_group": m.topk_group, "norm_topk_prob": m.norm_topk_prob,
            "routed_scaling_factor": m.routed_scaling_factor, "aux_loss_alpha": m.aux_loss_coef,
            "first_k_dense_replace": first_dense if m.dense_layers == tuple(range(first_dense)) else -1}


def _rope_rows(sd: StateDict, cfg: ModelConfig, inverse: bool) -> StateDict:
    """Interleaved RoPE rows as rotate-half (or back, `inverse`): the last R rows of each head's q and of the latent
    projection reordered evens first, then odds; scores are unchanged since q and k move alike."""
    H, R = cfg.head_dim, cfg.latent.rope_dim
    order = np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2)])
    order = np.argsort(order) if inverse else order
    out = dict(sd)
    for key, v in sd.items():
        if Q_ROWS.search(key):
            heads = v.reshape(-1, H, v.shape[-1])  # [N, H, in]
            out[key] = np.concatenate([heads[:, :H - R], heads[:, H - R:][:, order]], 1).reshape(v.shape)
        elif KV_A_ROWS.search(key):
            C = v.shape[0] - R
            out[key] = np.concatenate([v[:C], v[C:][order]], 0)
    return out


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    return _rope_rows(glm4_moe.FAMILY.from_hf(sd, cfg), cfg, inverse=False)


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    return glm4_moe.FAMILY.to_hf(_rope_rows(sd, cfg, inverse=True), cfg)


FAMILY = Family("deepseek_v3", "DeepseekV3ForCausalLM", _config_from_hf, _config_to_hf, _from_hf, _to_hf)
FAMILIES = {"deepseek_v3": FAMILY, "kimi_k2": FAMILY}
