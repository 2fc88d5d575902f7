"""LoRA on hybrid models' mixers: Gated DeltaNet (linear_attn: Qwen3.5, Qwen3-Next) and short convolution (conv: LFM2).

Identity at init, merged == unmerged, adapter paths and axes, PEFT adapters that transformers' Qwen3.5 / Qwen3-Next /
LFM2 load with peft (Qwen3-Next's fused, per-key-head interleaved in_proj_qkvz / in_proj_ba included), and a
`jaxformer.finetune` run on a hybrid base that trains the adapters alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
from flax import nnx

from jaxformer.finetune import (LoRAConfig, apply_lora, finetune, load_finetune_config, load_peft, lora_modules,
                                merge_lora, save_peft)
from jaxformer.finetune.lora import ALL_TARGETS, DEFAULT_TARGETS
from jaxformer.interop import native, to_numpy_state_dict
from jaxformer.models import DecoderLM
from tests.hybrid_mesh_worker import LFM2, QWEN3_5, QWEN3_NEXT
from tests.test_finetune import sft_data  # noqa: F401  (a fixture)
from tests.test_lora import _hf_logits, _lora_model, _randomize_b, _tokens

# two layers each (a mixer, then attention), DeltaNet chunks of 64 (what transformers' configs can say)
_TWO = dict(n_layers=2, linear=dataclasses.replace(QWEN3_5.linear, chunk_size=64))
CONFIGS = {"qwen3_5_text": QWEN3_5.replace(**_TWO, layer_types=("linear_attention", "full_attention"),
                                           export_as="qwen3_5_text"),
           "lfm2": LFM2.replace(n_layers=2, layer_types=("conv", "full_attention"), export_as="lfm2"),
           "qwen3_next": QWEN3_NEXT.replace(**_TWO, export_as="qwen3_next")}
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARED = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")
MIXER = {"linear_attention": ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj"),
         "conv": ("conv.in_proj", "conv.out_proj"), "full_attention": ATTN}


def _expected(cfg, extra=()) -> list[str]:
    """The adapted projections of the default targets (plus `extra` per DeltaNet layer), in every block."""
    out = []
    for i in range(cfg.n_layers):
        kind = cfg.layer_type(i)
        mods = MIXER[kind] + (extra if kind == "linear_attention" else ()) + (SHARED if cfg.moe.n_experts else MLP)
        out += [f"layers.{i}.{m}" for m in mods]
    return sorted(out)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_default_targets_adapt_the_mixers(case):
    """The default adapts each mixer's input and output projections (as q k v o) and the MLP's; in_b / in_a (beta and
    the decay's input, one row per value head) only when named; the adapters' axes follow their base weight."""
    cfg = CONFIGS[case]
    assert LoRAConfig().targets == DEFAULT_TARGETS and {"in_b", "in_a"} & set(DEFAULT_TARGETS) == set()
    model = _lora_model(cfg, LoRAConfig(rank=2, alpha=4.0))
    assert sorted(n for n, _ in lora_modules(model)) == _expected(cfg)
    axes = {n: (m.lora_A.weight.get_metadata()["logical_axes"], m.lora_B.weight.get_metadata()["logical_axes"])
            for n, m in lora_modules(model)}
    if case == "lfm2":
        assert axes["layers.0.conv.in_proj"] == ((None, "embed"), ("mlp", None))
        assert axes["layers.0.conv.out_proj"] == ((None, "mlp"), ("embed", None))
        assert model.layers[0].conv.in_proj.bias is not None  # the bias stays the base's
    else:
        assert axes["layers.0.linear_attn.in_proj_qkv"] == ((None, "embed"), ("heads", None))
        assert axes["layers.0.linear_attn.out_proj"] == ((None, "heads"), ("embed", None))
        every = _lora_model(cfg, LoRAConfig(rank=2, alpha=4.0, targets=DEFAULT_TARGETS + ("in_b", "in_proj_a")))
        assert sorted(n for n, _ in lora_modules(every)) == _expected(
            cfg, ("linear_attn.in_proj_b", "linear_attn.in_proj_a"))
    with pytest.raises(ValueError, match="unknown lora.targets"):
        LoRAConfig(targets=("in_proj_qkvz",))


_rows = np.random.default_rng(3).integers(0, 128, (2, 24)).astype(np.int32)
_seg = np.repeat(np.array([[1] * 10 + [2] * 14], np.int32), 2, 0)
PACKED = (_rows, np.where(_seg == 1, np.arange(24), np.arange(24) - 10).astype(np.int32), _seg)  # two documents


# every target; Qwen3-Next's without the MLP's: peft 0.21.2 turns any target ending in gate_proj / up_proj / down_proj
# on a Qwen2-MoE-like transformers model into its fused experts' parameters (its v4 -> v5 renaming), so the shared
# expert's adapters are dropped on load (logits off by 0.77 here); the mixers' and attention's load exactly
TARGETS = {case: tuple(t for t in ALL_TARGETS if case != "qwen3_next" or t not in ("gate", "up", "down"))
           for case in CONFIGS}


_forward = nnx.jit(lambda model, *args: model(*args))  # one compile per model structure (eager runs take longer)


def _logits(model, *args) -> np.ndarray:
    return np.asarray(_forward(model, *args))


@functools.cache
def _adapted(case: str):
    """(the base's logits on PACKED, the adapted model's at init (B = 0), the adapted model (adapters on TARGETS, B
    moved off zero), its logits)."""
    base = _logits(DecoderLM(CONFIGS[case], rngs=nnx.Rngs(0)), *PACKED)
    model = _lora_model(CONFIGS[case], LoRAConfig(rank=4, alpha=8.0, targets=TARGETS[case]))
    at_init = _logits(model, *PACKED)
    _randomize_b(model, scale=0.2)
    return base, at_init, model, _logits(model, *PACKED)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_identity_at_init_then_merged_equals_unmerged(case):
    """B = 0: the base's logits bit for bit; B moved off zero: the merged model's logits equal the unmerged ones
    (elementwise, relative to max |logit|), on packed rows."""
    base, at_init, model, unmerged = _adapted(case)  # adapters on in_b / in_a too
    np.testing.assert_array_equal(at_init, base)
    assert np.abs(unmerged - base).max() > 1e-3 * np.abs(base).max(), "the adapters must change the logits"
    merged = merge_lora(model)
    assert not lora_modules(merged)
    err = np.abs(_logits(merged, *PACKED) - unmerged).max() / np.abs(unmerged).max()
    assert err <= 1e-5, err  # measured 2.8e-6 (qwen3_5_text), 2.4e-6 (lfm2), 1.2e-6 (qwen3_next)


# the Hugging Face module of each adapted projection in layer 0 (a mixer) and the attention layer
PEFT_NAMES = {
    "qwen3_5_text": ["model.layers.0.linear_attn.in_proj_qkv", "model.layers.0.linear_attn.in_proj_z",
                     "model.layers.0.linear_attn.in_proj_b", "model.layers.0.linear_attn.in_proj_a",
                     "model.layers.0.linear_attn.out_proj", "model.layers.1.self_attn.q_proj"],
    "lfm2": ["model.layers.0.conv.in_proj", "model.layers.0.conv.out_proj", "model.layers.1.self_attn.out_proj",
             "model.layers.0.feed_forward.w1"],
    "qwen3_next": ["model.layers.0.linear_attn.in_proj_qkvz", "model.layers.0.linear_attn.in_proj_ba",
                   "model.layers.0.linear_attn.out_proj", "model.layers.1.self_attn.o_proj"],
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_peft_adapter_loads_onto_transformers_model(tmp_path, case):
    """save_peft names the modules as transformers' Qwen3.5 / LFM2 / Qwen3-Next do (model.layers.{i}.linear_attn.
    in_proj_qkv ...), peft loads the adapter onto the exported base with our logits, and load_peft reads it back."""
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from jaxformer.interop.hf import save_hf

    cfg = CONFIGS[case]
    model = _adapted(case)[2]
    save_hf(DecoderLM(cfg, rngs=nnx.Rngs(0)), tmp_path / "base")
    save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    for name in PEFT_NAMES[case]:
        assert {f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"} <= keys, name
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tokens = _tokens(cfg, T=13, seed=4)
    ours = _logits(model, tokens)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter").eval()
    adapted = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules()
               if n.endswith("lora_A")}
    assert adapted == {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in keys
                       if k.endswith("lora_A.weight")}, "peft adapts exactly the modules we wrote"
    theirs = _hf_logits(peft_model, tokens)
    # measured 4.5e-7 (qwen3_5_text), 3.7e-7 (lfm2), 3.3e-7 (qwen3_next); load_peft gives ours exactly
    assert np.abs(theirs - ours).max() <= 1e-4, (np.abs(theirs - ours).max(), config["target_modules"])
    back = load_peft(DecoderLM(cfg, rngs=nnx.Rngs(0)), tmp_path / "adapter")
    assert np.abs(_logits(back, tokens) - ours).max() <= 1e-5 * np.abs(ours).max()
    assert [(n, m.rank) for n, m in lora_modules(back)] == [(n, m.rank) for n, m in lora_modules(model)]


def test_finetune_on_a_hybrid_base_trains_adapters_only(tmp_path, tokenizer, sft_data):  # noqa: F811
    """`jaxformer.finetune` from a Qwen3-Next-like base (DeltaNet, gated attention, experts): two steps move the
    adapters (on in_proj_qkv / in_proj_z / out_proj too), everything else stays bit-identical, and the run's PEFT
    adapter names Qwen3-Next's fused in_proj_qkvz."""
    base_dir = tmp_path / "base"
    cfg = CONFIGS["qwen3_next"].replace(vocab_size=512)
    native.save(DecoderLM(cfg, rngs=nnx.Rngs(0)), base_dir)
    tokenizer.save(base_dir)
    run = tmp_path / "run"
    overrides = {"sft.base": str(base_dir), "sft.data": [str(sft_data[0])], "sft.val_data": [str(sft_data[1])],
                 "sft.seq_len": 32, "sft.sample_prompts": 0, "sft.eval_at_start": False, "lora.rank": 4,
                 "lora.alpha": 8.0, "lora.dropout": 0.0, "lora.targets": list(DEFAULT_TARGETS), "mesh.fsdp": 1,
                 "train.run_dir": str(run), "train.steps": 2, "train.batch_size": 4, "train.lr": 1e-2,
                 "train.warmup_steps": 0, "train.eval_every": 2, "train.eval_batches": 1, "train.ckpt_every": 2,
                 "train.async_checkpoint": False, "train.log_every": 1}
    out = finetune(load_finetune_config("finetune_lora", overrides), progress=False)
    assert out["step"] == 2
    before = to_numpy_state_dict(native.load(base_dir))
    after = to_numpy_state_dict(native.load(run / "model"))  # merged: W + s B A
    adapted = {f"{n}.weight" for n in _expected(cfg)}
    assert sorted(after) == sorted(before)
    unchanged = [k for k in before if k not in adapted]
    assert all(np.array_equal(after[k], before[k]) for k in unchanged)
    moved = {k for k in adapted if not np.array_equal(after[k], before[k])}
    assert moved == adapted, sorted(adapted - moved)
    keys = json.loads((run / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert "in_proj_qkvz" in keys and "out_proj" in keys
