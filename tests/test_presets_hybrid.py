"""The hybrid presets (Gated DeltaNet and short-convolution layers) against each checkpoint's published config.json.

As tests/test_moe_presets.py: the config.json architecture fields (written out here from the published files as
recalled, no download) read by jaxformer's importer must give the preset; the model transformers builds from them on
torch's meta device must have exactly the parameters of jaxformer's DecoderLM (nnx.eval_shape), and that count
(and the active count of the MoE ones) must be the one the preset's comment states. Shapes only: no weights
are allocated.
"""

from __future__ import annotations

import pytest
from flax import nnx

from jaxformer.config import CONFIG_DIR, load_model_config
from jaxformer.interop.hf import config_from_hf
from jaxformer.models import DecoderLM, count_params
from jaxformer.models.moe import active_params
from tests.conftest import assert_importer_gives_preset

# Qwen3.5's text_config rope: multimodal sections (equal positions for text), a quarter of each head rotated
QWEN3_5_ROPE = dict(rope_type="default", rope_theta=10000000, partial_rotary_factor=0.25, mrope_interleaved=True,
                    mrope_section=[11, 11, 10])
QWEN3_5_LINEAR = dict(linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                      linear_num_key_heads=16)


def qwen_layer_types(n: int) -> list[str]:
    """Three Gated DeltaNet layers, then a full-attention one (full_attention_interval 4)."""
    return ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(n)]


# preset: (model_type, config.json architecture fields, transformers' meta-device count, active per token or None)
PUBLISHED = {
    # Qwen/Qwen3.5-2B's text_config (the checkpoint's model_type is the multimodal wrapper qwen3_5)
    "qwen3.5-2b": ("qwen3_5_text", dict(
        vocab_size=248320, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=8,
        num_key_value_heads=2, head_dim=256, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
        attention_bias=False, attn_output_gate=True, full_attention_interval=4, layer_types=qwen_layer_types(24),
        linear_num_value_heads=16, **QWEN3_5_LINEAR, rope_parameters=QWEN3_5_ROPE, tie_word_embeddings=True),
        1_881_825_088, None),
    # Qwen/Qwen3.5-397B-A17B's text_config (wrapper qwen3_5_moe): no intermediate_size, Qwen3_5MoeTextConfig has none
    "qwen3.5-397b-a17b": ("qwen3_5_moe_text", dict(
        vocab_size=248320, hidden_size=4096, num_hidden_layers=60, num_attention_heads=32, num_key_value_heads=2,
        head_dim=256, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6, attention_bias=False,
        attn_output_gate=True, full_attention_interval=4, layer_types=qwen_layer_types(60),
        linear_num_value_heads=64, **QWEN3_5_LINEAR, moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
        num_experts=512, num_experts_per_tok=10, router_aux_loss_coef=0.001, rope_parameters=QWEN3_5_ROPE,
        tie_word_embeddings=False), 396_346_350_336, 17_349_040_896),
    # Qwen/Qwen3-Next-80B-A3B-Instruct (no layer_types: full_attention_interval)
    "qwen3-next-80b-a3b": ("qwen3_next", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5120, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
        attention_bias=False, full_attention_interval=4, linear_conv_kernel_dim=4, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32, decoder_sparse_step=1,
        mlp_only_layers=[], moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=512,
        num_experts_per_tok=10, norm_topk_prob=True, router_aux_loss_coef=0.001, partial_rotary_factor=0.25,
        rope_theta=10000000, rope_scaling=None, tie_word_embeddings=False, use_sliding_window=False),
        79_674_391_296, 3_874_929_408),
    # LiquidAI/LFM2-1.2B (its attention layers as full_attn_idxs; block_ff_dim beside intermediate_size)
    "lfm2-1.2b": ("lfm2", dict(
        vocab_size=65536, hidden_size=2048, intermediate_size=12288, block_ff_dim=12288, block_auto_adjust_ff_dim=True,
        block_ffn_dim_multiplier=1.0, block_multiple_of=256, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=128000, norm_eps=1e-5, conv_L_cache=3, conv_bias=False,
        full_attn_idxs=[2, 5, 8, 10, 12, 14], rope_theta=1000000.0, tie_embedding=True), 1_170_340_608, None),
}

def _count(cfg) -> int:
    """DecoderLM's parameter count under nnx.eval_shape; for a stack of identical 4-layer periods (3 DeltaNet + 1
    attention, every layer alike in its MLP/MoE) from abstract 1- and 2-period models, which is exact (eval_shape's
    cost grows with the model: ~10 s for the 397B one on a quiet machine, several times that on a busy one)."""
    def count(c):
        return count_params(nnx.eval_shape(lambda: DecoderLM(c, rngs=nnx.Rngs(0))))

    types, p = cfg.layer_types or (), 4
    periodic = len(types) == cfg.n_layers and cfg.n_layers % p == 0 and cfg.n_layers > 2 * p \
        and all(types[i] == types[i % p] for i in range(cfg.n_layers))
    uniform = not cfg.moe.dense_layers and cfg.moe.every == 1
    if not (periodic and uniform):
        return count(cfg)
    one, two = (count(cfg.replace(n_layers=k * p, layer_types=types[:k * p])) for k in (1, 2))
    return one + (cfg.n_layers // p - 1) * (two - one)


def _comment(name: str) -> str:
    """The preset file's leading comment."""
    lines = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()
    return " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_importer_reads_the_published_config_as_the_preset(name):
    model_type, published, _, _ = PUBLISHED[name]
    assert_importer_gives_preset(name, model_type, published)
    cfg = load_model_config(name)
    assert cfg.export_as == model_type and cfg.param_dtype == cfg.compute_dtype == "bfloat16"


def test_qwen3_5_multimodal_wrapper_reads_as_its_text_model():
    """The checkpoint's own config.json: model_type qwen3_5, the text model under text_config, tying at the top."""
    _, text, _, _ = PUBLISHED["qwen3.5-2b"]
    wrapped = {"model_type": "qwen3_5", "text_config": {"model_type": "qwen3_5_text",
                                                        **{k: v for k, v in text.items() if k != "tie_word_embeddings"}},
               "tie_word_embeddings": True}
    assert config_from_hf(wrapped) == config_from_hf({"model_type": "qwen3_5_text", **text})


def test_lfm2_config_with_block_ff_dim_only_reads_as_the_preset():
    """LFM2's older spelling of intermediate_size (transformers' Lfm2Config takes it too)."""
    _, published, _, _ = PUBLISHED["lfm2-1.2b"]
    assert_importer_gives_preset("lfm2-1.2b", "lfm2", {k: v for k, v in published.items() if k != "intermediate_size"})


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_equals_transformers_and_the_presets_comment(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, published, total, active = PUBLISHED[name]
    with torch.device("meta"):  # shapes only
        reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **published))
    theirs = sum(p.numel() for p in reference.parameters())  # a tied lm_head is counted once
    cfg = load_model_config(name)
    ours = _count(cfg)
    assert ours == theirs == total
    assert f"{total:,} parameters" in _comment(name)
    if active is None:
        assert not cfg.moe.n_experts
    else:
        assert active_params(cfg, ours) == active
        assert f"{active:,} per token" in _comment(name)
