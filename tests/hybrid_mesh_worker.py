"""Hybrid models (Gated DeltaNet, short convolution, gated attention, experts) on 8 fake CPU devices, one subprocess.

usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/hybrid_mesh_worker.py OUT.json
For each config of CONFIGS: the training objective (cross-entropy, plus the router losses of an MoE model) per token
and every parameter's gradient for one packed batch (three documents per row, cut off the DeltaNet's chunk
boundaries, so the conv taps and the delta-rule state must reset inside rows), at random weights, on one device and
on data 2 x fsdp 2 x tensor 2. OUT.json: per config the two losses, per parameter the largest elementwise gradient
error relative to one device's max |g|, that max |g|, and the PartitionSpec the mesh gave it.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np
from flax import nnx

from jaxformer import sharding
from jaxformer.config import MeshConfig, ModelConfig
from jaxformer.models import DecoderLM
from jaxformer.train.step import lm_loss

MESH = MeshConfig(data=2, fsdp=2, tensor=2)
B, T = 8, 32  # chunk_size 16: two chunks per row
_COMMON = dict(vocab_size=128, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96, max_seq_len=64,
               norm_unit_offset=True)
QWEN3_5 = ModelConfig.llama(  # three Gated DeltaNet layers, then gated full attention with per-head q/k norms
    **_COMMON, layer_types=("linear_attention",) * 3 + ("full_attention",),
    attention=dict(qk_norm="head", output_gate=True), rope=dict(partial_factor=0.25),
    linear=dict(key_heads=2, value_heads=4, key_head_dim=16, value_head_dim=16, chunk_size=16))
QWEN3_NEXT = QWEN3_5.replace(  # a DeltaNet layer, then gated attention; experts beside a gated shared expert in both
    n_layers=2, layer_types=("linear_attention", "full_attention"),
    moe=dict(n_experts=4, n_experts_per_token=2, d_ff=32, shared_d_ff=32, shared_gate=True, router="qwen",
             norm_topk_prob=True, aux_loss_coef=0.01))
LFM2 = ModelConfig.llama(  # short convolutions (biases on: in_proj, conv and out_proj) around one attention layer
    **{**_COMMON, "norm_unit_offset": False}, layer_types=("conv", "conv", "full_attention", "conv"),
    attention=dict(qk_norm="head"), conv=dict(kernel=3, bias=True))
CONFIGS = {"qwen3_5": QWEN3_5, "lfm2": LFM2, "qwen3_next": QWEN3_NEXT}


def _name(path) -> str:
    return ".".join(str(k.key) for k in path if hasattr(k, "key"))


def packed_batch(rng, vocab: int) -> dict[str, np.ndarray]:
    """[B, T] rows of three documents each (positions restarting), cuts off the chunk boundaries; 10% unmasked."""
    tokens = rng.integers(0, vocab, (B, T + 1)).astype(np.int32)
    t = np.arange(T)[None, :]
    c1 = rng.integers(3, 14, (B, 1))  # never 0 or 16: a reset inside a chunk
    c2 = c1 + rng.integers(5, 13, (B, 1))
    seg = 1 + (t >= c1).astype(np.int32) + (t >= c2).astype(np.int32)
    pos = np.where(t < c1, t, np.where(t < c2, t - c1, t - c2)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos,
            "loss_mask": (rng.random((B, T)) > 0.1).astype(np.float32)}


def _perturbed(name: str, p, rng):
    """1-D weights away from their init: norms, dt_bias, A_log by 0.3; biases by 0.02, the size of the weights'
    outputs (0.3 biases after short convolutions make every position's residual alike: attention's q/k gradients then
    fall 1000-fold and measure nothing)."""
    if p.ndim != 1:
        return p
    scale = 0.02 if name.endswith(".bias") else 0.3
    return p + scale * rng.standard_normal(p.shape).astype(p.dtype)


def loss_and_grads(cfg: ModelConfig, graphdef, params, batch, mesh) -> tuple[float, dict, dict]:
    """Objective per token, every gradient (by parameter path) and the params' specs, laid out on `mesh`."""
    loss = lm_loss(graphdef, packed=True)

    def objective(p, b):
        value, (_, n, *_) = loss(p, b, (), None)  # an MoE model's value includes its router losses
        return value / n

    with jax.set_mesh(mesh):
        p_sh = sharding.param_shardings(params, mesh, cfg)
        laid_out = jax.device_put(params, p_sh)
        value, grads = jax.jit(jax.value_and_grad(objective), out_shardings=(None, p_sh))(
            laid_out, sharding.global_batch(batch, mesh))
    flat = jax.tree_util.tree_flatten_with_path
    specs = {_name(k): [list(e) if isinstance(e, tuple) else e for e in v.sharding.spec] for k, v in flat(laid_out)[0]}
    return float(value), {_name(k): np.asarray(v) for k, v in flat(grads)[0]}, specs


def case(cfg: ModelConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    graphdef, params = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(seed)), nnx.Param)
    params = jax.tree_util.tree_map_with_path(lambda path, p: _perturbed(_name(path), p, rng), params)
    batch = packed_batch(rng, cfg.vocab_size)
    t0 = time.perf_counter()
    one = sharding.make_mesh(MeshConfig(), cfg, devices=jax.devices()[:1])
    loss_one, g_one, _ = loss_and_grads(cfg, graphdef, params, batch, one)
    loss_mesh, g_mesh, specs = loss_and_grads(cfg, graphdef, params, batch, sharding.make_mesh(MESH, cfg))
    grads = {k: {"rel": float(np.abs(g_mesh[k] - g).max() / max(float(np.abs(g).max()), 1e-30)),
                 "max_abs": float(np.abs(g).max()), "spec": specs[k]} for k, g in g_one.items()}
    return {"loss_one": loss_one, "loss_mesh": loss_mesh, "grads": grads, "mesh_names": sorted(g_mesh),
            "segments_per_row": int(batch["segment_ids"].max()), "seconds": time.perf_counter() - t0}


def main() -> None:
    report = {"devices": jax.device_count()}
    for i, (label, cfg) in enumerate(CONFIGS.items()):
        report[label] = case(cfg, seed=i)
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
