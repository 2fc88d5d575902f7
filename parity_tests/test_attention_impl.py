"""Attention implementations agree on CPU ("auto" = jax.nn.dot_product_attention, "cudnn" falls back),
and preset shapes are right without allocating them (nnx.eval_shape)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxformer
from jaxformer.interop import from_state_dict, to_numpy_state_dict
from jaxformer.models import attention as jattn
from parity_tests.conftest import (assert_grads_close, assert_outputs_close, jax_logits, random_jax_module,
                                   random_segments)

B, T = 2, 16


def _qkv(seed: int, N: int, K: int, H: int = 8):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)).astype(np.float32)) for n in (N, K, K))
    return q, k, v


@pytest.mark.parametrize("N,K,segments,window", [(4, 4, True, None), (4, 2, False, None), (4, 2, True, None),
                                                 (4, 1, True, None), (4, 2, True, 5)],
                         ids=["mha-segments", "gqa2-causal", "gqa2-segments", "mqa-segments", "gqa2-segments-window5"])
def test_auto_matches_xla(N, K, segments, window):
    assert jax.default_backend() == "cpu"
    q, k, v = _qkv(1, N, K)
    seg = None
    if segments:
        s, _ = random_segments(np.random.default_rng(2), B, T, n_docs=3)
        seg = (jnp.asarray(s), jnp.asarray(s))
    cot = jnp.asarray(np.random.default_rng(3).standard_normal((B, T, N, 8)).astype(np.float32))

    def run(impl):
        @jax.jit  # forward and backward in one compiled program
        def fwd_bwd(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: jattn.attend(q, k, v, causal=True, segment_ids=seg, impl=impl,
                                                            window=window), q, k, v)
            return out, dict(zip("qkv", vjp(cot)))
        return fwd_bwd(q, k, v)

    out_x, g_x = run("xla")
    out_a, g_a = run("auto")
    assert_outputs_close(out_a, out_x, "auto vs xla")
    assert_grads_close(g_a, g_x)


def test_auto_model_matches_xla_packed():
    cfg = jaxformer.ModelConfig.llama(vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                                      max_seq_len=T)
    xla = random_jax_module(lambda: jaxformer.DecoderLM(cfg, rngs=nnx.Rngs(0)), seed=4)
    auto = from_state_dict(cfg.replace(attention_impl="auto"), to_numpy_state_dict(xla))
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    seg, pos = random_segments(rng, B, T, n_docs=3)
    assert_outputs_close(jax_logits(auto, tokens, pos, seg), jax_logits(xla, tokens, pos, seg), "auto vs xla logits")


def test_cudnn_on_cpu_warns_and_falls_back_to_xla():
    assert jax.default_backend() == "cpu"
    q, k, v = _qkv(6, 4, 2)
    s, _ = random_segments(np.random.default_rng(7), B, T, n_docs=2)
    seg = (jnp.asarray(s), jnp.asarray(s))
    jattn._warn_once.cache_clear()  # the warning is emitted once per process; another test may have used it
    with pytest.warns(UserWarning, match="cudnn"):
        out = jattn.attend(q, k, v, causal=True, segment_ids=seg, impl="cudnn")
    ref = jattn.attend(q, k, v, causal=True, segment_ids=seg, impl="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    with warnings.catch_warnings():  # once only
        warnings.simplefilter("error")
        jattn.attend(q, k, v, causal=True, impl="cudnn")


def test_llama3_8b_preset_shape_and_param_count():
    cfg = jaxformer.load_model_config("llama3-8b")
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope.theta) == (32, 8, 128, 500000.0)
    abstract = nnx.eval_shape(lambda: jaxformer.DecoderLM(cfg, rngs=nnx.Rngs(0)))
    assert jaxformer.count_params(abstract) == 8_030_261_248  # Meta's published Llama-3-8B count
    shapes = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    assert shapes["embed_tokens.weight"] == (128256, 4096)
    assert shapes["lm_head.weight"] == (128256, 4096)
    assert shapes["layers.31.self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes["layers.0.mlp.gate_proj.weight"] == (14336, 4096)
    dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(abstract, nnx.Param))}
    assert dtypes == {jnp.dtype("bfloat16")}


def test_gpt2_124m_preset_param_count():
    cfg = jaxformer.load_model_config("gpt2-124m")
    abstract = nnx.eval_shape(lambda: jaxformer.DecoderLM(cfg, rngs=nnx.Rngs(0)))
    assert jaxformer.count_params(abstract) == 124_439_808  # Hugging Face `gpt2`, tied head
