"""LoRA: identity at init, merge, trainable split, sharding axes, dropout, torch and PEFT export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer.config import ModelConfig, TrainConfig
from jaxformer.finetune.lora import (LoRAConfig, LoRALinear, apply_lora, lora_modules, merge_lora, set_dropout,
                                     split_trainable, trainable_report)
from jaxformer.interop import to_numpy_state_dict
from jaxformer.models import DecoderLM
from jaxformer.train.optim import make_optimizer
from jaxformer.train.step import lm_loss, make_train_step

LLAMA = ModelConfig.llama(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)
GPT2 = ModelConfig.gpt2(vocab_size=96, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32)
PHI3 = LLAMA.replace(export_as="phi3")  # q/k/v and gate/up fused in Hugging Face's Phi-3
QWEN3 = LLAMA.replace(qk_norm="head", head_dim=16)  # q_norm / k_norm beside the projections
OLMO2 = LLAMA.replace(qk_norm="proj", norm_placement="post")


def _tokens(cfg, B=2, T=11, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)), jnp.int32)


def _randomize_b(model, seed=1, scale=0.05):
    """Adapters with a nonzero update (B starts at zero, which would hide every bug)."""
    rng = np.random.default_rng(seed)
    for _, m in lora_modules(model):
        m.lora_B.weight.set_value(jnp.asarray(rng.normal(size=m.lora_B.weight.shape) * scale, jnp.float32))
    return model


def _lora_model(cfg, lcfg=None, seed=0):
    model = DecoderLM(cfg, rngs=nnx.Rngs(seed))
    return apply_lora(model, lcfg or LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(seed + 100))


def test_lora_at_init_leaves_logits_unchanged():
    model = DecoderLM(LLAMA, rngs=nnx.Rngs(0))
    tokens = _tokens(LLAMA)
    before = np.asarray(model(tokens))
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(5))
    assert len(lora_modules(model)) == 2 * 7
    for _, m in lora_modules(model):
        assert float(jnp.abs(m.lora_A.weight[...]).max()) > 0  # A is random, B is zero: B A = 0
        assert float(jnp.abs(m.lora_B.weight[...]).max()) == 0
        assert float(jnp.abs(m.lora_A.weight[...]).max()) <= 1 / np.sqrt(m.weight.shape[1])
    np.testing.assert_array_equal(np.asarray(model(tokens)), before)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_unmerged_and_numpy_merge(rslora):
    model = _randomize_b(_lora_model(LLAMA, LoRAConfig(rank=4, alpha=8.0, rslora=rslora)))
    tokens = _tokens(LLAMA)
    unmerged = np.asarray(model(tokens))
    base_sd = {k: v for k, v in to_numpy_state_dict(model).items() if "lora_" not in k}
    merged = merge_lora(model)
    assert not lora_modules(merged)
    np.testing.assert_allclose(np.asarray(merged(tokens)), unmerged, rtol=1e-5, atol=1e-5)
    scale = 8.0 / (np.sqrt(4) if rslora else 4)
    got = to_numpy_state_dict(merged)
    assert sorted(got) == sorted(base_sd)
    for name, m in lora_modules(model):  # W' = W + (alpha / r) B A, computed here in float64
        a, b = np.asarray(m.lora_A.weight[...], np.float64), np.asarray(m.lora_B.weight[...], np.float64)
        np.testing.assert_allclose(got[f"{name}.weight"], base_sd[f"{name}.weight"] + scale * b @ a, atol=1e-6)
    untouched = [k for k in base_sd if not any(k == f"{n}.weight" for n, _ in lora_modules(model))]
    assert all(np.array_equal(got[k], base_sd[k]) for k in untouched)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_merged_model_exports_to_torch_ref(cfg):
    import torch

    from jaxformer.interop import to_torch

    model = _randomize_b(_lora_model(cfg, LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "up", "down"))))
    tokens = _tokens(cfg)
    ours = np.asarray(model(tokens))  # unmerged jaxformer
    with torch.no_grad():
        ref = to_torch(merge_lora(model))(torch.from_numpy(np.array(tokens)).long()).numpy()
    np.testing.assert_allclose(ref, ours, atol=1e-4)


def test_targets_rank_and_trainable_counts():
    lcfg = LoRAConfig(rank=3, alpha=6.0, targets=("q", "v_proj", "down"))
    model = _lora_model(LLAMA, lcfg)
    names = sorted(n for n, _ in lora_modules(model))
    assert names == sorted(f"layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj",
                                                                         "mlp.down_proj"))
    D, NH, KH, F, r = 32, 4 * 8, 2 * 8, 48, 3
    expected = 2 * r * ((D + NH) + (D + KH) + (F + D))
    graphdef, params, _ = split_trainable(model, "lora")
    tx = make_optimizer(TrainConfig(lr=1e-3))
    report = trainable_report(model, params, tx)
    n_base = sum(int(np.prod(v.shape)) for k, v in to_numpy_state_dict(model).items() if "lora_" not in k)
    assert report["trainable_params"] == expected and report["total_params"] == n_base + expected
    # AdamW holds two float32 moments per trainable parameter (plus a few step counters)
    assert 8 * expected <= report["optimizer_bytes"] <= 8 * expected + 64
    assert 8 * n_base <= report["full_finetune_optimizer_bytes"] <= 8 * n_base + 64
    with pytest.raises(ValueError, match="unknown lora.targets"):
        LoRAConfig(targets=("q", "qkv"))
    with pytest.raises(ValueError, match="no gate_proj"):
        apply_lora(DecoderLM(GPT2, rngs=nnx.Rngs(0)), LoRAConfig(targets=("gate",)), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cfg", [QWEN3, OLMO2], ids=["qwen3", "olmo2"])
def test_qk_norms_are_not_targets(cfg):
    """With q_norm / k_norm present (per head or over the projection), only the seven projections are adapted."""
    model = _lora_model(cfg, LoRAConfig(rank=2, alpha=4.0))
    assert sorted(n for n, _ in lora_modules(model)) == sorted(
        f"layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                      "mlp.down_proj"))
    attn = model.layers[0].self_attn
    assert not isinstance(attn.q_norm, LoRALinear) and not isinstance(attn.k_norm, LoRALinear)
    _, params, _ = split_trainable(model, "lora")
    assert all("norm" not in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(params))


def test_adapter_axes_follow_the_base_weight():
    model = _lora_model(LLAMA)
    axes = {n: (m.lora_A.weight.get_metadata()["logical_axes"], m.lora_B.weight.get_metadata()["logical_axes"])
            for n, m in lora_modules(model)}
    assert axes["layers.0.self_attn.q_proj"] == ((None, "embed"), ("heads", None))
    assert axes["layers.0.self_attn.k_proj"] == ((None, "embed"), ("kv_heads", None))
    assert axes["layers.0.self_attn.o_proj"] == ((None, "heads"), ("embed", None))
    assert axes["layers.1.mlp.gate_proj"] == ((None, "embed"), ("mlp", None))
    assert axes["layers.1.mlp.down_proj"] == ((None, "mlp"), ("embed", None))


def test_dropout_only_in_training_mode():
    tokens = _tokens(LLAMA)
    plain = _randomize_b(_lora_model(LLAMA, LoRAConfig(rank=4, alpha=8.0)))
    drop = _randomize_b(_lora_model(LLAMA, LoRAConfig(rank=4, alpha=8.0, dropout=0.5)))
    assert not np.allclose(np.asarray(drop(tokens)), np.asarray(plain(tokens)), atol=1e-4)
    set_dropout(drop, False)
    np.testing.assert_array_equal(np.asarray(drop(tokens)), np.asarray(plain(tokens)))


def test_train_step_updates_only_adapters():
    """The step differentiates and optimizes the adapters alone; the frozen base is never an output."""
    model = _randomize_b(_lora_model(LLAMA, LoRAConfig(rank=4, alpha=8.0, dropout=0.1)))
    base_before = {k: v for k, v in to_numpy_state_dict(model).items() if "lora_" not in k}
    graphdef, params, frozen = split_trainable(model, "lora")
    assert {str(p[-2]) for p, _ in nnx.to_flat_state(params)} == {"lora_A", "lora_B"}
    tx = optax.adamw(1e-2, weight_decay=0.1)  # decay would move the base if it were in the optimizer
    opt_state = tx.init(params)
    shapes = {tuple(x.shape) for x in jax.tree.leaves(opt_state) if x.ndim}
    assert shapes == {tuple(x.shape) for x in jax.tree.leaves(params)}  # moments for adapters only
    rng = np.random.default_rng(3)
    tok = rng.integers(0, 96, (4, 17)).astype(np.int32)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)),
             "segment_ids": np.ones((4, 16), np.int32), "loss_mask": np.ones((4, 16), np.float32)}
    step = jax.jit(make_train_step(lm_loss(graphdef, packed=True), tx))
    new = params
    for _ in range(3):
        new, opt_state, m = step(new, opt_state, batch, frozen)
    trained = nnx.merge(graphdef, new, *frozen)
    after = to_numpy_state_dict(trained)
    assert all(np.array_equal(after[k], v) for k, v in base_before.items())  # base bit-identical
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(new), jax.tree.leaves(params))]
    assert min(moved) > 0  # every adapter factor trained


# ----------------------------------------------------------------------------- Hugging Face PEFT

def _hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.array(tokens)).long()).logits.numpy()


ALL7 = ("q", "k", "v", "o", "gate", "up", "down")
PEFT_CASES = {  # config, our targets, PEFT's target_modules and rank_pattern (fused modules: rank m * 4)
    "llama": (LLAMA, ALL7, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"], {}),
    "gpt2": (GPT2, ("q", "v", "o", "up", "down"), ["c_attn", "c_fc", "c_proj"], {"c_attn": 8}),
    "phi3": (PHI3, ("q", "v", "o", "gate", "down"), ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
             {"qkv_proj": 8}),
    "qwen3": (QWEN3, ALL7, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"], {}),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_export_loads_with_peft_and_matches(tmp_path, case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxformer.finetune.peft import load_peft, save_peft
    from jaxformer.interop.hf import save_hf

    cfg, targets, peft_targets, rank_pattern = PEFT_CASES[case]
    model = _randomize_b(_lora_model(cfg, LoRAConfig(rank=4, alpha=8.0, targets=targets)))
    base = DecoderLM(cfg, rngs=nnx.Rngs(0))  # the same base weights, without adapters
    save_hf(base, tmp_path / "base")
    save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == peft_targets and config["rank_pattern"] == rank_pattern
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    tokens = _tokens(cfg, T=13, seed=4)
    ours = np.asarray(model(tokens))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter").eval()
    np.testing.assert_allclose(_hf_logits(peft_model, tokens), ours, atol=1e-4)
    merged_hf = peft_model.merge_and_unload()
    np.testing.assert_allclose(_hf_logits(merged_hf, tokens), np.asarray(merge_lora(model)(tokens)), atol=1e-4)
    back = load_peft(DecoderLM(cfg, rngs=nnx.Rngs(0)), tmp_path / "adapter")  # and back into jaxformer
    np.testing.assert_allclose(np.asarray(back(tokens)), ours, atol=1e-5)
    # fused modules (GPT-2's c_attn, Phi-3's qkv_proj / gate_up_proj) split back into the adapters they came from
    assert [(n, m.rank, m.scaling) for n, m in lora_modules(back)] == [
        (n, m.rank, pytest.approx(m.scaling, rel=1e-12)) for n, m in lora_modules(model)]


PEFT_WRITTEN = {  # transformers config class, its model class, PEFT target_modules, what they adapt in jaxformer
    "llama": ("LlamaConfig", "LlamaForCausalLM", ["q_proj", "v_proj", "down_proj"],
              ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", ["qkv_proj", "gate_up_proj"],  # fused: every part shares A
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")),
}


@pytest.mark.parametrize("case", sorted(PEFT_WRITTEN))
def test_load_an_adapter_that_peft_wrote(tmp_path, case):
    """peft's own save_pretrained output (random LoRA on a random transformers model) loads into jaxformer."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from jaxformer.finetune.peft import load_peft
    from jaxformer.interop.hf import load_hf

    config_cls, model_cls, peft_targets, ours = PEFT_WRITTEN[case]
    torch.manual_seed(0)
    hf_cfg = getattr(transformers, config_cls)(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = getattr(transformers, model_cls)(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=12, target_modules=peft_targets,
                                               lora_dropout=0.0, init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    model = load_peft(load_hf(tmp_path / "base"), tmp_path / "adapter")
    assert sorted(n for n, _ in lora_modules(model)) == sorted(f"layers.{i}.{m}" for i in range(2) for m in ours)
    assert all(m.scaling == 3.0 and m.rank == 4 for _, m in lora_modules(model))
    tokens = _tokens(LLAMA, T=9, seed=6)
    np.testing.assert_allclose(np.asarray(model(tokens)), _hf_logits(peft_model, tokens), atol=1e-4)
    assert isinstance(lora_modules(model)[0][1], LoRALinear)


def test_peft_errors_name_the_problem(tmp_path):
    from jaxformer.finetune.peft import load_peft, save_peft

    with pytest.raises(ValueError, match="no LoRA adapters to export"):
        save_peft(DecoderLM(LLAMA, rngs=nnx.Rngs(0)), tmp_path / "none")
    save_peft(_randomize_b(_lora_model(PHI3, LoRAConfig(rank=2, alpha=4.0, targets=("q",)))), tmp_path / "phi3")
    with pytest.raises(ValueError, match=r"PEFT module model\.layers\.0\.self_attn\.qkv_proj is not a projection "
                                         r"of this llama model's blocks"):
        load_peft(DecoderLM(LLAMA, rngs=nnx.Rngs(0)), tmp_path / "phi3")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        load_peft(DecoderLM(LLAMA, rngs=nnx.Rngs(0)), tmp_path)
