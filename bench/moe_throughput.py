"""MoE block throughput (forward + backward, tokens/s): jaxformer's MoE vs transformers' MixtralSparseMoeBlock
(same weights, same inputs, torch CPU) vs jaxformer's dense SwiGLU MLP with the MoE's active parameters
(d_ff = k * expert F), all in this process, repeats interleaved, medians. Checks first that both MoE blocks
give the same output. The last line is one JSON object of the figures.

    python bench/moe_throughput.py [--tokens 2048] [--d-model 256] [--d-ff 512] [--experts 8] [--top-k 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from jaxformer.config import ModelConfig
from jaxformer.models.layers import MLP
from jaxformer.models.moe import MoE

SEQ = 256  # tokens per row; the batch is tokens / SEQ rows


def jax_runner(module: nnx.Module, x: np.ndarray, gy: np.ndarray):
    """One jitted forward + backward (gradients of sum(y * gy) for every parameter and x)."""
    graphdef, params = nnx.split(module)
    fn = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) * gy), argnums=(0, 1)))
    xj = jnp.asarray(x)

    def run():
        jax.block_until_ready(fn(params, xj))

    return run


def hf_block(moe: MoE, cfg: ModelConfig) -> MixtralSparseMoeBlock:
    """transformers' Mixtral block holding the jaxformer block's weights (fused gate_up_proj [E, 2F, D])."""
    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=cfg.d_model, intermediate_size=cfg.expert_d_ff,
                                             num_local_experts=cfg.moe.n_experts,
                                             num_experts_per_tok=cfg.moe.n_experts_per_token, router_jitter_noise=0.0))
    t = lambda a: torch.from_numpy(np.asarray(a).copy())  # noqa: E731
    with torch.no_grad():
        hf.gate.weight.copy_(t(moe.gate.weight[...]))
        hf.experts.gate_up_proj.copy_(torch.cat([t(moe.experts.gate_proj[...]), t(moe.experts.up_proj[...])], 1))
        hf.experts.down_proj.copy_(t(moe.experts.down_proj[...]))
    return hf


def torch_runner(block: torch.nn.Module, x: np.ndarray, gy: np.ndarray):
    xt, gt = torch.from_numpy(x), torch.from_numpy(gy)

    def run():
        block.zero_grad(set_to_none=True)
        xi = xt.clone().requires_grad_(True)
        (block(xi) * gt).sum().backward()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=512, help="each expert's hidden size F")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    D, F, E, k = args.d_model, args.d_ff, args.experts, args.top_k
    cfg = ModelConfig.llama(vocab_size=256, d_model=D, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=F,
                            max_seq_len=SEQ, n_experts=E, n_experts_per_token=k)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.tokens // SEQ, SEQ, D)).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    dense = MLP(cfg.replace(n_experts=0, d_ff=k * F), rngs=nnx.Rngs(1))  # the MoE's active parameters per token
    hf = hf_block(moe, cfg)
    with torch.no_grad():
        diff = float(np.abs(hf(torch.from_numpy(x)).numpy() - np.asarray(moe(jnp.asarray(x)))).max())
    runners = {"jaxformer_moe": jax_runner(moe, x, gy), "hf_mixtral_block": torch_runner(hf, x, gy),
               "jaxformer_dense_active": jax_runner(dense, x, gy)}
    for run in runners.values():  # compile / warm up
        run()
        run()
    times = {name: [] for name in runners}
    load_before = os.getloadavg()  # a figure counts only from a machine whose load stays under its core count
    for _ in range(args.repeats):
        for name, run in runners.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    load_after = os.getloadavg()
    tps = {name: args.tokens / statistics.median(ts) for name, ts in times.items()}
    print(f"{args.tokens} tokens, D {D}, {E} experts of F {F}, top-{k}; dense MLP d_ff {k * F}; "
          f"torch threads {torch.get_num_threads()}; max |jaxformer - transformers| output {diff:.2e}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}; {os.cpu_count()} cores")
    for name, v in tps.items():
        print(f"  {name:24s} {v:10.0f} tokens/s (fwd+bwd, median of {args.repeats})")
    result = {"tokens_per_s": {n: round(v, 1) for n, v in tps.items()}, "max_abs_diff_vs_hf": diff,
              "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in load_after],
              "cores": os.cpu_count(),
              "ratio_vs_hf_moe_block": round(tps["jaxformer_moe"] / tps["hf_mixtral_block"], 3),
              "ratio_vs_dense_active": round(tps["jaxformer_moe"] / tps["jaxformer_dense_active"], 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
