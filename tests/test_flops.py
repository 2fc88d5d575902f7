"""MFU's parameter count per token (train/flops.py: matmul_params) against the model's own weights: every matrix
a token multiplies by, counted from nnx.eval_shape of the model (the embedding tables are lookups and left out, a
tied head counted once, a sparse layer's routed experts at k of E)."""

from __future__ import annotations

import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models import model_class
from jaxformer.train.flops import matmul_params

BASE = dict(vocab_size=101, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
GEMMA = dict(norm_placement="sandwich", layer_types=("sliding_attention", "full_attention") * 2,
             attention=dict(qk_norm="head", v_norm=True, scale=1.0, sliding_window=4))
CONFIGS = {
    "llama": dict(),
    "qwen2_moe": dict(moe=dict(n_experts=6, n_experts_per_token=2, d_ff=16, shared_d_ff=24, shared_gate=True,
                               router="qwen", every=2)),
    "gemma4": dict(GEMMA, block="gemma4", per_layer_dim=8, kv_shared_layers=2, double_wide_shared_mlp=True,
                   attention=dict(GEMMA["attention"], global_head_dim=16, global_kv_heads=1, k_eq_v=True)),
    "gemma4_moe": dict(GEMMA, block="gemma4", moe=dict(n_experts=4, n_experts_per_token=2, d_ff=16, router="gemma4")),
    "gemma3n": dict(GEMMA, block="gemma3n", per_layer_dim=8, kv_shared_layers=2, laurel_rank=4, altup=dict(inputs=3)),
    "llama4": dict(layer_types=("chunked_attention",) * 3 + ("full_attention",), rope=dict(nope_layers=(3,)),
                   attention=dict(qk_norm="rms", chunk_size=8),
                   moe=dict(n_experts=4, n_experts_per_token=1, d_ff=16, shared_d_ff=16, router="llama4", every=2)),
    # hybrids: Gated DeltaNet and short-convolution layers (their depthwise conv taps count) beside gated attention
    "hybrid": dict(layer_types=("linear_attention", "conv", "linear_attention", "full_attention"),
                   linear=dict(key_heads=2, value_heads=4, key_head_dim=8, value_head_dim=6, conv_kernel=4),
                   conv=dict(kernel=3), attention=dict(output_gate=True, qk_norm="head")),
}


def weights_a_token_multiplies(cfg: ModelConfig) -> float:
    model = nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0)))
    total = 0.0
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, path))
        if len(v.shape) < 2 or name.startswith(("embed_tokens", "embed_positions")):
            continue
        share = cfg.moe.n_experts_per_token / cfg.moe.n_experts if ".experts." in name else 1.0
        total += share * v.size
    return total + (cfg.d_model * cfg.vocab_size if cfg.tie_embeddings else 0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matmul_params_are_the_models_matrices(name):
    cfg = ModelConfig.llama(**{**BASE, **CONFIGS[name]})
    assert matmul_params(cfg) == weights_a_token_multiplies(cfg)
