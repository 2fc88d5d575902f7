"""MiniMax-M2 (MiniMaxM2ForCausalLM): a Llama-style decoder whose every MLP slot is a sparse MoE, routed as
DeepSeek-V3 routes without groups.

transformers' modeling_minimax_m2.py: q/k RMSNorm over the whole projections (q_norm [N*H], k_norm [K*H]) before
RoPE; RoPE rotate-half on the first `rotary_dim` dims of each head (older configs; `partial_rotary_factor` in
transformers 5); `num_local_experts` SwiGLU experts of `intermediate_size`, chosen by sigmoid scores plus
`e_score_correction_bias` (top `num_experts_per_tok`, the chosen uncorrected scores renormalised; jaxformer's deepseek
router with one group); no shared expert, no dense layer. Checkpoints name the slot `block_sparse_moe` with experts
one by one (w1 / w3 / w2, as Mixtral) and the correction bias on the slot (jaxformer's `mlp.gate`).
"""

from __future__ import annotations

import re
from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.interop import moe
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         partial_rotary_factor, require, rope_from_hf, rope_to_hf)

BIAS = re.compile(r"^(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.e_score_correction_bias$")  # saved | in memory


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    require(hf, "router_jitter_noise", lambda v: not v, 0.0, "only 0 (jitter is a training-time perturbation "
            "jaxformer does not apply)")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    factor = partial_rotary_factor(hf)
    if hf.get("rotary_dim") is not None and "partial_rotary_factor" not in (hf.get("rope_parameters") or {}):
        factor = hf["rotary_dim"] / head_dim  # the released checkpoints' spelling
    theta, scaling = rope_from_hf(hf, partial_ok=True)
    return ModelConfig.llama(
        **{**decoder_fields(hf), "d_ff": hf["intermediate_size"]}, activation=activation(hf, "hidden_act"),
        export_as="minimax_m2", rope=dict(theta=theta, scaling=scaling, partial_factor=factor),
        attention=dict(qk_norm="proj"),
        moe=dict(n_experts=hf["num_local_experts"], n_experts_per_token=hf["num_experts_per_tok"], router="deepseek",
                 n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
                 aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001))))


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    return {**decoder_to_hf(cfg, FAMILY), "hidden_act": ACT_TO_HF[cfg.activation],
            "intermediate_size": cfg.expert_d_ff, "num_local_experts": m.n_experts,
            "num_experts_per_tok": m.n_experts_per_token, "router_aux_loss_coef": m.aux_loss_coef,
            "router_jitter_noise": 0.0, "rotary_dim": cfg.rotary_dim,
            "rope_parameters": {**rope_to_hf(cfg.rope.theta, cfg.rope.scaling),
                                "partial_rotary_factor": cfg.rope.partial_factor}}


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    sd = {(f"{BIAS.match(k)[1]}.mlp.gate.e_score_correction_bias" if BIAS.match(k) else k): v for k, v in sd.items()}
    return moe.FAMILIES["mixtral"].from_hf(sd, cfg)


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = moe.FAMILIES["mixtral"].to_hf(sd, cfg.replace(export_as="mixtral"))
    return {k.replace(".mlp.gate.e_score_correction_bias", ".block_sparse_moe.e_score_correction_bias"): v
            for k, v in out.items()}


FAMILY = Family("minimax_m2", "MiniMaxM2ForCausalLM", _config_from_hf, _config_to_hf, _from_hf, _to_hf)
FAMILIES = {"minimax_m2": FAMILY}
