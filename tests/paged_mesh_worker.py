"""The paged engine on 8 fake CPU devices: greedy tokens on a mesh against one device, in one process.

usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/paged_mesh_worker.py OUT.json
  Writes, per case, the tokens of 4 ragged prompts on the mesh and on one device (xla attention), and the pools'
  layout.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from flax import nnx

from jaxformer import sharding
from jaxformer.config import MeshConfig, ModelConfig
from jaxformer.infer import SamplingParams, generate
from jaxformer.infer.paged_engine import PagedEngine
from jaxformer.models import DecoderLM

BASE = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=128, max_seq_len=64, init_std=0.3)
CASES = {"dense_tensor4": (ModelConfig.llama(**BASE), MeshConfig(data=1, fsdp=1, tensor=4)),
         "moe_expert2_tensor2": (ModelConfig.llama(**BASE, n_experts=4, n_experts_per_token=2, moe_d_ff=64),
                                 MeshConfig(data=1, fsdp=1, tensor=2, expert=2)),
         # the Pallas paged decode kernel (interpreted), one per tensor shard of the kv heads
         "pallas_tensor2": (ModelConfig.llama(**BASE, attention_impl="pallas"), MeshConfig(data=1, fsdp=1, tensor=2)),
         # gpt-oss's sinks through the Pallas paged kernel: each tensor shard takes its own heads' sinks
         "pallas_sinks_tensor2": (ModelConfig.llama(**BASE, attention_impl="pallas", attention=dict(sinks=True)),
                                  MeshConfig(data=1, fsdp=1, tensor=2)),
         # DeepSeek's latent attention: one-head latent pages (replicated), heads split over tensor
         "latent_tensor2": (ModelConfig.llama(**{**BASE, "n_kv_heads": 8}, head_dim=12,
                                              latent=dict(kv_rank=16, q_rank=12, rope_dim=4)),
                            MeshConfig(data=1, fsdp=1, tensor=2))}


def build(cfg: ModelConfig) -> DecoderLM:
    """The case's model; attention sinks drawn away from zero (a shard given another head's sinks would show)."""
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    for i, layer in enumerate(model.layers):
        if getattr(layer.self_attn, "sinks", None) is not None:
            layer.self_attn.sinks[...] = 2.0 * jax.random.normal(jax.random.key(i), (cfg.n_heads,))
    return model


def main() -> None:
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, 96, n)) for n in (3, 11, 17, 30)]
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    report = {"devices": jax.device_count()}
    for name, (cfg, mesh_cfg) in CASES.items():
        if cfg.attention_impl == "pallas":
            os.environ["JAXFORMER_PALLAS_INTERPRET"] = "1"
        page = 16 if cfg.attention_impl == "pallas" else 4
        one = generate(PagedEngine(build(cfg.replace(attention_impl="xla")), max_batch=4, page_size=page), prompts,
                       params)
        model = build(cfg)
        n = mesh_cfg.tensor * mesh_cfg.expert
        mesh = sharding.make_mesh(mesh_cfg, cfg, devices=jax.devices()[:n])
        engine = PagedEngine(model, max_batch=4, page_size=page, mesh=mesh)
        sharded = generate(engine, prompts, params)
        report[name] = {"tokens": [s.tokens for s in sharded], "tokens_one_device": [s.tokens for s in one],
                        "pool_spec": [str(a) if a is not None else None
                                      for a in engine.slots.cache.k[0].sharding.spec]}
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
