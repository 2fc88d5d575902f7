"""Mixture-of-Experts config fields: which layers are sparse, and clear errors for settings that cannot work."""

from __future__ import annotations

import pytest

from jaxformer.config import EncDecConfig, ModelConfig


def test_sparse_layers_follow_moe_every_and_dense_layers():
    cfg = ModelConfig.llama(n_layers=6, moe=dict(n_experts=4, every=2, dense_layers=[3]))  # Qwen's step 2, mlp_only
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    assert cfg.moe.dense_layers == (3,) and cfg.family == "mixtral"
    assert ModelConfig.llama(moe=dict(n_experts=4, d_ff=256), d_ff=256).moe.d_ff is None  # one spelling: d_ff
    assert not any(ModelConfig.llama().is_moe_layer(i) for i in range(2))


@pytest.mark.parametrize("moe,match", [
    (dict(n_experts=4, n_experts_per_token=5), r"moe\.n_experts_per_token=5 exceeds moe\.n_experts=4"),
    (dict(capacity_factor=1.25), r"\['moe\.capacity_factor'\] are Mixture-of-Experts settings but moe.n_experts=0"),
    (dict(n_experts=4, capacity_factor=0.0), r"moe\.capacity_factor must be > 0"),
    (dict(n_experts=4, router="switch"), r"moe\.router='switch' is not supported"),
    (dict(n_experts=4, norm_topk_prob=False), "router='mixtral' always normalises"),
    (dict(n_experts=4, shared_gate=True), r"moe\.shared_gate=true needs a shared expert"),
    (dict(n_experts=4, dense_layers=[0, 7]), r"moe\.dense_layers \[7\] are not layer indices"),
    (dict(n_experts=4, every=3), "no layer is sparse"),
    (dict(n_experts=4, aux_loss_coef=-1.0), r"moe\.aux_loss_coef must be >= 0"),
    (dict(n_experts=-1), r"moe\.n_experts must be an integer >= 0"),
    (dict(n_expert=4), r"unknown model\.moe key\(s\) \['n_expert'\]"),
    # 3 of the 2 experts the one allowed group holds (found by bench/hf_families_sweep.py: transformers then takes an
    # arbitrary masked expert)
    (dict(n_experts=4, n_experts_per_token=3, router="deepseek", n_group=2, topk_group=1),
     r"n_experts_per_token=3 exceeds the experts of the moe\.topk_group=1 groups"),
])
def test_bad_moe_settings_are_named(moe, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.llama(n_layers=2, moe=moe)


def test_experts_are_gated_and_biased_ones_dropless():
    with pytest.raises(ValueError, match="gated"):
        ModelConfig.llama(gated_mlp=False, moe=dict(n_experts=4))
    with pytest.raises(ValueError, match=r"route dropless: set moe.capacity_factor=null"):
        ModelConfig.llama(use_bias=True, moe=dict(n_experts=4, capacity_factor=1.25))
    with pytest.raises(ValueError, match=r"moe\.swiglu_limit must be > 0"):
        ModelConfig.llama(moe=dict(n_experts=4, swiglu_limit=0.0))


def test_encoder_decoder_refuses_experts():
    with pytest.raises(ValueError, match="decoder-only option"):
        EncDecConfig(moe=dict(n_experts=4))


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
