"""Whole-model parity: jaxformer.DecoderLM vs torch_ref.DecoderLM with weights moved by jaxformer.interop.

Logits, cross-entropy loss and the loss gradient of every parameter, for the GPT-2 and Llama
families (tied/untied heads, MHA/GQA/MQA), plus the bit-exact state-dict round trip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import jaxformer
import torch_ref
from jaxformer import ModelConfig
from parity_tests.conftest import (assert_grads_close, assert_outputs_close, jax_logits, jax_params,
                                   random_jax_module, random_segments)

B, T = 2, 24
SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
ONE = {**SMALL, "n_layers": 1}  # compile time dominates on CPU: one layer where two add nothing
CONFIGS = {
    "gpt2_tied": ModelConfig.gpt2(**SMALL),
    "gpt2_untied": ModelConfig.gpt2(**{**ONE, "vocab_size": 101}, tie_embeddings=False),
    "llama_mha_untied": ModelConfig.llama(**ONE),
    "llama_gqa2_tied": ModelConfig.llama(**SMALL, n_kv_heads=2, tie_embeddings=True),
    # MQA, head_dim * n_heads != d_model, a large RoPE base
    "llama_mqa_wide": ModelConfig.llama(**{**ONE, "d_model": 48}, n_kv_heads=1, head_dim=16, rope_theta=5e5),
}


def random_model(cfg: ModelConfig, seed: int, std: float = 0.2) -> jaxformer.DecoderLM:
    return random_jax_module(lambda: jaxformer.DecoderLM(cfg, rngs=nnx.Rngs(0)), seed, std)


def _batch(cfg: ModelConfig, seed: int, packed: bool):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    seg, pos = random_segments(rng, B, T, n_docs=3) if packed else (None, None)
    return tokens, pos, seg


def jax_loss_and_grads(model, tokens, positions, segment_ids):
    """(logits, mean next-token cross-entropy, {name: grad}) from jaxformer."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    args = [None if a is None else jnp.asarray(a) for a in (tokens, positions, segment_ids)]

    @jax.jit
    def run(p):
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(*args)
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            nll = -jnp.take_along_axis(logp, args[0][:, 1:, None], axis=-1)
            return nll.mean(), logits
        return jax.value_and_grad(loss, has_aux=True)(p)

    (loss, logits), grads = run(params)
    return logits, loss, {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}


def torch_loss_and_grads(module, tokens, positions, segment_ids):
    args = [None if a is None else torch.from_numpy(np.asarray(a)) for a in (tokens, positions, segment_ids)]
    module.zero_grad(set_to_none=True)
    logits = module(*args)
    V = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), args[0][:, 1:].reshape(-1).long())
    loss.backward()
    # a parameter the loss does not reach (the deepseek router's correction bias: it only picks experts) has grad None
    return logits, loss, {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in module.named_parameters()}


# packed rows (segment ids + restarting positions): one config per family
CASES = [(name, False) for name in CONFIGS] + [("gpt2_tied", True), ("llama_gqa2_tied", True)]


@pytest.mark.parametrize("name,packed", CASES, ids=[f"{n}-{'packed' if p else 'plain'}" for n, p in CASES])
def test_logits_loss_grads(name, packed):
    cfg = CONFIGS[name]
    model = random_model(cfg, seed=1)
    module = jaxformer.to_torch(model)
    assert isinstance(module, torch_ref.DecoderLM)
    tokens, pos, seg = _batch(cfg, seed=2, packed=packed)

    logits_j, loss_j, grads_j = jax_loss_and_grads(model, tokens, pos, seg)
    logits_t, loss_t, grads_t = torch_loss_and_grads(module, tokens, pos, seg)
    assert logits_j.shape == (B, T, cfg.vocab_size)
    assert float(np.abs(np.asarray(logits_j)).max()) > 1.0, "logits too small for a meaningful check"
    assert_outputs_close(logits_j, logits_t, "logits")
    assert abs(float(loss_j) - loss_t.item()) <= 1e-5 * abs(loss_t.item())
    # every parameter has a gradient on both sides, under the same name
    assert set(grads_j) == set(jax_params(model)) == set(grads_t)
    zero = ("k_proj.bias",) if cfg.position != "rope" else ()  # softmax cancels it exactly (see conftest)
    assert_grads_close(grads_j, grads_t, zero=zero)
    if cfg.tie_embeddings:
        assert "lm_head.weight" not in grads_t


@pytest.mark.parametrize("name", ["gpt2_tied", "llama_mqa_wide"])
def test_state_dict_round_trip_is_bit_exact(name):
    cfg = CONFIGS[name]
    model = random_model(cfg, seed=3)
    sd = jaxformer.to_torch_state_dict(model)
    assert all(t.dtype == torch.float32 for t in sd.values())
    back = jaxformer.from_torch_state_dict(cfg, sd)
    a, b = jax_params(model), jax_params(back)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k][...]), np.asarray(b[k][...]), err_msg=k)
    # and through a torch_ref module's own state_dict (what torch users save)
    module = torch_ref.DecoderLM(cfg)
    module.load_state_dict(sd, strict=True)
    again = jaxformer.from_torch_state_dict(cfg, module.state_dict())
    for k, v in jax_params(again).items():
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(a[k][...]), err_msg=k)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 8)).astype(np.int32)
    np.testing.assert_array_equal(jax_logits(model, tokens), jax_logits(again, tokens))


def test_from_torch_reference_weights():
    """The other direction: a torch_ref module's own (torch-initialised) weights into jaxformer."""
    cfg = CONFIGS["llama_gqa2_tied"]
    torch.manual_seed(5)
    module = torch_ref.DecoderLM(cfg).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms away from 1 too
    model = jaxformer.from_torch_state_dict(cfg, module.state_dict())
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    with torch.no_grad():
        ref = module(torch.from_numpy(tokens))
    assert_outputs_close(jax_logits(model, tokens), ref, "logits")
