"""A DecoderLM with attention_impl="pallas" (interpreted on CPU) matches the "xla" model: logits and grads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import DecoderLM, ModelConfig
from jaxformer.infer import Engine, SamplingParams, generate
from jaxformer.infer.paged_engine import PagedEngine
from jaxformer.models import attention as attention_module
from jaxformer.models.attention import attend
from pallas_kernels import INTERPRET_ENV, PallasUnavailableError

# Interpret-mode kernels are large XLA programs: skipping backend optimisation halves CPU compile time.
FAST_COMPILE = {} if jax.default_backend() == "gpu" else {"xla_backend_optimization_level": 0}


def random_sinks(params):
    """params with every attention sink (zero at init) drawn at random, the same draw for every call, so the sinks
    weigh on the softmax like trained ones."""
    draw = np.random.default_rng(2)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(draw.normal(size=x.shape) * 2.0, x.dtype) if "sinks" in jax.tree_util.keystr(path)
        else x, params)


def fresh_model(cfg: ModelConfig) -> DecoderLM:
    """DecoderLM(cfg) from seed 0, its sinks (if any) drawn by random_sinks."""
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, random_sinks(nnx.state(model, nnx.Param)))
    return model


def loss_and_grads(cfg: ModelConfig, tokens, positions, segment_ids):
    """(loss, logits [B, T, V], parameter grads) of a fresh model (same seed for every cfg, sinks drawn at random)."""
    graphdef, params = nnx.split(fresh_model(cfg), nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, positions, segment_ids)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)(params)
    return loss, logits, grads


CONFIGS = {
    "llama": ModelConfig.llama(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                               max_seq_len=48),
    # Gemma 2 / 3 style: a sliding layer (window 12 < T) beside a full one, soft-capped scores, per-head q/k norms
    "gemma": ModelConfig.llama(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=128,
                               max_seq_len=48, sliding_window=12, layer_types=("sliding_attention", "full_attention"),
                               attn_logit_softcap=4.0, final_logit_softcap=10.0, qk_norm="head",
                               norm_placement="sandwich", norm_unit_offset=True, query_pre_attn_scalar=24,
                               rope_local_theta=100.0),
    # DeepSeek-V3 style latent attention: 12-wide values under 24-wide q/k heads through the flash kernel (v padded)
    "latent": ModelConfig.llama(vocab_size=64, d_model=64, n_layers=2, n_heads=4, head_dim=24, d_ff=128, max_seq_len=48,
                                latent=dict(kv_rank=32, q_rank=16, rope_dim=8, v_head_dim=12)),
    # gpt-oss style: attention sinks in every layer, sliding (window 12 < T) and full layers alternating, GQA
    "gpt_oss": ModelConfig.llama(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                 max_seq_len=48, sliding_window=12, layer_types=("sliding_attention", "full_attention"),
                                 attention=dict(sinks=True)),
    # Llama 4 style: a chunked layer (chunks of 8 < T, across the packed documents' boundary) beside a full one
    "chunked": ModelConfig.llama(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                 max_seq_len=48, layer_types=("chunked_attention", "full_attention"),
                                 attention=dict(chunk_size=8)),
    # Qwen3.5 style: Gated DeltaNet layers through pallas_kernels.gated_delta (chunks of 16 < T, reset at the packed
    # documents' boundary) before a gated full-attention layer through the flash kernel
    "hybrid": ModelConfig.llama(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                max_seq_len=48, layer_types=("linear_attention", "full_attention"),
                                attention=dict(output_gate=True, qk_norm="head"),
                                linear=dict(key_heads=2, value_heads=4, key_head_dim=16, value_head_dim=16,
                                            chunk_size=16)),
}


def no_fallback(msg: str) -> None:
    raise AssertionError(f"attention_impl='pallas' fell back: {msg}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decoder_lm_pallas_matches_xla(monkeypatch, name):
    """Logits and every gradient (sinks' included); the pallas model runs the kernels, never the xla fallback."""
    monkeypatch.setenv(INTERPRET_ENV, "1")
    monkeypatch.setattr(attention_module, "_warn_once", no_fallback)
    cfg = CONFIGS[name]
    B, T = 2, 40
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    segment_ids = jnp.stack([jnp.where(jnp.arange(T) < 15, 1, 2), jnp.ones(T, jnp.int32)])  # two packed docs
    starts = jnp.stack([jnp.where(jnp.arange(T) < 15, 0, 15), jnp.zeros(T, jnp.int32)])
    positions = jnp.arange(T)[None] - starts

    loss_x, logits_x, grads_x = loss_and_grads(cfg, tokens, positions, segment_ids)
    loss_p, logits_p, grads_p = loss_and_grads(cfg.replace(attention_impl="pallas"), tokens, positions, segment_ids)

    scale = float(jnp.abs(logits_x).max())
    np.testing.assert_allclose(np.asarray(logits_p), np.asarray(logits_x), atol=1e-5 * max(scale, 1.0))
    np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=1e-5)  # mean cross-entropy: positive terms
    for (path, gx), (_, gp) in zip(jax.tree_util.tree_leaves_with_path(grads_x),
                                   jax.tree_util.tree_leaves_with_path(grads_p)):
        gx, gp = np.asarray(gx), np.asarray(gp)
        err = np.linalg.norm(gp - gx) / max(np.linalg.norm(gx), 1e-30)
        assert err <= 1e-4, f"{jax.tree_util.keystr(path)}: relative grad error {err:.2e}"


@pytest.mark.parametrize("name,seed,lengths", [("gemma", 3, (20, 7)), ("latent", 4, (21, 6))])
def test_generation_with_the_decode_kernels_matches_xla(monkeypatch, name, seed, lengths):
    """The engine over the Pallas caches picks the xla engine's tokens on ragged prompts: the decode kernel with a
    window and soft-cap (gemma), latent caches through pallas_kernels.latent_decode_attention (latent)."""
    monkeypatch.setenv(INTERPRET_ENV, "1")
    cfg = CONFIGS[name]
    prompts = [np.random.default_rng(seed).integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    runs = {}
    for impl in ("xla", "pallas"):
        model = DecoderLM(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        runs[impl] = [s.tokens for s in generate(Engine(model, max_batch=2, max_len=40), prompts, params)]
    assert runs["pallas"] == runs["xla"]


def test_sink_and_chunked_generation_with_the_decode_kernels_matches_xla(monkeypatch):
    """A layer with sinks and a window beside one with sinks and chunks (of 8, crossed while decoding): the engine over
    Pallas caches (decode_attention) and the paged engine (paged_decode_attention, its prefill chunks too) pass sinks
    and chunks to the kernels, never falling back, and pick the xla engine's greedy tokens."""
    monkeypatch.setenv(INTERPRET_ENV, "1")
    monkeypatch.setattr(attention_module, "_warn_once", no_fallback)
    cfg = CONFIGS["gpt_oss"].replace(layer_types=("sliding_attention", "chunked_attention"),
                                     attention=dict(sinks=True, sliding_window=12, chunk_size=8))
    prompts = [np.random.default_rng(5).integers(0, cfg.vocab_size, n).tolist() for n in (20, 7)]
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    tokens = lambda engine: [s.tokens for s in generate(engine, prompts, params)]  # noqa: E731
    want = tokens(Engine(fresh_model(cfg), max_batch=2, max_len=40))
    pallas = cfg.replace(attention_impl="pallas")
    assert tokens(Engine(fresh_model(pallas), max_batch=2, max_len=40)) == want
    assert tokens(PagedEngine(fresh_model(pallas), max_batch=2, max_len=40, page_size=16)) == want


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the no-GPU error")
def test_pallas_attention_without_gpu_names_the_fix(monkeypatch):
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(PallasUnavailableError, match=INTERPRET_ENV):
        attend(q, q, q, causal=True, impl="pallas")
