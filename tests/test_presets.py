"""The open-family presets in configs/ against the published config.json of each checkpoint and transformers.

PUBLISHED holds each checkpoint's config.json architecture fields as the Hugging Face Hub spells them (no
download: written out here). transformers' config class reads them (and normalises legacy spellings, e.g.
Gemma's hidden_act "gelu" -> "gelu_pytorch_tanh", rope_theta/rope_scaling -> rope_parameters); the preset,
mapped onto transformers' attributes by `hf_attributes` below, must equal it. The model transformers builds
from that config on torch's meta device (no memory) must have exactly the parameters jaxformer's DecoderLM
has under nnx.eval_shape, and the count on the model card.
"""

from __future__ import annotations

import json

import pytest
from flax import nnx

from jaxformer.config import ModelConfig, load_model_config
from jaxformer.models import DecoderLM, count_params
from tests.conftest import assert_importer_gives_preset

LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
GEMMA2_TYPES = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(26)]  # layer 0 slides

# preset: (model_type, config.json architecture fields of the checkpoint, its parameter count)
PUBLISHED = {
    "llama3.2-1b": ("llama", dict(  # meta-llama/Llama-3.2-1B
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 32.0}, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False), 1_235_814_400),
    "llama3.1-8b": ("llama", dict(  # meta-llama/Llama-3.1-8B
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False), 8_030_261_248),
    "llama3.1-70b": ("llama", dict(  # meta-llama/Llama-3.1-70B (the serving plan's model: docs/serving.md)
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False), 70_553_706_496),
    "qwen2.5-0.5b": ("qwen2", dict(  # Qwen/Qwen2.5-0.5B
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
        rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768,
        max_window_layers=24), 494_032_768),
    "qwen2.5-7b": ("qwen2", dict(  # Qwen/Qwen2.5-7B
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=131072, rms_norm_eps=1e-6, hidden_act="silu",
        rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False, sliding_window=131072,
        max_window_layers=28), 7_615_616_512),
    "qwen3-0.6b": ("qwen3", dict(  # Qwen/Qwen3-0.6B
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, hidden_act="silu",
        rope_theta=1000000, rope_scaling=None, tie_word_embeddings=True, attention_bias=False,
        use_sliding_window=False, sliding_window=None, max_window_layers=28), 596_049_920),
    "mistral-7b": ("mistral", dict(  # mistralai/Mistral-7B-v0.1
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False), 7_241_732_096),
    "gemma-2b": ("gemma", dict(  # google/gemma-2b
        vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_act="gelu",
        rope_theta=10000.0, attention_bias=False), 2_506_172_416),
    "gemma2-2b": ("gemma2", dict(  # google/gemma-2-2b
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, attention_bias=False), 2_614_341_888),
    "gemma3-1b": ("gemma3_text", dict(  # google/gemma-3-1b-pt
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", rope_theta=1000000, rope_local_base_freq=10000, rope_scaling=None,
        query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6, attn_logit_softcapping=None,
        final_logit_softcapping=None, attention_bias=False), 999_885_952),
    "phi3-mini": ("phi3", dict(  # microsoft/Phi-3-mini-4k-instruct
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, hidden_act="silu", rope_theta=10000.0, rope_scaling=None, sliding_window=2047,
        tie_word_embeddings=False), 3_821_079_552),
    "olmo2-1b": ("olmo2", dict(  # allenai/OLMo-2-0425-1B
        vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu",
        rope_theta=500000, rope_scaling=None, tie_word_embeddings=False, attention_bias=False), 1_484_916_736),
}
ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


def rope_parameters(theta: float, cfg: ModelConfig) -> dict:
    """transformers 5's rope_parameters entry for `theta` and the preset's scaling."""
    s = cfg.rope.scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": theta}
    assert s.rope_type == "llama3", "these presets scale RoPE only as Llama 3.1 / 3.2"
    return {"rope_type": "llama3", "rope_theta": theta, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}


def hf_attributes(cfg: ModelConfig) -> dict:
    """The transformers config attributes (transformers 5 names) that the preset's fields stand for."""
    family = cfg.family
    out = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
               num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
               intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
               tie_word_embeddings=cfg.tie_embeddings)
    out["hidden_activation" if family in ("gemma2", "gemma3_text") else "hidden_act"] = ACTIVATIONS[cfg.activation]
    types = [cfg.layer_type(i) for i in range(cfg.n_layers)]
    if family == "gemma3_text":  # one RoPE per layer type
        out["rope_parameters"] = {"full_attention": rope_parameters(cfg.rope.theta, cfg),
                                  "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope.local_theta}}
    else:
        out["rope_parameters"] = rope_parameters(cfg.rope.theta, cfg)
    if family == "phi3":
        out["rope_parameters"]["partial_rotary_factor"] = 1.0
    if family in ("mistral", "phi3", "qwen2", "qwen3", "gemma2", "gemma3_text"):
        out["sliding_window"] = cfg.attention.sliding_window
    if family in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
        out["layer_types"] = types
    if family in ("gemma2", "gemma3_text"):
        out.update(query_pre_attn_scalar=cfg.attention.query_pre_attn_scalar or cfg.head_dim,  # None: head_dim (config.py)
                   attn_logit_softcapping=cfg.attention.logit_softcap,
                   final_logit_softcapping=cfg.final_logit_softcap)
    if family in ("llama", "qwen3", "olmo2", "gemma", "gemma2", "gemma3_text"):
        out["attention_bias"] = cfg.use_bias
    return out


def hf_config(name: str):
    from transformers import AutoConfig

    model_type, published, _ = PUBLISHED[name]
    return AutoConfig.for_model(model_type, **published)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_is_the_published_config(name):
    cfg, hf = load_model_config(name), hf_config(name)
    assert cfg.family == PUBLISHED[name][0]
    mine = hf_attributes(cfg)
    theirs = {k: getattr(hf, k, None) for k in mine}
    if "head_dim" not in PUBLISHED[name][1] and theirs["head_dim"] is None:  # Phi-3, OLMo 2: derived
        theirs["head_dim"] = hf.hidden_size // hf.num_attention_heads
    assert mine == theirs


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_equals_transformers(name):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: an 8B model costs no memory
        reference = AutoModelForCausalLM.from_config(hf_config(name))
    theirs = sum(p.numel() for p in reference.parameters())  # a tied lm_head is counted once
    cfg = load_model_config(name)
    ours = count_params(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))))
    assert ours == theirs == PUBLISHED[name][2]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_importer_reads_the_published_config_as_the_preset(name):
    model_type, published, _ = PUBLISHED[name]
    assert_importer_gives_preset(name, model_type, published)


def test_inspect_prints_family_attention_pattern_and_count(capsys):
    from jaxformer.cli import attention_pattern, head_sharing, main

    main(["inspect", "gemma3-1b"])
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["attention"], info["heads"], info["params"]) == (
        "gemma3_text", "5 sliding (window 512) : 1 full", "MQA 4:1", PUBLISHED["gemma3-1b"][2])
    expected = {"gemma2-2b": ("1 sliding (window 4096) : 1 full", "GQA 8:4"),
                "mistral-7b": ("all sliding (window 4096)", "GQA 32:8"), "olmo2-1b": ("all full", "MHA 16:16"),
                "qwen3.5-2b": ("18 linear_attention, 6 full_attention (period 4: linear_attention linear_attention "
                               "linear_attention full_attention)", "GQA 8:2"),
                "lfm2-1.2b": ("10 conv, 6 full_attention", "GQA 32:8")}
    for name, want in expected.items():
        cfg = load_model_config(name)
        assert (attention_pattern(cfg), head_sharing(cfg)) == want
    # no repeating period (Qwen2's full layers below max_window_layers, sliding above)
    cfg = ModelConfig.llama(n_layers=3, sliding_window=8, layer_types=["full_attention"] * 2 + ["sliding_attention"])
    assert attention_pattern(cfg) == "1 sliding (window 8), 2 full"
