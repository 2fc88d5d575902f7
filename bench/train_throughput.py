"""Training throughput on this machine: jaxformer vs torch_ref vs Hugging Face GPT2LMHeadModel.

One GPT-2-style config (6 layers, width 384, 6 heads, seq 256, batch 8, vocab 8192, fp32), the same
random batches and the same thread count for every framework, AdamW everywhere. Prints tokens/s,
the ratios, and jaxformer's achieved FLOP/s over this machine's measured fp32 matmul rate.
The last line is one JSON object of the figures.

    python bench/train_throughput.py [--steps 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
import torch
from flax import nnx

from jaxformer import ModelConfig, to_torch
from jaxformer.config import MeshConfig, TrainConfig
from jaxformer.sharding import make_mesh
from jaxformer.train.flops import measured_matmul_tflops, train_flops_per_token
from jaxformer.train.optim import make_optimizer
from jaxformer.train.state import init_train_state
from jaxformer.train.step import lm_loss, make_train_step

CFG = ModelConfig.gpt2(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, d_ff=1536, max_seq_len=256)
# jaxformer is also timed with scan_layers=True (one compiled block body) for comparison
B, T = 8, 256


def batches(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32) for _ in range(n)]


def time_steps(step, data: list[np.ndarray], warmup: int) -> list[float]:
    for tok in data[:warmup]:
        step(tok)
    times = []
    for tok in data[warmup:]:
        t = time.perf_counter()
        step(tok)
        times.append(time.perf_counter() - t)
    return times


def jaxformer_step(scan: bool):
    """The jitted train step of the training loop (AdamW, clipping, donated buffers) on one device."""
    cfg = CFG.replace(scan_layers=scan)
    tcfg = TrainConfig(lr=3e-4, warmup_steps=0, steps=1000)
    tx = make_optimizer(tcfg)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        graphdef, state, sh = init_train_state(cfg, tx, mesh, 0)
        fn = jax.jit(make_train_step(lm_loss(graphdef, packed=False), tx), donate_argnums=(0, 1))
    box = [state["params"], state["opt_state"]]
    pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    ones = np.ones((B, T), np.float32)

    def step(tok):
        batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "positions": pos, "segment_ids": pos,
                 "loss_mask": ones}
        with jax.set_mesh(mesh):
            box[0], box[1], m = fn(box[0], box[1], batch)
        m["loss"].block_until_ready()

    return step, nnx.merge(graphdef, state["params"])


def torch_step(model: torch.nn.Module, logits_of):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(tok):
        t = torch.from_numpy(tok).long()
        logits = logits_of(model, t[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=CFG.vocab_size, n_embd=CFG.d_model, n_layer=CFG.n_layers, n_head=CFG.n_heads,
                     n_positions=CFG.max_seq_len, n_inner=CFG.d_ff, attn_pdrop=0.0, embd_pdrop=0.0,
                     resid_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.train()
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    data = batches(args.steps + args.warmup)

    jx_step, jx_model = jaxformer_step(scan=False)
    ref = to_torch(jx_model).train()
    runs = {
        "jaxformer": jx_step,
        "jaxformer_scan_layers": jaxformer_step(scan=True)[0],
        "torch_ref": torch_step(ref, lambda m, t: m(t)),
        "hf": torch_step(hf_model(), lambda m, t: m(t).logits),
    }
    tokens = B * T
    results = {}
    for name, step in runs.items():
        times = time_steps(step, data, args.warmup)
        results[name] = tokens / statistics.median(times)
        print(f"{name:10s} {results[name]:10,.0f} tokens/s  (median of {len(times)} steps)", flush=True)

    achieved = results["jaxformer"] * train_flops_per_token(CFG, T) / 1e12
    peak = measured_matmul_tflops()
    figures = {
        "threads": threads, "device": jax.devices()[0].device_kind,
        "tokens_per_s": {k: round(v, 1) for k, v in results.items()},
        "ratio_vs_hf": round(results["jaxformer"] / results["hf"], 3),
        "ratio_vs_torch_ref": round(results["jaxformer"] / results["torch_ref"], 3),
        "achieved_tflops": round(achieved, 4), "matmul_tflops": round(peak, 4),
        "frac_of_matmul_peak": round(achieved / peak, 3),
    }
    print(f"jaxformer / HF: {figures['ratio_vs_hf']:.2f}x   jaxformer / torch_ref: {figures['ratio_vs_torch_ref']:.2f}x   "
          f"achieved {achieved * 1e3:.1f} GFLOP/s = {figures['frac_of_matmul_peak']:.0%} of the measured "
          f"{peak * 1e3:.1f} GFLOP/s fp32 matmul rate")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
