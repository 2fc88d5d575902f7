"""Attention sinks (gpt-oss): a learned logit per head joins each softmax's denominator and attends to nothing.

Against transformers' own gpt-oss attention math (modeling_gpt_oss.eager_attention_forward: the sink as one more
column, dropped after the softmax) on random GQA inputs with causal and sliding-window masks; the KV-cache and
paged paths against the full forward; whole models with sinks against torch_ref (logits, loss, every gradient,
the sinks' own included); the engine's greedy tokens against the uncached forward's argmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxformer
from jaxformer.config import ModelConfig
from jaxformer.models import attention as jattn
from parity_tests.conftest import (assert_grads_close, assert_outputs_close, copy_jax_to_torch, random_jax_module)
from parity_tests.test_generate import greedy_jax
from parity_tests.test_model_torch import jax_loss_and_grads, torch_loss_and_grads
from torch_ref import decoder as tm

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward  # noqa: E402

B, T, N, K, H = 2, 37, 6, 2, 16


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, T, n, H)).astype(np.float32) for n in (N, K, K))
    sinks = rng.normal(size=(N,)).astype(np.float32) * 2.0  # some above, some below the scores
    return q, k, v, sinks


def _transformers(q, k, v, sinks, window):
    """transformers' gpt-oss attention: [B, N, T, H] layout, additive mask, the sink column."""
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = N // K, False
    module.sinks = torch.from_numpy(sinks)
    mask = np.asarray(jattn.make_mask(T, T, causal=True, segment_ids=None, window=window))  # [1, T, T]
    bias = torch.from_numpy(np.where(mask, 0.0, -1e30).astype(np.float32))[:, None]  # [1, 1, T, T]
    to = lambda a: torch.from_numpy(a).transpose(1, 2)  # noqa: E731
    out, _ = eager_attention_forward(module, to(q), to(k), to(v), bias, scaling=H ** -0.5)
    return out.numpy()  # [B, T, N, H]


@pytest.mark.parametrize("window", [None, 9])
def test_sinks_match_transformers_gpt_oss_attention(window):
    q, k, v, sinks = _inputs(seed=1 if window is None else 2)
    ref = _transformers(q, k, v, sinks, window)
    got = np.asarray(jattn.attend(*(jnp.asarray(a) for a in (q, k, v)), causal=True, window=window,
                                  sinks=jnp.asarray(sinks)))
    assert_outputs_close(got, ref, f"sinks window={window}")
    plain = np.asarray(jattn.attend(*(jnp.asarray(a) for a in (q, k, v)), causal=True, window=window))
    assert np.abs(plain - ref).max() > 1e-2 * np.abs(ref).max(), "the sinks must change the output to prove anything"


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_cached_and_paged_paths_equal_the_full_forward(impl, monkeypatch):
    """Decode paths (a cache of T slots, the last 3 queries; a paged cache of 8-token pages, 16 for the Pallas
    kernel's tiles) equal the full attend; "pallas" runs the decode and paged kernels (interpreted)."""
    monkeypatch.setenv("JAXFORMER_PALLAS_INTERPRET", "1")
    q, k, v, sinks = (jnp.asarray(a) for a in _inputs(seed=3))
    full = np.asarray(jattn.attend(q, k, v, causal=True, window=9, sinks=sinks))[:, -3:]
    lengths = jnp.full((B,), T, jnp.int32)
    layout = jattn.cache_layout(impl)
    kc, vc = (c if layout == "bskh" else c.transpose(0, 2, 1, 3) for c in (k, v))
    cached = jattn.attend_cached(q[:, -3:], kc, vc, lengths, impl=impl, window=9, sinks=sinks)
    assert_outputs_close(np.asarray(cached), full, f"cached {impl}")
    P = 16 if impl == "pallas" else 8
    pages = -(-T // P)
    pad = pages * P - T
    kp, vp = (jnp.pad(c, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B * pages, P, K, H) for c in (k, v))
    table = jnp.arange(B * pages, dtype=jnp.int32).reshape(B, pages)
    paged = jattn.attend_paged(q[:, -3:], kp, vp, table, lengths, impl=impl, window=9, sinks=sinks)
    assert_outputs_close(np.asarray(paged), full, f"paged {impl}")


CFG = ModelConfig.llama(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64,
                        max_seq_len=64, use_bias=False, sliding_window=8,
                        layer_types=("sliding_attention", "full_attention"), attention=dict(sinks=True, qkv_bias=True))


def test_model_with_sinks_matches_torch_ref():
    model = random_jax_module(lambda: jaxformer.DecoderLM(CFG, rngs=nnx.Rngs(0)), seed=4)
    assert model.layers[0].self_attn.sinks is not None
    module = tm.DecoderLM(CFG)
    copy_jax_to_torch(model, module)
    tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 40)).astype(np.int32)
    logits_j, loss_j, grads_j = jax_loss_and_grads(model, tokens, None, None)
    logits_t, loss_t, grads_t = torch_loss_and_grads(module, tokens, None, None)
    assert_outputs_close(np.asarray(logits_j), logits_t.detach().numpy(), "logits")
    assert abs(float(loss_j) - float(loss_t.detach())) <= 1e-5 * abs(float(loss_t.detach()))
    assert "layers.0.self_attn.sinks" in grads_j and float(np.abs(grads_j["layers.0.self_attn.sinks"]).max()) > 0
    assert_grads_close(grads_j, grads_t)


def test_engine_decodes_sink_models_as_the_forward():
    from jaxformer.infer import Engine, SamplingParams, generate
    from jaxformer.infer.paged_engine import PagedEngine

    model = random_jax_module(lambda: jaxformer.DecoderLM(CFG, rngs=nnx.Rngs(0)), seed=6)
    prompt = np.random.default_rng(7).integers(0, CFG.vocab_size, 13).tolist()
    tokens, _ = greedy_jax(model, np.asarray([prompt], np.int32), 10)  # [1, 13 + 10]
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    for engine in (Engine(model, max_batch=2), PagedEngine(model, max_batch=2, page_size=4)):
        (seq,) = generate(engine, [prompt], params)
        assert seq.tokens == tokens[0, len(prompt):].tolist(), type(engine).__name__
    jax.clear_caches()
