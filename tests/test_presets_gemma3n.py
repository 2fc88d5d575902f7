"""The Gemma 3n presets against the published text_config values and transformers' Gemma3nForCausalLM.

As tests/test_presets_gemma4.py: PUBLISHED holds each checkpoint's text_config architecture fields (no download:
written out here from transformers' convert_gemma3n_weights.py and copies of the published config.json files) and the
counts, as literals. jaxformer's importer must read those fields, in both spellings (the published config.json's
`gemma3n` with rope_theta / rope_local_base_freq and a per-layer intermediate_size list in its text_config, and
transformers 5's `gemma3n_text` Gemma3nTextConfig.to_dict() with rope_parameters per layer type), as the preset field
by field (param_dtype and init_std aside); and jaxformer's model under nnx.eval_shape must have exactly the parameters
of the model transformers builds from the fields on torch's meta device, by name and shape. Everything runs on shapes
only.

The counts: transformers' buffers (the embedding, per-layer-input and AltUp router scales, the RoPE frequencies) are
all non-persistent constants, not in its state dict, and jaxformer keeps none of them as parameters, so the two counts
are equal. They are the text models only: the cards' E2B 5B and E4B 8B "raw" parameters also count the vision and
audio encoders.
"""

from __future__ import annotations

import pytest
from flax import nnx

from jaxformer.config import load_model_config
from jaxformer.interop.hf import config_from_hf
from jaxformer.interop.state_dict import param_shapes
from jaxformer.models import count_params, model_class
from jaxformer.models.moe import active_params


def _layer_types(n_layers: int) -> list[str]:
    return ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n_layers)]


COMMON = dict(  # every Gemma 3n text_config
    vocab_size=262400, vocab_size_per_layer_input=262144, hidden_size_per_layer_input=256, num_attention_heads=8,
    num_key_value_heads=2, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768,
    sliding_window=512, rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=True,
    rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None, final_logit_softcapping=30.0,
    altup_active_idx=0, altup_coef_clip=120.0, altup_correct_scale=True, altup_num_inputs=4, laurel_rank=64)

# preset: (text_config architecture fields, transformers' meta-device parameter count = jaxformer's)
PUBLISHED = {
    "gemma3n-e2b": (dict(  # google/gemma-3n-E2B
        COMMON, hidden_size=2048, intermediate_size=[8192] * 30, num_hidden_layers=30, layer_types=_layer_types(30),
        num_kv_shared_layers=10, activation_sparsity_pattern=[0.95] * 10 + [0.0] * 20),
        4_435_182_688),
    "gemma3n-e4b": (dict(  # google/gemma-3n-E4B
        COMMON, hidden_size=2048, intermediate_size=[16384] * 35, num_hidden_layers=35, layer_types=_layer_types(35),
        num_kv_shared_layers=15, activation_sparsity_pattern=[0.95] * 10 + [0.0] * 25),
        6_835_235_568),
}
NOT_ARCHITECTURE = ("param_dtype", "init_std")  # the presets' bfloat16 and the default init: no config.json field


def _architecture(cfg) -> dict:
    return {k: v for k, v in cfg.architecture().items() if k not in NOT_ARCHITECTURE}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gemma3n_preset_loads(name):
    cfg = load_model_config(name)
    assert (cfg.block, cfg.family, cfg.norm_placement) == ("gemma3n", "gemma3n_text", "sandwich")
    assert cfg.param_dtype == cfg.compute_dtype == "bfloat16"
    published = PUBLISHED[name][0]
    assert cfg.n_layers == len(published["layer_types"]) == len(cfg.activation_sparsity)
    assert (cfg.altup.inputs, cfg.laurel_rank, cfg.kv_shared_layers) == (4, 64, published["num_kv_shared_layers"])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_importer_reads_the_published_text_config_as_the_preset(name):
    from transformers import Gemma3nTextConfig

    published = PUBLISHED[name][0]
    preset = _architecture(load_model_config(name))
    # the published config.json: the multimodal model_type, the text model's fields under text_config
    as_published = config_from_hf({"model_type": "gemma3n", "text_config": published})
    # transformers 5's spelling (rope_parameters per layer type in place of rope_theta / rope_local_base_freq)
    saved = Gemma3nTextConfig(**published).to_dict()
    assert "rope_theta" not in saved and set(saved["rope_parameters"]) == {"full_attention", "sliding_attention"}
    as_saved = config_from_hf(saved)
    for got in (as_published, as_saved):
        mine = _architecture(got)
        assert {k: (mine.get(k), preset.get(k)) for k in mine.keys() | preset.keys()
                if mine.get(k) != preset.get(k)} == {}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gemma3n_parameter_count_equals_transformers(name):
    import torch
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    published, params = PUBLISHED[name]
    with torch.device("meta"):  # shapes only: no memory
        reference = Gemma3nForCausalLM(Gemma3nTextConfig(**published))
    theirs = sum(p.numel() for p in reference.parameters())  # the tied lm_head counted once
    assert theirs == params
    # transformers' buffers are constants it never saves: nothing jaxformer would have to count as a parameter
    persistent = set(reference.state_dict())
    assert [n for n, _ in reference.named_buffers() if n in persistent] == []
    cfg = load_model_config(name)
    model = nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0)))
    ours = count_params(model)
    assert ours == theirs == params
    assert active_params(cfg, ours) == ours  # no experts
    assert len(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))) == 0  # no variables beyond the parameters
    # the same parameters by name and shape (transformers' names less the "model." prefix)
    assert param_shapes(model) == {n.removeprefix("model."): tuple(p.shape) for n, p in reference.named_parameters()}
