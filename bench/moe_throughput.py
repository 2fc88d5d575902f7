"""MoE block throughput (forward + backward, tokens/s): jaxformer's MoE vs transformers' own block of the same
family (same weights, same inputs, torch CPU) vs jaxformer's dense SwiGLU MLP with the MoE's active parameters
(d_ff = k * expert F, plus the shared experts' width) and the same dense MLP in torch (its weights), all in this
process, repeats interleaved, medians.

The two dense MLPs do the same FLOPs as either MoE block, so each framework's block over its own dense MLP
(`moe_vs_own_dense`) is what its routing, grouping and combining cost, apart from its matmul kernels' rate
(`jax_dense_vs_torch_dense`).

Families: mixtral (softmax top-k), deepseek_v3 (sigmoid scores, correction bias, groups, a shared expert) and
gpt_oss (router and expert biases, clamped GLU). Each block comes from a one-layer transformers model of that
family, saved and loaded through jaxformer's importer (the weights then equal by the tested mapping); both blocks'
outputs are compared first. The last line is one JSON object of the figures.

    python bench/moe_throughput.py [--families mixtral deepseek_v3 gpt_oss] [--tokens 2048] [--d-model 256]
                                   [--d-ff 512] [--experts 8] [--top-k 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.interop.hf import load_hf
from jaxformer.models.layers import MLP

SEQ = 256  # tokens per row; the batch is tokens / SEQ rows


def jax_runner(module: nnx.Module, x: np.ndarray, gy: np.ndarray):
    """One jitted forward + backward (gradients of sum(y * gy) for every parameter and x)."""
    graphdef, params = nnx.split(module)
    fn = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) * gy), argnums=(0, 1)))
    xj = jnp.asarray(x)

    def run():
        jax.block_until_ready(fn(params, xj))

    return run


def hf_config(family: str, D: int, F: int, E: int, k: int):
    """A one-layer transformers config of `family` whose only layer is sparse."""
    base = dict(vocab_size=256, hidden_size=D, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=SEQ, num_experts_per_tok=k)
    if family == "mixtral":
        return transformers.MixtralConfig(**base, intermediate_size=F, num_local_experts=E, router_jitter_noise=0.0)
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(**base, n_routed_experts=E, moe_intermediate_size=F, intermediate_size=F,
                                             n_shared_experts=1, n_group=2, topk_group=2, first_k_dense_replace=0,
                                             norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=None,
                                             kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
                                             v_head_dim=32, head_dim=16)
    if family == "gpt_oss":
        return transformers.GptOssConfig(**base, intermediate_size=F, num_local_experts=E, head_dim=64,
                                         layer_types=["full_attention"], sliding_window=64,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    raise ValueError(f"unknown family {family!r}; choose mixtral, deepseek_v3 or gpt_oss")


def blocks(family: str, D: int, F: int, E: int, k: int):
    """(transformers' sparse block, jaxformer's MoE, jaxformer's config) holding the same weights."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(family, D, F, E, k)).float().eval()
    with torch.no_grad():  # move 1-D weights off their init (the correction bias is a buffer: shifts the choice)
        for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
            if t.ndim == 1 and t.is_floating_point() and "rotary" not in name:
                t.add_(0.1 * torch.randn_like(t))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = load_hf(d)
    return hf.model.layers[0].mlp, model.layers[0].mlp, model.config


def torch_runner(block: torch.nn.Module, x: np.ndarray, gy: np.ndarray):
    xt, gt = torch.from_numpy(x), torch.from_numpy(gy)

    def run():
        block.zero_grad(set_to_none=True)
        xi = xt.clone().requires_grad_(True)
        out = block(xi)
        (out[0] if isinstance(out, tuple) else out).mul(gt).sum().backward()  # gpt-oss: (output, router scores)

    return run


def torch_dense(mlp: MLP) -> torch.nn.Module:
    """jaxformer's dense MLP as torch modules holding its weights: down(silu(gate(x)) * up(x))."""
    linear = lambda layer: torch.nn.Linear(*np.asarray(layer.weight[...]).shape[::-1], bias=False)  # noqa: E731
    gate, up, down = linear(mlp.gate_proj), linear(mlp.up_proj), linear(mlp.down_proj)
    with torch.no_grad():
        for t, layer in ((gate, mlp.gate_proj), (up, mlp.up_proj), (down, mlp.down_proj)):
            t.weight.copy_(torch.from_numpy(np.asarray(layer.weight[...])))

    class SwiGLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = gate, up, down

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    return SwiGLU()


def run_family(family: str, args) -> dict:
    D, F, E, k = args.d_model, args.d_ff, args.experts, args.top_k
    hf, moe, cfg = blocks(family, D, F, E, k)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.tokens // SEQ, SEQ, D)).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    active = k * F + (cfg.moe.shared_d_ff or 0)  # the dense MLP doing a token's work
    dense = MLP(ModelConfig.llama(vocab_size=256, d_model=D, n_layers=1, n_heads=4, d_ff=active, max_seq_len=SEQ),
                rngs=nnx.Rngs(1))
    dense_torch = torch_dense(dense)
    with torch.no_grad():
        out = hf(torch.from_numpy(x))
        out = out[0] if isinstance(out, tuple) else out  # gpt-oss's block returns (output, router scores)
        diff = float(np.abs(out.numpy() - np.asarray(moe(jnp.asarray(x)))).max())
        dense_diff = float(np.abs(dense_torch(torch.from_numpy(x)).numpy() - np.asarray(dense(jnp.asarray(x)))).max())
    runners = {"jaxformer_moe": jax_runner(moe, x, gy), "hf_block": torch_runner(hf, x, gy),
               "jaxformer_dense_active": jax_runner(dense, x, gy),
               "torch_dense_active": torch_runner(dense_torch, x, gy)}
    for run in runners.values():  # compile / warm up
        run()
        run()
    times = {name: [] for name in runners}
    load_before = os.getloadavg()  # a figure counts only from a machine whose load stays under its core count
    for _ in range(args.rounds):  # rounds of each runner's `repeats` back-to-back steps, as a training loop runs them
        for name, run in runners.items():
            for _ in range(args.repeats):
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
    load_after = os.getloadavg()
    tps = {name: args.tokens / statistics.median(ts) for name, ts in times.items()}
    print(f"{family}: {args.tokens} tokens, D {D}, {E} experts of F {F}, top-{k}; dense MLP d_ff {active}; "
          f"max |jaxformer - transformers| output {diff:.2e} (dense MLPs {dense_diff:.2e})")
    print(f"  load average (1, 5, 15 min) before {load_before}, after {load_after}; {os.cpu_count()} cores")
    for name, v in tps.items():
        print(f"  {name:24s} {v:10.0f} tokens/s (fwd+bwd, median of {args.rounds} x {args.repeats})")
    own = {"jaxformer": tps["jaxformer_moe"] / tps["jaxformer_dense_active"],
           "transformers": tps["hf_block"] / tps["torch_dense_active"]}
    print(f"  MoE block / its framework's dense MLP: jaxformer {own['jaxformer']:.2f}, transformers "
          f"{own['transformers']:.2f}; jaxformer dense / torch dense "
          f"{tps['jaxformer_dense_active'] / tps['torch_dense_active']:.2f}")
    return {"tokens_per_s": {n: round(v, 1) for n, v in tps.items()}, "max_abs_diff_vs_hf": diff,
            "max_abs_diff_dense_jax_vs_torch": dense_diff,
            "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in load_after],
            "ratio_vs_hf_moe_block": round(tps["jaxformer_moe"] / tps["hf_block"], 3),
            "ratio_vs_dense_active": round(own["jaxformer"], 3),
            "moe_vs_own_dense": {name: round(v, 3) for name, v in own.items()},
            "jax_dense_vs_torch_dense": round(tps["jaxformer_dense_active"] / tps["torch_dense_active"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["mixtral", "deepseek_v3", "gpt_oss"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=512, help="each expert's hidden size F")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="back-to-back steps of one runner per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over the runners (medians of rounds x repeats)")
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    results = {family: run_family(family, args) for family in args.families}
    print(json.dumps({"families": results, "cores": os.cpu_count(),
                      "min_ratio_vs_hf_moe_block": min(r["ratio_vs_hf_moe_block"] for r in results.values())}))


if __name__ == "__main__":
    main()
