"""jaxformer vs Hugging Face transformers (PyTorch GPT2LMHeadModel / LlamaForCausalLM), both directions.

Models are random-init from configs (nothing is downloaded), then every weight is overwritten
with seeded random values so norms, biases and embeddings all matter. Prompts are 320 tokens.
Import: HF save_pretrained (single file, sharded safetensors, pytorch_model.bin[+index]) -> load_hf.
Export: jaxformer save_hf (single file, sharded) -> AutoModelForCausalLM.from_pretrained.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import jaxformer
from jaxformer import ModelConfig
from parity_tests.conftest import (assert_hf_close, jax_logits, jax_params, quiet_transformers, random_jax_module,
                                   randomize_torch)

quiet_transformers()
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

PROMPT_LEN = 320
BATCH = 2


@dataclasses.dataclass(frozen=True)
class Case:
    family: str  # "gpt2" | "llama"
    hf: dict  # transformers config kwargs
    ours: ModelConfig  # the same architecture as a jaxformer config
    attn: str = "sdpa"  # transformers attention implementation used as the reference


CASES = {
    "gpt2_mha_v1001_tied": Case(
        "gpt2", dict(vocab_size=1001, n_embd=32, n_layer=2, n_head=4, n_positions=384),
        ModelConfig.gpt2(vocab_size=1001, d_model=32, n_layers=2, n_heads=4, d_ff=128, max_seq_len=384), "eager"),
    "gpt2_untied_eps": Case(
        "gpt2", dict(vocab_size=300, n_embd=48, n_layer=1, n_head=3, n_inner=96, n_positions=336,
                     layer_norm_epsilon=1e-6, tie_word_embeddings=False),
        ModelConfig.gpt2(vocab_size=300, d_model=48, n_layers=1, n_heads=3, d_ff=96, max_seq_len=336, norm_eps=1e-6,
                         tie_embeddings=False)),
    "llama_mha_v1001_untied": Case(
        "llama", dict(vocab_size=1001, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=384,
                      tie_word_embeddings=False),
        ModelConfig.llama(vocab_size=1001, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=384,
                          norm_eps=1e-6)),
    "llama_gqa2_tied_theta5e5": Case(
        "llama", dict(vocab_size=512, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=400,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
        ModelConfig.llama(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=80, max_seq_len=400,
                          rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True), "eager"),
    "llama_mqa1_theta1e6_wide": Case(
        "llama", dict(vocab_size=256, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=320,
                      rope_theta=1e6, tie_word_embeddings=False),
        ModelConfig.llama(vocab_size=256, d_model=48, n_layers=1, n_heads=4, n_kv_heads=1, head_dim=16, d_ff=64,
                          max_seq_len=320, rope_theta=1e6, norm_eps=1e-6)),
    "llama_bias_gqa2": Case(  # attention_bias = mlp_bias = True (jaxformer's use_bias)
        "llama", dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=320,
                      attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
        ModelConfig.llama(vocab_size=300, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=320,
                          norm_eps=1e-6, use_bias=True)),
}
HF_CLASSES = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}


def hf_model(case: Case, seed: int, std: float = 0.2):
    """A transformers model for `case` with every parameter seeded-random."""
    if case.family == "gpt2":
        config = GPT2Config(**case.hf, bos_token_id=0, eos_token_id=0)
    else:
        config = LlamaConfig(**case.hf)
    config._attn_implementation = case.attn
    model = HF_CLASSES[case.family](config).eval()
    return randomize_torch(model, seed, std)


def prompt(case: Case, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, case.ours.vocab_size, (BATCH, PROMPT_LEN)).astype(np.int32)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()


def check_import(case: Case, hf, path: Path, seed: int) -> float:
    model = jaxformer.load_hf(path)
    assert model.config == case.ours, f"config_from_hf: {model.config} != {case.ours}"
    tokens = prompt(case, seed)
    ref = hf_logits(hf, tokens)
    assert np.abs(ref).max() > 1.0, "logits too small for a meaningful check"
    return assert_hf_close(jax_logits(model, tokens), ref)


def load_exported(case: Case, path: Path):
    hf, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, attn_implementation=case.attn)
    assert type(hf) is HF_CLASSES[case.family]
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"] or info["error_msgs"]), info
    c = hf.config
    assert c.vocab_size == case.ours.vocab_size and c.tie_word_embeddings == case.ours.tie_embeddings
    if case.family == "llama":
        assert c.num_key_value_heads == case.ours.n_kv_heads
        assert c.rope_parameters["rope_theta"] == case.ours.rope.theta
        assert c.head_dim == case.ours.head_dim
    return hf.eval()


def check_export(case: Case, model, path: Path, seed: int) -> float:
    hf = load_exported(case, path)
    tokens = prompt(case, seed)
    ref = hf_logits(hf, tokens)
    assert np.abs(ref).max() > 1.0, "logits too small for a meaningful check"
    return assert_hf_close(jax_logits(model, tokens), ref)


# ----------------------------------------------------------------------------- import (HF -> jaxformer)

@pytest.mark.parametrize("name", list(CASES))
def test_import_save_pretrained(name, tmp_path):
    case = CASES[name]
    hf = hf_model(case, seed=1)
    hf.save_pretrained(tmp_path)
    check_import(case, hf, tmp_path, seed=2)


@pytest.mark.parametrize("name", ["gpt2_untied_eps", "llama_gqa2_tied_theta5e5"])
def test_import_sharded_safetensors(name, tmp_path):
    case = CASES[name]
    hf = hf_model(case, seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    check_import(case, hf, tmp_path, seed=4)


def _save_bin(hf, path: Path, shards: int) -> None:
    """pytorch_model.bin (or .bin shards + index) as older transformers wrote them; tied copies included."""
    hf.config.save_pretrained(path)
    sd = hf.state_dict()
    if shards == 1:
        torch.save(sd, path / "pytorch_model.bin")
        return
    keys = list(sd)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({keys[j]: sd[keys[j]].clone() for j in part}, path / name)
        weight_map.update({keys[j]: name for j in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
             "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name,shards", [("gpt2_mha_v1001_tied", 1), ("llama_gqa2_tied_theta5e5", 1),
                                         ("llama_mha_v1001_untied", 3)])
def test_import_pytorch_bin(name, shards, tmp_path):
    case = CASES[name]
    hf = hf_model(case, seed=5)
    _save_bin(hf, tmp_path, shards)
    assert not list(tmp_path.glob("*.safetensors"))
    check_import(case, hf, tmp_path, seed=6)


# ----------------------------------------------------------------------------- export (jaxformer -> HF)

@pytest.mark.parametrize("name", list(CASES))
def test_export_save_hf(name, tmp_path):
    case = CASES[name]
    model = random_jax_module(lambda: jaxformer.DecoderLM(case.ours, rngs=nnx.Rngs(0)), seed=7)
    jaxformer.save_hf(model, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    check_export(case, model, tmp_path, seed=8)


@pytest.mark.parametrize("name", ["gpt2_mha_v1001_tied", "llama_mqa1_theta1e6_wide"])
def test_export_sharded_and_reimport_lossless(name, tmp_path):
    case = CASES[name]
    model = random_jax_module(lambda: jaxformer.DecoderLM(case.ours, rngs=nnx.Rngs(0)), seed=9)
    jaxformer.save_hf(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    for p in shards:  # a shard holds at most 20 kB of tensors, unless one tensor alone is bigger
        tensors = load_file(str(p))
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 20_000, p.name
    check_export(case, model, tmp_path, seed=10)
    # export -> import gives back exactly the same weights
    back = jaxformer.load_hf(tmp_path)
    assert back.config == case.ours
    a, b = jax_params(model), jax_params(back)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k][...]), np.asarray(b[k][...]), err_msg=k)
