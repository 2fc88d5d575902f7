"""Mixture-of-Experts numerics: jaxformer vs torch_ref vs a plain-numpy reference.

The MoE layer for each router style, the gated shared expert and capacity-factor drops (checked against a
numpy loop over tokens); the whole model's logits, its training loss with the load-balancing and z-loss
terms (transformers' load_balancing_loss_func as the reference formula) and every parameter's gradient,
looped and scanned.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import torch_ref
from jaxformer.config import ModelConfig
from jaxformer.models import DecoderLM
from jaxformer.models.moe import MoE
from jaxformer.train.step import lm_loss
from parity_tests.conftest import (assert_grads_close, assert_outputs_close, copy_jax_to_torch, jax_logits,
                                   jax_params, random_jax_module)
from torch_ref.moe import MoE as TorchMoE

SMALL = dict(vocab_size=61, d_model=24, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=64)
BLOCKS = {
    "mixtral_router": ModelConfig.llama(**SMALL, n_layers=1, n_experts=5, n_experts_per_token=2, router="mixtral"),
    "qwen_shared_gated": ModelConfig.llama(**SMALL, n_layers=1, n_experts=6, n_experts_per_token=3, moe_d_ff=16,
                                           router="qwen", norm_topk_prob=False, shared_expert_d_ff=28,
                                           shared_expert_gate=True),
    "capacity_drops": ModelConfig.llama(**SMALL, n_layers=1, n_experts=4, n_experts_per_token=2, moe_d_ff=12,
                                        router="qwen", norm_topk_prob=True, capacity_factor=0.6),
}


def _silu(a):
    return a / (1.0 + np.exp(-a))


def numpy_moe(cfg: ModelConfig, w: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, float]:
    """A plain loop over tokens: (output [N, D], dropped fraction) in float64."""
    x = x.astype(np.float64)
    N, E, k = x.shape[0], cfg.moe.n_experts, cfg.moe.n_experts_per_token
    logits = x @ w["gate.weight"].T  # [N, E]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # ties: lower expert id
    top = np.take_along_axis(probs, idx, -1)
    if cfg.moe.router == "mixtral" or cfg.moe.norm_topk_prob:
        top = top / top.sum(-1, keepdims=True)
    keep = np.ones((N, k), bool)
    if cfg.moe.capacity_factor is not None:  # per expert, first come first served in (slot, token) order
        cap, taken = math.ceil(cfg.moe.capacity_factor * N * k / E), np.zeros(E, int)
        for j in range(k):
            for n in range(N):
                e = idx[n, j]
                keep[n, j] = taken[e] < cap
                taken[e] += 1
    out = np.zeros_like(x)
    for n in range(N):
        for j in range(k):
            if keep[n, j]:
                e = idx[n, j]
                h = _silu(w["experts.gate_proj"][e] @ x[n]) * (w["experts.up_proj"][e] @ x[n])
                out[n] += top[n, j] * (w["experts.down_proj"][e] @ h)
    if cfg.moe.shared_d_ff:
        s = w["shared_expert.down_proj.weight"] @ (_silu(w["shared_expert.gate_proj.weight"] @ x.T)
                                                    * (w["shared_expert.up_proj.weight"] @ x.T))
        gate = 1.0 / (1.0 + np.exp(-(x @ w["shared_expert_gate.weight"].T))) if cfg.moe.shared_gate else 1.0
        out += gate * s.T
    return out, 1.0 - keep.mean()


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_moe_layer_matches_torch_ref_and_numpy(name):
    cfg = BLOCKS[name]
    moe = random_jax_module(lambda: MoE(cfg, rngs=nnx.Rngs(0)), seed=3, std=0.3)
    tmoe = TorchMoE(cfg)
    copy_jax_to_torch(moe, tmoe)
    x = np.random.default_rng(4).standard_normal((2, 19, cfg.d_model)).astype(np.float32)
    tstats = []
    graphdef, state = nnx.split(moe)
    y, stats = jax.jit(lambda st, x: (lambda s: (nnx.merge(graphdef, st)(x, s), s))([]))(state, jnp.asarray(x))
    y = np.asarray(y)
    with torch.no_grad():
        ty = tmoe(torch.from_numpy(x), tstats).numpy()
    assert_outputs_close(y, ty, f"{name} vs torch_ref")
    ref, dropped = numpy_moe(cfg, {k: np.asarray(v[...], np.float64) for k, v in jax_params(moe).items()},
                             x.reshape(-1, cfg.d_model))
    assert_outputs_close(y.reshape(-1, cfg.d_model), ref, f"{name} vs numpy")
    assert (dropped > 0.05) == (cfg.moe.capacity_factor is not None), "capacity case must drop, dropless must not"
    np.testing.assert_allclose(float(stats[0]["dropped"]), dropped, atol=1e-6)
    np.testing.assert_allclose(float(tstats[0]["dropped"]), dropped, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats[0]["load"]), tstats[0]["load"].numpy())
    assert float(np.asarray(stats[0]["load"]).sum()) == x.shape[0] * x.shape[1] * cfg.moe.n_experts_per_token


# dense, sparse, dense (a Qwen mlp_only layer), sparse: Qwen's decoder_sparse_step 2; qwen router with a gated
# shared expert; both loss terms on
MODEL = ModelConfig.llama(**SMALL, n_layers=4, n_experts=4, n_experts_per_token=2, moe_d_ff=20, router="qwen",
                          norm_topk_prob=False, moe_every=2, dense_layers=(1,), shared_expert_d_ff=16,
                          shared_expert_gate=True, router_aux_loss_coef=0.3, router_z_loss_coef=0.05)


def _torch_objective(module, cfg, tokens, targets, mask):
    """Mean CE over kept tokens + aux_coef * transformers' load-balancing loss + z_coef * z-loss, with torch_ref."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    stats = []
    logits = module(tokens, moe_stats=stats)
    V = logits.shape[-1]
    ce = (F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none") * mask.reshape(-1)).sum()
    ce = ce / mask.sum()
    router = tuple(s["router_logits"] for s in stats)
    aux = load_balancing_loss_func(router, cfg.moe.n_experts, cfg.moe.n_experts_per_token, mask)
    z = torch.stack([(torch.logsumexp(r, -1) ** 2 * mask.reshape(-1)).sum() for r in router]).sum()
    z = z / (len(router) * mask.sum())
    return logits, ce + cfg.moe.aux_loss_coef * aux + cfg.moe.z_loss_coef * z


def test_model_logits_loss_with_aux_and_grads_match_torch_ref():
    cfg = MODEL
    model = random_jax_module(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)), seed=5, std=0.3)
    module = torch_ref.DecoderLM(cfg)
    copy_jax_to_torch(model, module)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, cfg.vocab_size, (2, 23)).astype(np.int32)
    targets = rng.integers(0, cfg.vocab_size, (2, 23)).astype(np.int32)
    mask = (rng.random((2, 23)) > 0.25).astype(np.float32)
    batch = {"inputs": tokens, "targets": targets, "positions": np.tile(np.arange(23, dtype=np.int32), (2, 1)),
             "segment_ids": np.ones_like(tokens), "loss_mask": mask}

    tl, tloss = _torch_objective(module, cfg, torch.from_numpy(tokens).long(), torch.from_numpy(targets).long(),
                                 torch.from_numpy(mask))
    tloss.backward()
    tgrads = {k: p.grad for k, p in module.named_parameters()}

    assert_outputs_close(jax_logits(model, tokens), tl.detach().numpy(), "logits")  # the plain layer loop
    # the loss and gradients through the scanned, rematerialised body (dense, sparse twice): the router
    # statistics leave jax.checkpoint and lax.scan as outputs, in layer order
    scanned = cfg.replace(scan_layers=True, remat="full")
    m = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: DecoderLM(scanned, rngs=nnx.Rngs(0)))), nnx.state(model))
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    loss_fn = lm_loss(graphdef, packed=False)

    @jax.jit
    def run(p):
        def objective(p):
            obj, (ce, n, metrics) = loss_fn(p, batch, (rest,), None)
            return obj / n, metrics
        return jax.value_and_grad(objective, has_aux=True)(p)

    (loss, metrics), grads = run(params)
    assert float(metrics["moe_aux_loss"]) > 0 and float(metrics["moe_z_loss"]) > 0
    assert_outputs_close(np.asarray(loss), tloss.detach().numpy(), "loss with aux terms")
    assert_grads_close({".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}, tgrads, "grads")
