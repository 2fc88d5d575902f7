"""The presets of the newer Hugging Face families against each checkpoint's published config.json and transformers.

PUBLISHED holds, per preset, the checkpoint's config.json architecture fields as the Hub spells them (no download:
written out here, from the config.json or a copy of it; the source is named beside each entry) and a parameter
count. The counts are transformers' meta-device counts for exactly these config values: the number of
parameters of `AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))` built under
`torch.device("meta")` (a tied lm_head counted once), computed once and written as literals; they are not model
card figures. jaxformer's importer must read the fields as the preset (training-only and dtype fields aside), and
DecoderLM under nnx.eval_shape must have exactly that many parameters. Everything runs on shapes only.
"""

from __future__ import annotations

import pytest
from flax import nnx

from jaxformer.config import load_model_config
from jaxformer.models import DecoderLM, count_params
from tests.conftest import assert_importer_gives_preset

OLMO3_TYPES = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(32)]  # 3 sliding : 1 full
LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

# preset: (model_type, config.json architecture fields of the checkpoint, transformers' meta-device count)
PUBLISHED = {
    # HuggingFaceTB/SmolLM3-3B ("pretraining_tp": 2 slices pre-training's matmuls; transformers 5 reads it nowhere)
    "smollm3-3b": ("smollm3", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=65536, rms_norm_eps=1e-6, hidden_act="silu",
        rope_theta=5000000.0, rope_scaling=None, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        use_sliding_window=False, sliding_window=None, max_window_layers=28, layer_types=["full_attention"] * 36,
        no_rope_layer_interval=4, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(36)], pretraining_tp=2),
        3_075_098_624),
    # allenai/Olmo-3-1025-7B, RoPE as transformers 5 writes it (one entry per layer type)
    "olmo3-7b": ("olmo3", dict(
        vocab_size=100278, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=65536, rms_norm_eps=1e-6, hidden_act="silu",
        attention_bias=False, tie_word_embeddings=False, sliding_window=4096, layer_types=OLMO3_TYPES,
        rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 500000, "factor": 8.0,
                                            "original_max_position_embeddings": 8192,
                                            "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0}}), 7_298_011_136),
    # LGAI-EXAONE/EXAONE-4.0-1.2B (no sliding window: every layer full, with RoPE)
    "exaone4-1.2b": ("exaone4", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=4096, num_hidden_layers=30, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=65536, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=1000000.0, rope_scaling={**LLAMA3_ROPE, "factor": 16.0}, sliding_window=None,
        sliding_window_pattern=None, layer_types=["full_attention"] * 30, tie_word_embeddings=True), 1_279_391_488),
    # arcee-ai/AFM-4.5B
    "afm-4.5b": ("arcee", dict(
        vocab_size=128005, hidden_size=2560, intermediate_size=18432, num_hidden_layers=36, num_attention_heads=20,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=65536, rms_norm_eps=1e-5, hidden_act="relu2",
        rope_theta=10000.0, rope_scaling={"rope_type": "yarn", "factor": 20.0, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False), 4_619_189_760),
    # kyutai/helium-1-preview-2b
    "helium-2b": ("helium", dict(
        vocab_size=48000, hidden_size=2560, intermediate_size=7040, num_hidden_layers=24, num_attention_heads=20,
        num_key_value_heads=20, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-8, hidden_act="silu",
        rope_theta=100000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False, pretraining_tp=1),
        2_172_643_840),
    # baidu/ERNIE-4.5-0.3B-PT
    "ernie4.5-0.3b": ("ernie4_5", dict(
        vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18, num_attention_heads=16,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=500000.0, use_bias=False, tie_word_embeddings=True), 360_748_032),
    # ByteDance-Seed/Seed-OSS-36B-Base
    "seed-oss-36b": ("seed_oss", dict(
        vocab_size=155136, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=80,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=524288, rms_norm_eps=1e-6, hidden_act="silu",
        rope_theta=10000000.0, tie_word_embeddings=False, attention_bias=True, attention_out_bias=False,
        mlp_bias=False, pretraining_tp=1), 36_151_104_512),
    # bigcode/starcoder2-3b
    "starcoder2-3b": ("starcoder2", dict(
        vocab_size=49152, hidden_size=3072, intermediate_size=12288, num_hidden_layers=30, num_attention_heads=24,
        num_key_value_heads=2, max_position_embeddings=16384, norm_epsilon=1e-5, hidden_act="gelu_pytorch_tanh",
        rope_theta=999999.4420358813, sliding_window=4096, use_bias=True, tie_word_embeddings=True), 3_030_371_328),
    # THUDM/GLM-4-9B-0414 (zai-org)
    "glm4-9b": ("glm4", dict(
        vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=10000.0, partial_rotary_factor=0.5, attention_bias=True, tie_word_embeddings=False),
        9_400_279_040),
    # ibm-granite/granite-3.3-2b-base
    "granite3.3-2b": ("granite", dict(
        vocab_size=49159, hidden_size=2048, intermediate_size=8192, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=10000000.0, rope_scaling=None, attention_multiplier=0.015625, embedding_multiplier=12.0,
        logits_scaling=8.0, residual_multiplier=0.22, tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False), 2_533_539_840),
    # CohereLabs/c4ai-command-r7b-12-2024 (no tie_word_embeddings key: Cohere2Config's default, tied)
    "command-r7b": ("cohere2", dict(
        vocab_size=256000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, layer_norm_eps=1e-5, hidden_act="silu",
        logit_scale=0.25, rope_theta=50000, rope_scaling=None, sliding_window=4096, sliding_window_pattern=4,
        attention_bias=False), 8_028_033_024),
    # tencent/Hunyuan-7B-Instruct
    "hunyuan-7b": ("hunyuan_v1_dense", dict(
        vocab_size=128167, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=10000.0, rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0, "beta_fast": 32,
                                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, pretraining_tp=1), 7_504_568_320),
    # swiss-ai/Apertus-8B-2509
    "apertus-8b": ("apertus", dict(
        vocab_size=131072, hidden_size=4096, intermediate_size=21504, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=65536, rms_norm_eps=1e-5, hidden_act="xielu",
        rope_theta=12000000, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False), 8_053_338_176),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_importer_reads_the_published_config_as_the_preset(name):
    model_type, published, _ = PUBLISHED[name]
    assert_importer_gives_preset(name, model_type, published)
    cfg = load_model_config(name)
    assert cfg.export_as == model_type
    assert cfg.param_dtype == cfg.compute_dtype == "bfloat16"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_equals_transformers(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, published, count = PUBLISHED[name]
    with torch.device("meta"):  # shapes only: a 36B model costs no memory
        reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **published))
    theirs = sum(p.numel() for p in reference.parameters())  # a tied lm_head is counted once
    cfg = load_model_config(name)
    ours = count_params(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))))
    assert ours == theirs == count
