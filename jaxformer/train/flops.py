"""FLOP accounting for MFU (Kaplan et al. 2020; PaLM appendix B) and a measured matmul peak."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from jaxformer.config import ModelConfig

# dense bf16 peak TFLOP/s (no sparsity) of accelerators, by jax device_kind prefix
GPU_PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0, "NVIDIA L4": 121.0,
                   "NVIDIA A10": 125.0}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls per token (embedding lookups excluded, LM head included); a sparse
    layer counts its router, its k active experts and its shared expert (and gate). Layers are counted one by one:
    Gemma 4's full layers have their own head sizes (and no v_proj with k = v), kv-shared layers no k/v projections,
    per-layer inputs their gate and projection, Gemma 3n its AltUp and LAuReL matrices."""
    D, V, A, P = cfg.d_model, cfg.vocab_size, cfg.altup.inputs, cfg.per_layer_dim
    total = D * V + D * cfg.n_layers * P + 2 * max(A - 1, 0) * D * D  # head, per-layer input projection, AltUp in/out
    lin = cfg.linear
    for i in range(cfg.n_layers):
        H, K = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        own_kv = cfg.kv_source(i) == i
        k_eq_v = cfg.attention.k_eq_v and cfg.layer_type(i) == "full_attention"
        if cfg.layer_type(i) == "linear_attention":  # in_proj_qkv, in_proj_z, in_proj_b / a, out_proj; conv taps
            qkv = 2 * lin.key_heads * lin.key_head_dim + lin.value_heads * lin.value_head_dim
            total += D * (qkv + 2 * lin.value_heads * lin.value_head_dim + 2 * lin.value_heads) + qkv * lin.conv_kernel
        elif cfg.layer_type(i) == "conv":  # in_proj (D -> 3D), out_proj; the depthwise conv's taps
            total += 4 * D * D + D * cfg.conv.kernel
        else:
            gate = 2 if cfg.attention.output_gate else 1  # q_proj also emits the output gate
            total += (1 + gate) * D * cfg.n_heads * H + (D * K * H * (1 if k_eq_v else 2) if own_kv else 0)
        dense = D * cfg.layer_d_ff(i) * (3 if cfg.gated_mlp else 2)
        sparse = D * (cfg.moe.n_experts + 3 * cfg.moe.n_experts_per_token * cfg.expert_d_ff + 3 * cfg.moe.shared_d_ff
                      + int(cfg.moe.shared_gate))
        if cfg.block == "gemma4":  # the dense MLP runs beside the experts
            total += dense + (sparse if cfg.moe.n_experts else 0)
        else:
            total += sparse if cfg.is_moe_layer(i) else dense
        total += 2 * D * P + 2 * D * cfg.laurel_rank + (D * A + A * A + A * A * A if A else 0)
    return total


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6N for the weights (forward + backward) + 12 T (N_heads H) per attention layer for scores/values; a Gated
    DeltaNet layer's state reads and writes, 3 x 6 H_v Dk Dv per token (chunked: within 2x of it while the chunk
    is shorter than Dk), replace the T-long term."""
    lin = cfg.linear
    kinds = [cfg.layer_type(i) for i in range(cfg.n_layers)]
    attention = sum(k not in ("linear_attention", "conv") for k in kinds)
    delta = kinds.count("linear_attention") * 18.0 * lin.value_heads * lin.key_head_dim * lin.value_head_dim
    return 6.0 * matmul_params(cfg) + 12.0 * attention * seq_len * cfg.n_heads * cfg.head_dim + delta


@functools.cache
def measured_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul rate of this host's default device, measured once (a practical peak for CPUs)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def peak_tflops(configured: float | None) -> float:
    """The configured peak, else the GPU's published bf16 peak, else the measured fp32 matmul rate."""
    if configured:
        return configured
    kind = jax.devices()[0].device_kind
    for prefix, tflops in GPU_PEAK_TFLOPS.items():
        if kind.startswith(prefix):
            return tflops
    return measured_matmul_tflops()
