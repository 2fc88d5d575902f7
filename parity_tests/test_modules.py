"""Per-module parity: jaxformer (Flax NNX) vs torch_ref (PyTorch) with identical random weights.

Forward outputs and gradients of a random projection of the output, w.r.t. the float inputs
and every parameter. Rotary embeddings are also checked against Hugging Face's Llama code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxformer import ModelConfig
from jaxformer.models import attention as jattn
from jaxformer.models import decoder as jm
from jaxformer.models import layers as jl
from parity_tests.conftest import (assert_grads_close, assert_outputs_close, copy_jax_to_torch, module_parity,
                                   random_jax_module, random_segments, rel_err)
from torch_ref import attention as tattn
from torch_ref import decoder as tm
from torch_ref import layers as tl

B, T = 2, 12


def _x(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _twin(jctor, tmod, seed: int, std: float = 0.2, prefix: str = ""):
    jmod = random_jax_module(jctor, seed, std, prefix)
    copy_jax_to_torch(jmod, tmod)
    return jmod, tmod


# ----------------------------------------------------------------------------- embeddings and norms

def test_embed_lookup_and_attend():
    V, D = 37, 16
    jmod, tmod = _twin(lambda: jl.Embed(V, D, axes=("vocab", "embed"), rngs=nnx.Rngs(0)), tl.Embed(V, D), seed=1)
    ids = np.random.default_rng(2).integers(0, V, (B, T)).astype(np.int32)
    module_parity(jmod, tmod, lambda m, ids: m(ids), {"ids": ids}, diff=(), seed=3)
    # tied output projection: logits = x @ table^T
    module_parity(jmod, tmod, lambda m, x: m.attend(x), {"x": _x(4, B, T, D)}, diff=("x",), seed=5)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_norms(norm, eps):
    D = 24
    jcls, tcls = {"layernorm": (jl.LayerNorm, tl.LayerNorm), "rmsnorm": (jl.RMSNorm, tl.RMSNorm)}[norm]
    jmod, tmod = _twin(lambda: jcls(D, eps=eps), tcls(D, eps), seed=10, prefix="norm.")
    # per-token scales from 0.003 to 3 (eps matters at the small end) and an offset (the mean path)
    scales = 10.0 ** np.random.default_rng(15).uniform(-2.5, 0.5, (B, T, 1))
    x = (_x(11, B, T, D) * scales + 0.3 * scales).astype(np.float32)
    module_parity(jmod, tmod, lambda m, x: m(x), {"x": x}, diff=("x",), seed=12)


def test_layernorm_matches_torch_builtin():
    D = 24
    jmod = random_jax_module(lambda: jl.LayerNorm(D, eps=1e-5), seed=13, prefix="norm.")
    ref = torch.nn.LayerNorm(D, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(jmod.weight[...])))
        ref.bias.copy_(torch.from_numpy(np.array(jmod.bias[...])))
    x = _x(14, B, T, D, scale=2.0)
    assert_outputs_close(jmod(jnp.asarray(x)), ref(torch.from_numpy(x)))


# ----------------------------------------------------------------------------- rotary embeddings

@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_cos_sin_and_apply(theta):
    H, N = 16, 3
    rng = np.random.default_rng(20)
    positions = rng.integers(0, 4096, (B, T)).astype(np.int32)  # large positions stress the angles
    cos_j, sin_j = jl.rope_cos_sin(jnp.asarray(positions), H, theta)
    cos_t, sin_t = tl.rope_cos_sin(torch.from_numpy(positions), H, theta)
    assert cos_j.shape == (B, T, H)
    assert_outputs_close(cos_j, cos_t, "cos")
    assert_outputs_close(sin_j, sin_t, "sin")

    x = _x(21, B, T, N, H)
    cot = _x(22, B, T, N, H)
    cos_np, sin_np = np.array(cos_j), np.array(sin_j)  # same angles into both: isolates apply_rope
    out_j, vjp = jax.vjp(lambda x: jl.apply_rope(x, jnp.asarray(cos_np), jnp.asarray(sin_np)), jnp.asarray(x))
    (g_j,) = vjp(jnp.asarray(cot))
    xt = torch.from_numpy(x).requires_grad_(True)
    out_t = tl.apply_rope(xt, torch.from_numpy(cos_np), torch.from_numpy(sin_np))
    (out_t * torch.from_numpy(cot)).sum().backward()
    assert_outputs_close(out_j, out_t, "apply_rope")
    assert_grads_close({"x": g_j}, {"x": xt.grad})
    # rotation: norms of each head vector are preserved
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out_j), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_rope_matches_hf_llama(theta):
    """Independent reference: transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb (rotate-half)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    H, N = 16, 2
    cfg = LlamaConfig(hidden_size=H * N, num_attention_heads=N, head_dim=H, rope_theta=theta,
                      max_position_embeddings=4096)
    positions = np.random.default_rng(30).integers(0, 2048, (B, T)).astype(np.int64)
    q, k = _x(31, B, T, N, H), _x(32, B, T, N, H)
    cos_j, sin_j = jl.rope_cos_sin(jnp.asarray(positions), H, theta)
    qj, kj = jl.apply_rope(jnp.asarray(q), cos_j, sin_j), jl.apply_rope(jnp.asarray(k), cos_j, sin_j)

    rot = LlamaRotaryEmbedding(cfg)
    cos_h, sin_h = rot(torch.from_numpy(q), torch.from_numpy(positions))
    # HF layout is [B, N, T, H]
    qh, kh = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2),
                                  cos_h, sin_h)
    assert_outputs_close(cos_j, cos_h, "cos")
    assert_outputs_close(sin_j, sin_h, "sin")
    assert_outputs_close(qj, qh.transpose(1, 2), "rotated q")
    assert_outputs_close(kj, kh.transpose(1, 2), "rotated k")


# ----------------------------------------------------------------------------- attention, MLP, block

ATTN_CASES = {
    "mha": dict(n_heads=4, n_kv_heads=4),
    "gqa2": dict(n_heads=4, n_kv_heads=2),
    "mqa": dict(n_heads=4, n_kv_heads=1),
}


def _attn_cfg(case: str, **kw) -> ModelConfig:
    return ModelConfig.llama(vocab_size=64, d_model=32, n_layers=1, d_ff=64, **ATTN_CASES[case], **kw)


def rope_and_segments(cfg: ModelConfig, segments: bool, seed: int, length: int = T, n_docs: int = 3):
    rng = np.random.default_rng(seed)
    if segments:
        seg, pos = random_segments(rng, B, length, n_docs=n_docs)
    else:
        seg, pos = None, np.broadcast_to(np.arange(length, dtype=np.int32), (B, length)).copy()
    cos, sin = jl.rope_cos_sin(jnp.asarray(pos), cfg.head_dim, cfg.rope.theta)
    return (np.asarray(cos), np.asarray(sin)), seg


@pytest.mark.parametrize("segments", [False, True], ids=["causal", "segments"])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention(case, segments):
    cfg = _attn_cfg(case)
    jmod, tmod = _twin(lambda: jattn.Attention(cfg, rngs=nnx.Rngs(0)), tattn.Attention(cfg), seed=40)
    rope, seg = rope_and_segments(cfg, segments, seed=41)
    inputs = {"x": _x(42, B, T, cfg.d_model), "rope": rope, "segment_ids": seg}
    module_parity(jmod, tmod, lambda m, x, rope, segment_ids: m(x, rope, segment_ids), inputs, diff=("x",), seed=43)


def test_attention_gpt2_style_bias_no_rope_wide_heads():
    """Biases on q/k/v/o, no rotary, and head_dim * n_heads != d_model."""
    cfg = ModelConfig.llama(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=12, d_ff=64,
                            use_bias=True)
    jmod, tmod = _twin(lambda: jattn.Attention(cfg, rngs=nnx.Rngs(0)), tattn.Attention(cfg), seed=44)
    _, seg = rope_and_segments(cfg, True, seed=45)
    inputs = {"x": _x(46, B, T, cfg.d_model), "segment_ids": seg}
    module_parity(jmod, tmod, lambda m, x, segment_ids: m(x, None, segment_ids), inputs, diff=("x",), seed=47,
                  zero_grads=("k_proj.bias",))


@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "gelu_tanh"), (False, "gelu"), (True, "relu")])
def test_mlp(gated, activation):
    cfg = ModelConfig.llama(d_model=32, d_ff=80, n_heads=4, gated_mlp=gated, activation=activation,
                            use_bias=not gated)
    jmod, tmod = _twin(lambda: jl.MLP(cfg, rngs=nnx.Rngs(0)), tl.MLP(cfg), seed=60)
    module_parity(jmod, tmod, lambda m, x: m(x), {"x": _x(61, B, T, cfg.d_model)}, diff=("x",), seed=62)


BLOCK_CFGS = {
    "gpt2": ModelConfig.gpt2(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64),
    "llama_gqa": ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
}


@pytest.mark.parametrize("name,segments", [("gpt2", False), ("llama_gqa", True)])
def test_block(name, segments):
    cfg = BLOCK_CFGS[name]
    jmod, tmod = _twin(lambda: jm.Block(cfg, rngs=nnx.Rngs(0)), tm.Block(cfg), seed=70)
    rope, seg = rope_and_segments(cfg, segments, seed=71)
    inputs = {"x": _x(72, B, T, cfg.d_model), "rope": rope if cfg.position == "rope" else None, "segment_ids": seg}
    zero = ("k_proj.bias",) if cfg.position != "rope" and cfg.use_bias else ()
    report = module_parity(jmod, tmod, lambda m, x, rope, segment_ids: m(x, rope, segment_ids), inputs,
                           diff=("x",), seed=73, zero_grads=zero)
    # every parameter of the block received a (compared) gradient
    n_params = len(list(tmod.named_parameters()))
    assert sum(k.startswith("grad/") and not k.startswith("grad/input:") for k in report) == n_params


def test_rel_err_helper_is_strict():
    a = np.ones(4, np.float32)
    assert rel_err(a, a) == 0.0
    assert rel_err(a * (1 + 1e-3), a) == pytest.approx(1e-3, rel=1e-3)
