"""Mixture-of-Experts config fields: which layers are sparse, and clear errors for settings that cannot work."""

from __future__ import annotations

import pytest

from jaxformer.config import EncDecConfig, ModelConfig


def test_sparse_layers_follow_moe_every_and_dense_layers():
    cfg = ModelConfig.llama(n_layers=6, n_experts=4, moe_every=2, dense_layers=[3])  # Qwen's step 2, mlp_only [3]
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    assert cfg.dense_layers == (3,) and cfg.family == "mixtral"
    assert ModelConfig.llama(n_experts=4, moe_d_ff=256, d_ff=256).moe_d_ff is None  # one spelling: d_ff
    assert not any(ModelConfig.llama().is_moe_layer(i) for i in range(2))


@pytest.mark.parametrize("fields,match", [
    (dict(n_experts=4, n_experts_per_token=5), "n_experts_per_token=5 exceeds n_experts=4"),
    (dict(capacity_factor=1.25), r"\['capacity_factor'\] are Mixture-of-Experts settings but n_experts=0"),
    (dict(n_experts=4, capacity_factor=0.0), "capacity_factor must be > 0"),
    (dict(n_experts=4, router="switch"), "router='switch' is not supported"),
    (dict(n_experts=4, norm_topk_prob=False), "router='mixtral' always normalises"),
    (dict(n_experts=4, shared_expert_gate=True), "shared_expert_gate=true needs a shared expert"),
    (dict(n_experts=4, dense_layers=[0, 7]), r"dense_layers \[7\] are not layer indices"),
    (dict(n_experts=4, n_layers=2, moe_every=3), "no layer is sparse"),
    (dict(n_experts=4, use_bias=True), "SwiGLU experts without biases"),
    (dict(n_experts=4, router_aux_loss_coef=-1.0), "router_aux_loss_coef must be >= 0"),
    (dict(n_experts=-1), "n_experts must be an integer >= 0"),
])
def test_bad_moe_settings_are_named(fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.llama(**fields)


def test_encoder_decoder_refuses_experts():
    with pytest.raises(ValueError, match="decoder-only option"):
        EncDecConfig(n_experts=4)


def test_expert_matrices_get_weight_decay_and_the_router_too():
    import jax
    from flax import nnx

    from jaxformer.models import DecoderLM
    from jaxformer.train.optim import decay_mask

    cfg = ModelConfig.llama(n_layers=1, n_experts=4, shared_expert_d_ff=8, shared_expert_gate=True, router="qwen")
    params = nnx.state(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    mask = {".".join(str(k.key) for k in p if hasattr(k, "key")): m
            for p, m in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
    decayed = {k for k, m in mask.items() if m and ".mlp." in k}
    assert decayed == {f"layers.0.mlp.{n}" for n in (
        "experts.gate_proj", "experts.up_proj", "experts.down_proj", "gate.weight", "shared_expert_gate.weight",
        "shared_expert.gate_proj.weight", "shared_expert.up_proj.weight", "shared_expert.down_proj.weight")}
    assert not mask["embed_tokens.weight"] and not mask["layers.0.input_layernorm.weight"]
