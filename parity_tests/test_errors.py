"""Mismatched checkpoints fail loudly and name what is wrong; unsupported architectures are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxformer
from jaxformer import CheckpointMismatchError, ModelConfig, UnsupportedCheckpointError
from parity_tests.conftest import quiet_transformers, random_jax_module

CFG = ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)


@pytest.fixture(scope="module")
def state_dict():
    model = random_jax_module(lambda: jaxformer.DecoderLM(CFG, rngs=nnx.Rngs(0)), seed=1)
    return jaxformer.to_torch_state_dict(model)


def test_wrong_shape_names_key_and_shapes(state_dict):
    sd = dict(state_dict)
    sd["layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)
    with pytest.raises(CheckpointMismatchError) as e:
        jaxformer.from_torch_state_dict(CFG, sd)
    msg = str(e.value)
    assert "layers.1.mlp.up_proj.weight" in msg and "(65, 32)" in msg and "(64, 32)" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_missing_key_is_named(state_dict):
    sd = {k: v for k, v in state_dict.items() if k != "layers.0.self_attn.k_proj.weight"}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: layers\.0\.self_attn\.k_proj\.weight"):
        jaxformer.from_torch_state_dict(CFG, sd)


def test_extra_key_is_named(state_dict):
    sd = {**state_dict, "layers.2.mlp.up_proj.weight": torch.zeros(64, 32)}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: layers\.2\.mlp\.up_proj\.weight"):
        jaxformer.from_torch_state_dict(CFG, sd)


def test_all_problems_reported_together(state_dict):
    sd = {k: v for k, v in state_dict.items() if k != "norm.weight"}
    sd["extra.bias"] = torch.zeros(3)
    sd["embed_tokens.weight"] = torch.zeros(63, 32)
    with pytest.raises(CheckpointMismatchError) as e:
        jaxformer.from_torch_state_dict(CFG, sd)
    msg = str(e.value)
    for key in ("norm.weight", "extra.bias", "embed_tokens.weight"):
        assert key in msg


def test_tied_untied_mismatch(state_dict):
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: lm_head\.weight"):
        jaxformer.from_torch_state_dict(CFG.replace(tie_embeddings=True), state_dict)


def test_hf_directory_with_mismatched_weights(tmp_path, state_dict):
    model = jaxformer.from_torch_state_dict(CFG, state_dict)
    jaxformer.save_hf(model, tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["model.layers.1.self_attn.v_proj.weight"] = np.zeros((8, 32), np.float32)
    del weights["model.layers.0.post_attention_layernorm.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as e:
        jaxformer.load_hf(tmp_path)
    msg = str(e.value)
    assert "layers.1.self_attn.v_proj.weight" in msg and "layers.0.post_attention_layernorm.weight" in msg


def test_hf_config_disagreeing_with_weights(tmp_path, state_dict):
    jaxformer.save_hf(jaxformer.from_torch_state_dict(CFG, state_dict), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # weights hold 2 kv heads
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=r"k_proj\.weight"):
        jaxformer.load_hf(tmp_path)


def test_unsupported_architecture(tmp_path):
    quiet_transformers()
    from transformers import BertConfig

    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
               intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedCheckpointError, match="bert"):
        jaxformer.load_hf(tmp_path)


def test_unsupported_llama_option(tmp_path, state_dict):
    jaxformer.save_hf(jaxformer.from_torch_state_dict(CFG, state_dict), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "proportional", "rope_theta": 500000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedCheckpointError, match="rope_type='proportional'"):
        jaxformer.load_hf(tmp_path)


def test_export_of_non_hf_architecture_is_refused(tmp_path):
    cfg = ModelConfig.llama(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64, position="sinusoidal")
    model = random_jax_module(lambda: jaxformer.DecoderLM(cfg, rngs=nnx.Rngs(0)), seed=2)
    with pytest.raises(UnsupportedCheckpointError):
        jaxformer.save_hf(model, tmp_path)
