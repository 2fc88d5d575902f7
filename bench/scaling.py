"""Meshes on 8 fake CPU devices: tokens/s and per-device memory; gpt2-124m memory on 1 / FSDP-8 / TP-8;
per-device bytes of one long sequence split over C = 1, 2, 4, 8 context devices (ring attention).

On CPU this proves the wiring (every mesh compiles, runs and splits memory), not speed: the 8
"devices" share this machine's cores. The per-device bytes come from the compiled train step's
memory analysis (arguments = params + optimizer state + batch; nothing is allocated for them).
On a GPU, `--gpu` reports the gpt2-124m preset's MFU on one device in bf16.
The last line is one JSON object of the figures.

    python bench/scaling.py [--steps 5] [--gpu] [--context-only]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--gpu" not in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxformer.config import MeshConfig, ModelConfig, TrainConfig, load_model_config  # noqa: E402
from jaxformer.models import DecoderLM  # noqa: E402
from jaxformer.sharding import batch_sharding, make_mesh, param_shardings, shard_like  # noqa: E402
from jaxformer.train.flops import peak_tflops, train_flops_per_token  # noqa: E402
from jaxformer.train.optim import make_optimizer  # noqa: E402
from jaxformer.train.state import init_train_state  # noqa: E402
from jaxformer.train.step import lm_loss, make_train_step  # noqa: E402

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 4, 2)]


def abstract_step_memory(cfg: ModelConfig, mesh_shape: tuple[int, int, int], B: int, T: int,
                         context: int = 1) -> dict:
    """Per-device argument bytes of the compiled train step, from shapes alone (mesh data, fsdp, tensor x context)."""
    d, f, t = mesh_shape
    devices = jax.devices()[: d * f * t * context]
    mesh = make_mesh(MeshConfig(data=d, fsdp=f, tensor=t, context=context), cfg, devices=devices)
    tx = make_optimizer(TrainConfig())
    with jax.set_mesh(mesh):
        graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))))
        p_sh = param_shardings(abstract_params, mesh, cfg)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, p_sh)
        opt_abs = jax.eval_shape(tx.init, params)
        o_sh = shard_like(opt_abs, abstract_params, p_sh, mesh)
        opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abs, o_sh)
        bs = batch_sharding(mesh)
        i32 = lambda: jax.ShapeDtypeStruct((B, T), np.int32, sharding=bs)  # noqa: E731
        batch = {"inputs": i32(), "targets": i32(), "positions": i32(), "segment_ids": i32(),
                 "loss_mask": jax.ShapeDtypeStruct((B, T), np.float32, sharding=bs)}
        step = jax.jit(make_train_step(lm_loss(graphdef, packed=False), tx), out_shardings=(p_sh, o_sh, None),
                       donate_argnums=(0, 1))
        mem = step.lower(params, opt, batch).compile().memory_analysis()
    state_bytes = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                      for x in jax.tree.leaves((params, opt)))
    return {"argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
            "params_opt_bytes": state_bytes}


def mesh_throughput(cfg: ModelConfig, mesh_shape, B: int, T: int, steps: int) -> float:
    d, f, t = mesh_shape
    mesh = make_mesh(MeshConfig(data=d, fsdp=f, tensor=t), cfg, devices=jax.devices()[: d * f * t])
    tx = make_optimizer(TrainConfig(warmup_steps=0))
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        graphdef, state, sh = init_train_state(cfg, tx, mesh, 0)
        step = jax.jit(make_train_step(lm_loss(graphdef, packed=False), tx),
                       out_shardings=(sh["params"], sh["opt_state"], None),
                       donate_argnums=(0, 1))
        p, o = state["params"], state["opt_state"]
        times = []
        for i in range(steps + 2):
            tok = rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
            b = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
                 "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}
            b = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in b.items()}
            t0 = time.perf_counter()
            p, o, m = step(p, o, b)
            m["loss"].block_until_ready()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return B * T / float(np.median(times))


def gpu_mfu(steps: int) -> dict:
    cfg = load_model_config("gpt2-124m").replace(param_dtype="float32", compute_dtype="bfloat16",
                                                 attention_impl="auto", vocab_size=50304)
    B, T = 16, 1024
    tps = mesh_throughput(cfg, (1, 1, 1), B, T, steps)
    mfu = tps * train_flops_per_token(cfg, T) / (peak_tflops(None) * 1e12)
    return {"device": jax.devices()[0].device_kind, "gpt2_124m_tokens_per_s": round(tps, 1), "gpt2_124m_mfu": round(mfu, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gpu", action="store_true", help="measure gpt2-124m MFU on one GPU instead")
    ap.add_argument("--context-only", action="store_true", help="only the context-parallel memory table")
    args = ap.parse_args()
    if args.gpu:
        figures = gpu_mfu(args.steps)
        print(json.dumps(figures))
        return
    if args.context_only:
        print(json.dumps({"context": context_memory()}))
        return
    assert jax.device_count() >= 8, "needs 8 devices (set XLA_FLAGS=--xla_force_host_platform_device_count=8)"
    small = ModelConfig.llama(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=688,
                              max_seq_len=256)
    figures: dict = {"meshes": {}}
    print(f"{'mesh (d,f,t)':14s} {'tokens/s':>10s} {'params+opt MB/device':>22s}")
    for shape in MESHES:
        tps = mesh_throughput(small, shape, 16, 128, args.steps)
        mem = abstract_step_memory(small, shape, 16, 128)
        figures["meshes"][str(shape)] = {"tokens_per_s": round(tps, 1), **mem}
        print(f"{str(shape):14s} {tps:10,.0f} {mem['params_opt_bytes'] / 2**20:22.2f}", flush=True)
    gpt2 = load_model_config("gpt2-124m").replace(vocab_size=50304)  # padded to a multiple of 64, as usual
    print("\ngpt2-124m per-device bytes from the compiled step (B=8, T=1024):")
    g = {}
    # gpt2-124m has 12 heads: tensor=8 is rejected (it splits heads), so TP uses 4 (x FSDP-2 on 8 devices)
    for name, shape in (("single", (1, 1, 1)), ("fsdp8", (1, 8, 1)), ("tp4", (1, 1, 4)), ("fsdp2_tp4", (1, 2, 4))):
        g[name] = abstract_step_memory(gpt2, shape, 8, 1024)
        print(f"  {name:7s} arguments {g[name]['argument_bytes'] / 2**20:9.1f} MiB   "
              f"params+opt {g[name]['params_opt_bytes'] / 2**20:9.1f} MiB   temp {g[name]['temp_bytes'] / 2**20:9.1f} MiB",
              flush=True)
    figures["gpt2_124m"] = g
    figures["fsdp8_mem_fraction"] = round(g["fsdp8"]["argument_bytes"] / g["single"]["argument_bytes"], 4)
    figures["tp4_mem_fraction"] = round(g["tp4"]["argument_bytes"] / g["single"]["argument_bytes"], 4)
    figures["fsdp2_tp4_mem_fraction"] = round(g["fsdp2_tp4"]["argument_bytes"] / g["single"]["argument_bytes"], 4)
    print(f"per-device arguments over single: FSDP-8 {figures['fsdp8_mem_fraction']:.3f}   TP-4 "
          f"{figures['tp4_mem_fraction']:.3f}   FSDP-2 x TP-4 {figures['fsdp2_tp4_mem_fraction']:.3f}")
    figures["context"] = context_memory()
    print(json.dumps(figures))


def context_memory(T: int = 8192) -> dict:
    """Per-device bytes of the train step for one sequence of T tokens over C = 1, 2, 4, 8 context devices."""
    cfg = ModelConfig.llama(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=688,
                            max_seq_len=T)
    print(f"\ncontext parallelism: one sequence of {T} tokens (batch 1) over C devices, per-device bytes of the step")
    print(f"{'C':>3s} {'temporaries MiB':>16s} {'x C / (C=1)':>12s} {'params+opt MiB':>15s}")
    out = {}
    for c in (1, 2, 4, 8):
        out[c] = abstract_step_memory(cfg, (1, 1, 1), 1, T, context=c)
        ratio = out[c]["temp_bytes"] * c / out[1]["temp_bytes"]
        print(f"{c:3d} {out[c]['temp_bytes'] / 2**20:16.1f} {ratio:12.2f} {out[c]['params_opt_bytes'] / 2**20:15.2f}",
              flush=True)
    return out


if __name__ == "__main__":
    main()
