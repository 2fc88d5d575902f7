"""The Mixture-of-Experts presets against each checkpoint's published config.json and transformers.

As tests/test_presets.py: the config.json architecture fields (written out here, no download) read by
jaxformer's importer must give the preset, and the model transformers builds from them on torch's meta device
must have exactly the parameters of jaxformer's DecoderLM (nnx.eval_shape), the count on the model card;
the active count (k of E experts) must be the card's too. moe_tiny_code runs as many parameters per token
as the default tiny_code model.
"""

from __future__ import annotations

import json

import pytest
from flax import nnx

from jaxformer.config import load_model_config
from jaxformer.interop.hf import config_to_hf
from jaxformer.models import DecoderLM, count_params
from jaxformer.models.moe import active_params
from tests.conftest import assert_importer_gives_preset

# preset: (model_type, config.json architecture fields, total parameters, active parameters per token)
PUBLISHED = {
    "mixtral-8x7b": ("mixtral", dict(  # mistralai/Mixtral-8x7B-v0.1: 46.7B, 12.9B active
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False,
        router_aux_loss_coef=0.02), 46_702_792_704, 12_879_925_248),
    "qwen2-moe-a2.7b": ("qwen2_moe", dict(  # Qwen/Qwen1.5-MoE-A2.7B: 14.3B, 2.7B active
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_act="silu", rope_theta=1e6,
        num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        norm_topk_prob=False, decoder_sparse_step=1, tie_word_embeddings=False, router_aux_loss_coef=0.001,
        use_sliding_window=False, sliding_window=32768, max_window_layers=21), 14_315_784_192, 2_689_173_504),
    "qwen3-30b-a3b": ("qwen3_moe", dict(  # Qwen/Qwen3-30B-A3B: 30.5B, 3.3B active
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, hidden_act="silu", rope_theta=1e6, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        attention_bias=False, router_aux_loss_coef=0.001, use_sliding_window=False, sliding_window=None,
        max_window_layers=48), 30_532_122_624, 3_353_032_704),
    # openai/gpt-oss-20b and -120b: 20.9B / 116.8B; the cards' 3.61B / 5.13B active leave out the input embedding
    # table (201,088 x 2,880 = 579,133,440), which the active counts here include
    "gpt-oss-20b": ("gpt_oss", dict(**(GPT_OSS := dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
        head_dim=64, num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                             original_max_position_embeddings=4096, rope_theta=150000.0),
        swiglu_limit=7.0, tie_word_embeddings=False, attention_bias=True, hidden_act="silu", router_aux_loss_coef=0.001)),
        num_hidden_layers=24, num_local_experts=32), 20_914_757_184, 4_187_440_704),
    "glm-4.5-air": ("glm4_moe", dict(  # zai-org/GLM-4.5-Air: 106B, 12B active without the embedding tables
        vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=46,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, n_routed_experts=128, n_shared_experts=1,
        num_experts_per_tok=8, n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.0,
        partial_rotary_factor=0.5, rope_theta=1000000, max_position_embeddings=131072, use_qk_norm=False,
        attention_bias=True, norm_topk_prob=True, tie_word_embeddings=False, rms_norm_eps=1e-5, hidden_act="silu",
        router_aux_loss_coef=0.001), 106_852_251_264, 13_424_129_664),  # + 45 x 128 correction biases
    "gpt-oss-120b": ("gpt_oss", dict(**GPT_OSS, num_hidden_layers=36, num_local_experts=128), 116_829_156_672,
                     5_711_982_912),
    # MiniMaxAI/MiniMax-M2: 230B, 10B active (the card's active count leaves out the embedding and output tables,
    # 2 x 614,596,608)
    "minimax-m2": ("minimax_m2", dict(
        vocab_size=200064, hidden_size=3072, intermediate_size=1536, num_hidden_layers=62, num_attention_heads=48,
        num_key_value_heads=8, head_dim=128, rotary_dim=64, rope_theta=5000000, max_position_embeddings=196608,
        num_local_experts=256, num_experts_per_tok=8, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
        router_aux_loss_coef=0.001), 228_689_764_864, 11_030_553_088),  # + 62 x 256 correction biases
    # meta-llama/Llama-4-Scout-17B-16E's text model: 109B with the vision encoder, 17B active. Its rope_scaling as
    # published now (Meta's llama-models PR 322: factor 16, high_freq_factor 1; the April 2025 file had 8 and 4)
    "llama4-scout": ("llama4_text", dict(
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=262144,
        rms_norm_eps=1e-5, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=16.0,
                                                high_freq_factor=1.0, low_freq_factor=1.0,
                                                original_max_position_embeddings=8192),
        num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=8192,
        no_rope_layer_interval=4, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
        tie_word_embeddings=False, attention_bias=False, router_aux_loss_coef=0.001), 107_769_861_120,
        17_172_894_720),
    # deepseek-ai/DeepSeek-V3: 671B (the 14B multi-token-prediction layer aside), 37B active
    "deepseek-v3": ("deepseek_v3", dict(**(DEEPSEEK_V3 := dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8, topk_group=4, num_experts_per_tok=8, moe_layer_freq=1,
        first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid", hidden_act="silu",
        max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000, attention_bias=False,
        rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                          original_max_position_embeddings=4096, type="yarn"),
        tie_word_embeddings=False, num_nextn_predict_layers=1))), 671_026_419_200, 37_552_297_472),
    # moonshotai/Kimi-K2-Instruct: 1T, 32B active; model_type kimi_k2 (its own config class, DeepSeek-V3's fields)
    "kimi-k2": ("kimi_k2", dict(**{**DEEPSEEK_V3, **dict(
        vocab_size=163840, num_attention_heads=64, num_key_value_heads=64, n_routed_experts=384,
        routed_scaling_factor=2.827, n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=131072,
        rope_theta=50000.0, rope_scaling=dict(beta_fast=1.0, beta_slow=1.0, factor=32.0, mscale=1.0,
                                              mscale_all_dim=1.0, original_max_position_embeddings=4096, type="yarn"),
        num_nextn_predict_layers=0)}), 1_026_408_232_448, 32_861_500_928),
}


def _count(cfg) -> int:
    """DecoderLM's parameter count, from abstract 1- and 2-layer models when every layer is alike (exact then:
    nnx.eval_shape's cost grows with the square of the parameter count, ~10 s for a 48-layer model)."""
    def count(c):
        return count_params(nnx.eval_shape(lambda: DecoderLM(c, rngs=nnx.Rngs(0))))

    first = len(cfg.moe.dense_layers)  # dense layers first (DeepSeek's first_k_dense_replace), then alike
    if cfg.n_layers <= first + 2 or cfg.moe.dense_layers != tuple(range(first)) or cfg.moe.every != 1 \
            or cfg.layer_types is not None:
        return count(cfg)
    one, two = count(cfg.replace(n_layers=first + 1)), count(cfg.replace(n_layers=first + 2))
    return one + (cfg.n_layers - first - 1) * (two - one)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_moe_preset_is_the_published_checkpoint(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, published, total, active = PUBLISHED[name]
    assert_importer_gives_preset(name, model_type, published)
    cfg = load_model_config(name)
    hf_type = {"kimi_k2": "deepseek_v3"}.get(model_type, model_type)  # Kimi-K2 ships its own copy of the class
    with torch.device("meta"):  # shapes only: a 47B model costs no memory
        reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf_type, **published))
    # transformers keeps the deepseek router's e_score_correction_bias as a buffer, jaxformer as a parameter (moved by
    # the balancing rule, not by gradients): counted here on both sides
    theirs = sum(p.numel() for p in reference.parameters()) + sum(
        b.numel() for n, b in reference.named_buffers() if n.endswith("e_score_correction_bias"))
    ours = _count(cfg)
    assert ours == theirs == total
    assert active_params(cfg, ours) == active


def test_moe_tiny_code_has_the_default_models_active_parameters(capsys):
    from jaxformer.cli import main

    dense, moe = load_model_config("tiny_code"), load_model_config("moe_tiny_code")
    dense_n, moe_n = _count(dense), _count(moe)
    assert moe_n > 2 * dense_n  # more parameters in all...
    assert abs(active_params(moe, moe_n) - dense_n) <= 0.01 * dense_n  # ...as many per token (routers aside)
    assert config_to_hf(moe)["model_type"] == "mixtral"  # Mixtral's layout; the z-loss weight is not architecture
    main(["inspect", "moe_tiny_code"])
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["params"], info["active_params"]) == ("mixtral", moe_n, active_params(moe, moe_n))
