"""A DecoderLM with attention_impl="pallas" (interpreted on CPU) matches the "xla" model: logits and grads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import DecoderLM, ModelConfig
from jaxformer.models.attention import attend
from pallas_kernels import INTERPRET_ENV, PallasUnavailableError

# Interpret-mode kernels are large XLA programs: skipping backend optimisation halves CPU compile time.
FAST_COMPILE = {} if jax.default_backend() == "gpu" else {"xla_backend_optimization_level": 0}


def loss_and_grads(cfg: ModelConfig, tokens, positions, segment_ids):
    """(loss, logits [B, T, V], parameter grads) of a fresh model (same seed for every cfg)."""
    graphdef, params = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, positions, segment_ids)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)(params)
    return loss, logits, grads


def test_decoder_lm_pallas_matches_xla(monkeypatch):
    monkeypatch.setenv(INTERPRET_ENV, "1")
    cfg = ModelConfig.llama(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                            max_seq_len=48)
    B, T = 2, 40
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    segment_ids = jnp.stack([jnp.where(jnp.arange(T) < 15, 1, 2), jnp.ones(T, jnp.int32)])  # two packed docs
    starts = jnp.stack([jnp.where(jnp.arange(T) < 15, 0, 15), jnp.zeros(T, jnp.int32)])
    positions = jnp.arange(T)[None] - starts

    loss_x, logits_x, grads_x = loss_and_grads(cfg, tokens, positions, segment_ids)
    loss_p, logits_p, grads_p = loss_and_grads(cfg.replace(attention_impl="pallas"), tokens, positions, segment_ids)

    scale = float(jnp.abs(logits_x).max())
    np.testing.assert_allclose(np.asarray(logits_p), np.asarray(logits_x), atol=1e-5 * max(scale, 1.0))
    np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=1e-6)
    for (path, gx), (_, gp) in zip(jax.tree_util.tree_leaves_with_path(grads_x),
                                   jax.tree_util.tree_leaves_with_path(grads_p)):
        gx, gp = np.asarray(gx), np.asarray(gp)
        err = np.linalg.norm(gp - gx) / max(np.linalg.norm(gx), 1e-30)
        assert err <= 1e-4, f"{jax.tree_util.keystr(path)}: relative grad error {err:.2e}"


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the no-GPU error")
def test_pallas_attention_without_gpu_names_the_fix(monkeypatch):
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(PallasUnavailableError, match=INTERPRET_ENV):
        attend(q, q, q, causal=True, impl="pallas")
