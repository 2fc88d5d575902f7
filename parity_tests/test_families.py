"""jaxformer vs torch_ref for the open families: the ModelConfigs of test_families_torch.py (which proves
torch_ref against transformers), run through both frameworks with identical random weights.

Whole models: logits, next-token loss and the gradient of every parameter, on prompts longer than any
sliding window (and, for one sliding and one length-dependent RoPE family, on packed rows). Modules alone:
q/k norms inside attention (with window, soft-cap and query_pre_attn_scalar), Gemma's RMSNorm, the
sandwich and post blocks, and every RoPE scaling's cos/sin.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxformer
from jaxformer.config import ModelConfig, RopeScaling
import torch_ref
from jaxformer.models import attention as jattn
from jaxformer.models import model_class
from jaxformer.models import decoder as jm
from jaxformer.models import layers as jl
from parity_tests.conftest import (assert_grads_close, assert_outputs_close, copy_jax_to_torch, jax_params,
                                   module_parity, random_jax_module, random_segments)
from parity_tests.test_families_torch import CASES, LONG, SHORT
from parity_tests.test_model_torch import jax_loss_and_grads, torch_loss_and_grads
from parity_tests.test_modules import rope_and_segments
from torch_ref import attention as tattn
from torch_ref import decoder as tm
from torch_ref import layers as tl

B = 2


def _batch(cfg: ModelConfig, T: int, seed: int, packed: bool):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    seg, pos = random_segments(rng, B, T, n_docs=3) if packed else (None, None)
    return tokens, pos, seg


# one config per family at its longest prompt (Llama's other RoPE scalings: test_rope_scaling_cos_sin below);
# Gemma 3 on packed rows: segments through sliding windows and the local RoPE
FAMILIES = ["llama_yarn", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3_longrope", "olmo2", "smollm3", "exaone4",
            "arcee", "starcoder2", "glm4", "granite", "hunyuan_v1_dense", "cohere2", "apertus", "gpt_oss", "glm4_moe", "gemma4", "gemma4_moe", "gemma3n", "minimax_m2", "llama4", "deepseek_v3", "lfm2", "qwen3_5_text",
            "qwen3_next"]
MODEL_CASES = [(name, max(CASES[name].lengths), False) for name in FAMILIES] + [("gemma3_text", 40, True),
                                                                                 ("lfm2", 40, True),
                                                                                 ("qwen3_5_text", 40, True)]


@pytest.mark.parametrize("name,T,packed", MODEL_CASES,
                         ids=[f"{n}-T{t}{'-packed' if p else ''}" for n, t, p in MODEL_CASES])
def test_logits_loss_grads(name, T, packed):
    cfg = CASES[name].ours
    model = random_jax_module(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0)), seed=1)
    module = torch_ref.module_class(cfg)(cfg)
    copy_jax_to_torch(model, module)
    tokens, pos, seg = _batch(cfg, T, seed=2, packed=packed)

    logits_j, loss_j, grads_j = jax_loss_and_grads(model, tokens, pos, seg)
    logits_t, loss_t, grads_t = torch_loss_and_grads(module, tokens, pos, seg)
    assert logits_j.shape == (B, T, cfg.vocab_size)
    assert float(np.abs(np.asarray(logits_j)).max()) > 1.0, "logits too small for a meaningful check"
    assert_outputs_close(logits_j, logits_t, "logits")
    assert abs(float(loss_j) - loss_t.item()) <= 1e-5 * abs(loss_t.item())
    assert set(grads_j) == set(jax_params(model)) == set(grads_t)
    # the correction bias chooses experts and weighs nothing; layer scalars are stored, not trained (Gemma 4)
    assert_grads_close(grads_j, grads_t, zero=("e_score_correction_bias", "layer_scalar"))


# ----------------------------------------------------------------------------- modules alone

T_MOD = 20
SMALL = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=48, max_seq_len=64)


def _x(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _twin(jctor, tmod, seed: int, prefix: str = ""):
    jmod = random_jax_module(jctor, seed, 0.2, prefix)
    copy_jax_to_torch(jmod, tmod)
    return jmod, tmod


def _rope(cfg: ModelConfig, seed: int, segments: bool):
    return rope_and_segments(cfg, segments, seed, length=T_MOD, n_docs=2)


ATTN_CASES = {
    # Qwen3 / Gemma 3: per-head RMSNorm (Gemma's 1 + w), sliding window 6, Gemma's query scale and soft-cap
    "head_norm_window": dict(qk_norm="head", sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcap=2.0),
    "head_norm_gemma": dict(qk_norm="head", norm_unit_offset=True, sliding_window=6, query_pre_attn_scalar=24),
    # OLMo 2: RMSNorm over the whole q (N*H) and k (K*H) projections
    "proj_norm": dict(qk_norm="proj"),
    # Qwen2: biases on q/k/v only
    "qkv_bias": dict(qkv_bias=True, sliding_window=5),
}


@pytest.mark.parametrize("case,segments", [("head_norm_window", True), ("head_norm_gemma", False),
                                           ("proj_norm", False), ("qkv_bias", True)])
def test_attention(case, segments):
    cfg = ModelConfig.llama(**SMALL, **ATTN_CASES[case])
    window = cfg.layer_window(0)
    jmod, tmod = _twin(lambda: jattn.Attention(cfg, window=window, rngs=nnx.Rngs(0)),
                       tattn.Attention(cfg, window=window), seed=10)
    if cfg.attention.qkv_bias:
        assert tmod.o_proj.bias is None and tmod.q_proj.bias is not None
    rope, seg = _rope(cfg, seed=11, segments=segments)
    inputs = {"x": _x(12, B, T_MOD, cfg.d_model), "rope": rope, "segment_ids": seg}
    module_parity(jmod, tmod, lambda m, x, rope, segment_ids: m(x, rope, segment_ids), inputs, diff=("x",), seed=13)


def test_gemma_rmsnorm():
    """(1 + w) scaling in float32, weights initialised at 0 on both sides."""
    cfg = ModelConfig.llama(**SMALL, norm_unit_offset=True)
    j0, t0 = jl.make_norm(cfg), tl.make_norm(cfg)
    assert not np.asarray(j0.weight[...]).any() and not t0.weight.detach().any()
    jmod, tmod = _twin(lambda: jl.make_norm(cfg), tl.make_norm(cfg), seed=20, prefix="norm.")
    scales = 10.0 ** np.random.default_rng(21).uniform(-2.0, 0.5, (B, T_MOD, 1))
    x = (_x(22, B, T_MOD, cfg.d_model) * scales).astype(np.float32)
    module_parity(jmod, tmod, lambda m, x: m(x), {"x": x}, diff=("x",), seed=23)


@pytest.mark.parametrize("placement", ["sandwich", "post"])
def test_block_norm_placement(placement):
    cfg = ModelConfig.llama(**SMALL, norm_placement=placement, norm_unit_offset=placement == "sandwich",
                            activation="gelu_tanh" if placement == "sandwich" else "silu")
    jmod, tmod = _twin(lambda: jm.Block(cfg, layer=0, rngs=nnx.Rngs(0)), tm.Block(cfg, layer=0), seed=30)
    names = {k for k, _ in tmod.named_parameters()}
    assert ("input_layernorm.weight" in names) == (placement == "sandwich")
    assert "post_feedforward_layernorm.weight" in names
    rope, seg = _rope(cfg, seed=31, segments=True)
    inputs = {"x": _x(32, B, T_MOD, cfg.d_model), "rope": rope, "segment_ids": seg}
    report = module_parity(jmod, tmod, lambda m, x, rope, segment_ids: m(x, rope, segment_ids), inputs,
                           diff=("x",), seed=33)
    assert sum(k.startswith("grad/") and not k.startswith("grad/input:") for k in report) == len(names)


# original contexts of 32 (llama3: 64, for its three wavelength bands at head_dim 16)
ROPE_CASES = {
    "llama3": RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    "yarn": RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32),
    "yarn_mscale": RopeScaling("yarn", factor=8.0, original_max_position_embeddings=32, beta_fast=16.0,
                               beta_slow=2.0, mscale=1.0, mscale_all_dim=0.5, truncate=False),
    "linear": RopeScaling("linear", factor=2.5),
    "dynamic": RopeScaling("dynamic", factor=3.0, original_max_position_embeddings=32),
    "longrope": RopeScaling("longrope", factor=4.0, original_max_position_embeddings=32, short_factor=SHORT,
                            long_factor=LONG),
}


# positions stay below 64: float32 angles p * inv_freq then differ by < 1e-5 when inv_freq differs by an ulp
@pytest.mark.parametrize("longest", [24, 64], ids=["within", "past"])
@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_scaling_cos_sin(name, longest):
    """cos/sin of every scaling at positions below `longest`: dynamic and longrope switch regimes past 32."""
    H, theta, scaling = 16, 10000.0, ROPE_CASES[name]
    pos = np.random.default_rng(40).integers(0, longest, (B, T_MOD)).astype(np.int32)
    pos[0, 0] = longest - 1
    cos_j, sin_j = jl.rope_cos_sin(jnp.asarray(pos), H, theta, scaling, 64)
    cos_t, sin_t = tl.rope_cos_sin(torch.from_numpy(pos), H, theta, scaling, 64)
    assert_outputs_close(cos_j, cos_t, "cos")
    assert_outputs_close(sin_j, sin_t, "sin")
    inv_j, att_j = jl.rope_inv_freq(H, theta, scaling, 64, longest)
    inv_t, att_t = tl.rope_inv_freq(H, theta, scaling, 64, longest)
    np.testing.assert_allclose(np.asarray(inv_j), inv_t.numpy(), rtol=2e-6)
    assert att_j == pytest.approx(att_t, rel=1e-12)
    # the scaling changes something: frequencies or the cos/sin factor differ from the default RoPE
    default, _ = tl.rope_inv_freq(H, theta, None, 64, longest)
    changed = (inv_t - default).abs().max().item() > 1e-4 * default.max().item() or att_t != 1.0
    assert changed or (name == "dynamic" and longest <= 32)
