"""The Gemma 4 presets against the published text_config values and transformers' Gemma4ForCausalLM.

As tests/test_presets_families.py and tests/test_moe_presets.py: PUBLISHED holds each checkpoint's text_config
architecture fields (no download: written out here from transformers' convert_gemma4_weights.py and copies of the
published config.json files) and the counts, as literals. jaxformer's importer must read those fields, in both
spellings (the published config.json's `gemma4` with global_head_dim / num_global_key_value_heads in its
text_config, and transformers 5's `gemma4_text` Gemma4TextConfig.to_dict() with per_layer_config), as the preset
field by field (param_dtype and init_std aside); and jaxformer's model under nnx.eval_shape must have exactly the
parameters of the model transformers builds from the fields on torch's meta device. Everything runs on shapes only.

The counts: transformers keeps every decoder layer's `layer_scalar` (one number per layer) as a buffer, jaxformer as
a parameter that takes no gradient, so jaxformer's count is transformers' parameters plus those buffers. They are
the text models only: the cards' E2B 5.1B and E4B 8B also count the vision and audio encoders; 26B-A4B 25.2B /
3.8B active and 31B 30.7B are these counts rounded.
"""

from __future__ import annotations

import pytest
from flax import nnx

from jaxformer.config import load_model_config
from jaxformer.interop.hf import config_from_hf
from jaxformer.models import count_params, model_class
from jaxformer.models.moe import active_params


def _layer_types(sliding: int, periods: int) -> list[str]:
    return (["sliding_attention"] * sliding + ["full_attention"]) * periods


COMMON = dict(  # every Gemma 4 text_config
    vocab_size=262144, head_dim=256, global_head_dim=512, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
    final_logit_softcapping=30.0, tie_word_embeddings=True, attention_bias=False, vocab_size_per_layer_input=262144,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1000000.0}})

# preset: (text_config architecture fields, transformers' meta-device parameter count, its layer_scalar buffers,
#          jaxformer's count = the two added, active parameters per token)
PUBLISHED = {
    "gemma4-e2b": (dict(  # google/gemma-4-E2B
        COMMON, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8,
        num_key_value_heads=1, num_global_key_value_heads=None, max_position_embeddings=131072, sliding_window=512,
        layer_types=_layer_types(4, 7), hidden_size_per_layer_input=256, attention_k_eq_v=False,
        num_kv_shared_layers=20, use_double_wide_mlp=True, enable_moe_block=False),
        4_628_569_344, 35, 4_628_569_379, 4_628_569_379),
    "gemma4-e4b": (dict(  # google/gemma-4-E4B
        COMMON, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=131072, sliding_window=512, layer_types=_layer_types(5, 7),
        hidden_size_per_layer_input=256, attention_k_eq_v=False, num_kv_shared_layers=18, use_double_wide_mlp=False,
        enable_moe_block=False),
        7_463_013_376, 42, 7_463_013_418, 7_463_013_418),
    "gemma4-26b-a4b": (dict(  # google/gemma-4-26B-A4B
        COMMON, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
        num_key_value_heads=8, num_global_key_value_heads=2, attention_k_eq_v=True, max_position_embeddings=262144,
        sliding_window=1024, layer_types=_layer_types(5, 5), hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704),
        25_233_141_760, 30, 25_233_141_790, 3_822_530_590),
    "gemma4-31b": (dict(  # google/gemma-4-31B
        COMMON, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60, num_attention_heads=32,
        num_key_value_heads=16, num_global_key_value_heads=4, attention_k_eq_v=True, max_position_embeddings=262144,
        sliding_window=1024, layer_types=_layer_types(5, 10), hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        enable_moe_block=False),
        30_697_345_280, 60, 30_697_345_340, 30_697_345_340),
}
NOT_ARCHITECTURE = ("param_dtype", "init_std")  # the presets' bfloat16 and the default init: no config.json field


def _architecture(cfg) -> dict:
    return {k: v for k, v in cfg.architecture().items() if k not in NOT_ARCHITECTURE}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gemma4_preset_loads(name):
    cfg = load_model_config(name)
    assert (cfg.block, cfg.family, cfg.norm_placement) == ("gemma4", "gemma4_text", "sandwich")
    assert cfg.param_dtype == cfg.compute_dtype == "bfloat16"
    assert cfg.n_layers == len(PUBLISHED[name][0]["layer_types"])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_importer_reads_the_published_text_config_as_the_preset(name):
    from transformers import Gemma4TextConfig

    published = PUBLISHED[name][0]
    preset = _architecture(load_model_config(name))
    # the published config.json: the multimodal model_type, the text model's fields under text_config
    as_published = config_from_hf({"model_type": "gemma4", "text_config": published})
    # transformers 5's spelling (per_layer_config in place of global_head_dim / num_global_key_value_heads)
    as_saved = config_from_hf(Gemma4TextConfig(**published).to_dict())
    for got in (as_published, as_saved):
        mine = _architecture(got)
        assert {k: (mine.get(k), preset.get(k)) for k in mine.keys() | preset.keys()
                if mine.get(k) != preset.get(k)} == {}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gemma4_parameter_count_equals_transformers(name):
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    published, params, scalars, total, active = PUBLISHED[name]
    with torch.device("meta"):  # shapes only: a 31B model costs no memory
        reference = Gemma4ForCausalLM(Gemma4TextConfig(**published))
    theirs = sum(p.numel() for p in reference.parameters())  # the tied lm_head counted once
    # every decoder layer's layer_scalar: a buffer in transformers, a parameter (no gradient) in jaxformer
    layer_scalars = sum(b.numel() for n, b in reference.named_buffers() if n.endswith("layer_scalar"))
    assert (theirs, layer_scalars) == (params, scalars)
    cfg = load_model_config(name)
    ours = count_params(nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))))
    assert ours == theirs + layer_scalars == total
    assert active_params(cfg, ours) == active
    assert (active < total) == bool(cfg.moe.n_experts)
