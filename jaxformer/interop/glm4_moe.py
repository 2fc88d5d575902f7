"""GLM-4.5 / GLM-4.6 (Glm4MoeForCausalLM): a Llama-style decoder with partial RoPE, optional per-head q/k norms, q/k/v
biases, and DeepSeek-V3's router over its experts.

transformers' modeling_glm4_moe.py: RoPE rotates the first head_dim x partial_rotary_factor dims (rotate-half,
not interleaved); the first `first_k_dense_replace` layers keep a dense MLP of `intermediate_size`, the rest are
sparse: `n_routed_experts` SwiGLU experts of `moe_intermediate_size` chosen by the deepseek router (sigmoid scores,
`e_score_correction_bias`, `n_group` / `topk_group`, `norm_topk_prob`, `routed_scaling_factor`) plus an ungated
shared expert of `moe_intermediate_size * n_shared_experts`. Checkpoints name experts one by one (interop/moe.py
stacks them) and the shared expert `mlp.shared_experts` (jaxformer's `mlp.shared_expert`). The published
checkpoints carry a multi-token-prediction layer after the last one (`num_nextn_predict_layers`, layer 46 of
GLM-4.5-Air, 92 of GLM-4.5): transformers skips it on load, and so does the importer.
"""

from __future__ import annotations

import re
from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.interop import moe
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         partial_rotary_factor, rope_from_hf, rope_to_hf)

SHARED = (".mlp.shared_experts.", ".mlp.shared_expert.")  # transformers' name, jaxformer's


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    theta, scaling = rope_from_hf(hf, partial_ok=True)
    E, F = hf["n_routed_experts"], hf["moe_intermediate_size"]
    return ModelConfig.llama(
        **decoder_fields(hf), activation=activation(hf, "hidden_act"), export_as="glm4_moe",
        rope=dict(theta=theta, scaling=scaling, partial_factor=partial_rotary_factor(hf)),
        attention=dict(qkv_bias=bool(hf.get("attention_bias", False)),
                       qk_norm="head" if hf.get("use_qk_norm") else "none"),
        moe=dict(n_experts=E, n_experts_per_token=hf["num_experts_per_tok"], d_ff=F,
                 shared_d_ff=F * hf.get("n_shared_experts", 1), router="deepseek", n_group=hf.get("n_group", 1),
                 topk_group=hf.get("topk_group", 1), norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                 routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                 dense_layers=tuple(range(hf.get("first_k_dense_replace", 1))),
                 aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001))))


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.moe
    first_dense = len(m.dense_layers)
    return {**decoder_to_hf(cfg, FAMILY), "hidden_act": ACT_TO_HF[cfg.activation],
            "rope_parameters": {**rope_to_hf(cfg.rope.theta, cfg.rope.scaling),
                                "partial_rotary_factor": cfg.rope.partial_factor},
            "partial_rotary_factor": cfg.rope.partial_factor, "attention_bias": cfg.attention.qkv_bias,
            "use_qk_norm": cfg.attention.qk_norm == "head", "n_routed_experts": m.n_experts,
            "num_experts_per_tok": m.n_experts_per_token, "moe_intermediate_size": cfg.expert_d_ff,
            "n_shared_experts": m.shared_d_ff // cfg.expert_d_ff, "n_group": m.n_group, "topk_group": m.topk_group,
            "norm_topk_prob": m.norm_topk_prob, "routed_scaling_factor": m.routed_scaling_factor,
            "first_k_dense_replace": first_dense if m.dense_layers == tuple(range(first_dense)) else -1,
            "router_aux_loss_coef": m.aux_loss_coef, "pad_token_id": None}


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    mtp = re.compile(rf"^model\.layers\.({'|'.join(str(cfg.n_layers + i) for i in range(4))})\.")  # past the last
    # n_shared_experts = 0: transformers still builds the shared expert, 0 wide (empty tensors); jaxformer has none
    sd = {k: v for k, v in sd.items() if not mtp.match(k) and not (SHARED[0] in k and v.size == 0)}
    return {k.replace(*SHARED): v for k, v in moe.FAMILIES["qwen3_moe"].from_hf(sd, cfg).items()}


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    return moe.FAMILIES["qwen3_moe"].to_hf({k.replace(SHARED[1], SHARED[0]): v for k, v in sd.items()}, cfg)


FAMILY = Family("glm4_moe", "Glm4MoeForCausalLM", _config_from_hf, _config_to_hf, _from_hf, _to_hf)
FAMILIES = {"glm4_moe": FAMILY}
