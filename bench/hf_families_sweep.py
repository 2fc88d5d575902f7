"""Hugging Face import and export on configs no test has seen: random odd sizes and options per family.

For each family, draws `--per-family` transformers configs (odd vocab, widths, head dims, layer counts,
windows, soft-caps, RoPE scalings; for the MoE families expert counts, top-k, shared experts, sparse-layer
patterns, norm_topk_prob; NoPE layers, per-layer-type RoPE and bias switches for OLMo 3, SmolLM3, EXAONE 4, Arcee,
Helium, ERNIE 4.5, Seed-OSS, StarCoder2; partial RoPE for GLM-4, muP multipliers for Granite, NTK-alpha RoPE for
Hunyuan, logit scale and sliding layers for Cohere 2, xIELU for Apertus; for Gemma 4 per-layer inputs, kv-shared
layers, double-wide MLPs, full layers' head sizes, k = v, proportional RoPE, experts beside the MLP; for Gemma 3n
AltUp streams and active index, LAuReL ranks, sparse gates, a short per-layer table, kv sharing; for MiniMax-M2
expert counts, top-k, rotated dims and the router's correction bias; for gpt-oss sinks, windows, clamp limits; for
GLM-4.5 and DeepSeek-V3 groups, shared experts, leading dense layers, and DeepSeek's latent attention sizes; for
Qwen3.5, Qwen3.5-MoE and Qwen3-Next Gated DeltaNet / gated full-attention layer mixes, DeltaNet head counts and
sizes, conv taps, partial RoPE, experts with a gated shared expert; for LFM2 conv / attention mixes, conv taps and
biases, the MLP width rule), builds the random-init model (1-D weights moved off their init), loads it
with `jaxformer.load_hf`, exports it with `save_hf`, reloads that with transformers, and prints max|logits diff|
both ways on a 300-token prompt, and both float32 logits (ours, transformers') against transformers' float64 ones: where
a random config amplifies rounding past 1e-4, that shows whether ours is rounding or a difference. The last line is
one JSON object of the figures.

    python bench/hf_families_sweep.py [--per-family 3] [--seed 0] [--families mixtral qwen3_moe ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jaxformer.interop import load_hf, save_hf

T = 300
# transformers' reference loops: its grouped_mm experts path wants 16-byte-aligned strides the odd sizes here lack
EAGER = dict(attn_implementation="eager", experts_implementation="eager")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
            "mixtral", "qwen2_moe", "qwen3_moe",
            "olmo3", "smollm3", "exaone4", "arcee", "helium", "ernie4_5", "seed_oss", "starcoder2",
            "glm4", "granite", "hunyuan_v1_dense", "cohere2", "apertus", "gemma4_text", "gemma3n_text", "minimax_m2", "llama4_text",
            "gpt_oss", "glm4_moe", "deepseek_v3", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "lfm2"]


def draw_rope(rng: np.random.Generator, cfg: dict, kinds=("default", "linear", "dynamic", "llama3", "yarn")) -> dict:
    """One `rope_parameters` entry: a RoPE type of `kinds` with its fields drawn (dynamic caps cfg's context at T)."""
    kind = str(rng.choice(kinds))
    rope = {"rope_type": kind, "rope_theta": float(rng.choice([1e4, 5e5, 1e6]))}
    if kind != "default":
        rope["factor"] = float(rng.uniform(1.5, 8))
    if kind in ("llama3", "yarn"):
        rope["original_max_position_embeddings"] = int(rng.integers(32, 200))
    if kind == "llama3":
        rope.update(low_freq_factor=1.0, high_freq_factor=float(rng.uniform(2, 6)))
    if kind == "dynamic":
        cfg["max_position_embeddings"] = T  # grows past it only beyond 300 tokens: export-safe
    return rope


def draw(family: str, rng: np.random.Generator) -> tuple[str, dict]:
    """A transformers config class name and its kwargs: odd sizes and the family's options, drawn at random."""
    heads = int(rng.choice([2, 3, 4, 6]))
    kv = int(rng.choice([k for k in (1, 2, 3, 6) if heads % k == 0]))
    head_dim = int(rng.choice([8, 12, 20, 24]))
    cfg = dict(vocab_size=int(rng.integers(97, 300)), hidden_size=int(rng.choice([36, 48, 60, 72])),
               intermediate_size=int(rng.integers(50, 160)), num_hidden_layers=int(rng.integers(2, 5)),
               num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=512,
               initializer_range=float(rng.uniform(0.05, 0.2)), rms_norm_eps=float(rng.choice([1e-5, 1e-6])),
               tie_word_embeddings=bool(rng.integers(2)), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    window = int(rng.integers(17, 120))
    n = cfg["num_hidden_layers"]
    mixed = [str(rng.choice(["sliding_attention", "full_attention"])) for _ in range(n)]
    if family == "llama":
        kind = str(rng.choice(["llama3", "yarn", "linear", "dynamic", "default"]))
        rope = {"rope_type": kind, "rope_theta": float(rng.choice([1e4, 5e5]))}
        if kind != "default":
            rope["factor"] = float(rng.uniform(1.5, 8))
        if kind in ("llama3", "yarn"):
            rope["original_max_position_embeddings"] = int(rng.integers(32, 200))
        if kind == "llama3":
            rope.update(low_freq_factor=1.0, high_freq_factor=float(rng.uniform(2, 6)))
        if kind == "dynamic":
            cfg["max_position_embeddings"] = T  # grows past it only beyond 300 tokens: export-safe
        bias = bool(rng.integers(2))
        return "LlamaConfig", {**cfg, "rope_parameters": rope, "attention_bias": bias, "mlp_bias": bias}
    if family == "mistral":
        return "MistralConfig", {**cfg, "sliding_window": window}
    if family == "qwen2":
        return "Qwen2Config", {**cfg, "use_sliding_window": True, "sliding_window": window,
                               "max_window_layers": int(rng.integers(0, n))}
    if family == "qwen3":
        return "Qwen3Config", {**cfg, "use_sliding_window": bool(rng.integers(2)), "sliding_window": window,
                               "max_window_layers": int(rng.integers(0, n))}
    if family == "gemma":
        return "GemmaConfig", {**cfg, "hidden_act": "gelu_pytorch_tanh"}
    if family == "gemma2":
        return "Gemma2Config", {**cfg, "sliding_window": window, "layer_types": mixed,
                                "query_pre_attn_scalar": int(rng.integers(8, 64)),
                                "attn_logit_softcapping": float(rng.uniform(2, 50)),
                                "final_logit_softcapping": float(rng.uniform(2, 30))}
    if family == "gemma3_text":
        rope = {"full_attention": {"rope_type": "linear", "factor": float(rng.uniform(1, 8)), "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": float(rng.choice([1e4, 5e4]))}}
        return "Gemma3TextConfig", {**cfg, "sliding_window": window, "layer_types": mixed, "rope_parameters": rope,
                                    "query_pre_attn_scalar": int(rng.integers(8, 64))}
    if family == "phi3":
        original = int(rng.integers(64, 250))
        half = cfg["head_dim"] // 2
        cfg.update(num_key_value_heads=heads, hidden_size=heads * cfg["head_dim"])  # Phi-3 needs D = N * H
        rope = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": original,
                "short_factor": rng.uniform(1, 1.5, half).tolist(), "long_factor": rng.uniform(1, 8, half).tolist()}
        return "Phi3Config", {**cfg, "rope_parameters": rope, "original_max_position_embeddings": original,
                              "sliding_window": window if rng.integers(2) else None}
    if family in ("smollm3", "exaone4", "arcee", "helium", "ernie4_5", "seed_oss", "starcoder2"):
        cfg["rope_parameters"] = draw_rope(rng, cfg)  # one entry for all layers (drawn first: dynamic sets max_pos)
    if family == "olmo3":  # post-norms, q/k norms over whole projections; sliding layers with their own RoPE base
        rope = {"full_attention": draw_rope(rng, cfg, ("default", "linear", "yarn")),
                "sliding_attention": {"rope_type": "default", "rope_theta": float(rng.choice([1e4, 5e4, 5e5]))}}
        return "Olmo3Config", {**cfg, "sliding_window": window, "layer_types": mixed, "rope_parameters": rope}
    if family == "smollm3":  # NoPE layers (no_rope_layers 0), sliding layers when use_sliding_window
        sliding, bias = bool(rng.integers(2)), bool(rng.integers(2))  # jaxformer: o/MLP biases with q/k/v only
        return "SmolLM3Config", {**cfg, "no_rope_layers": [int(rng.integers(2)) for _ in range(n)],
                                 "use_sliding_window": sliding, "sliding_window": window,
                                 "layer_types": mixed if sliding else None, "attention_bias": bias, "mlp_bias": bias}
    if family == "exaone4":  # post-norms, per-head q/k norms; with a window, full layers are NoPE
        pattern = int(rng.integers(1, n + 2))  # every pattern-th layer full (1: all full, all NoPE)
        if rng.integers(4):
            return "Exaone4Config", {**cfg, "sliding_window": window, "sliding_window_pattern": pattern}
        # no window: RoPE on every layer; layer_types given (transformers' own default divides by a 0 pattern)
        return "Exaone4Config", {**cfg, "sliding_window": None, "layer_types": ["full_attention"] * n}
    if family == "arcee":  # non-gated ReLU-squared MLP
        bias = bool(rng.integers(2))
        return "ArceeConfig", {**cfg, "hidden_act": "relu2", "attention_bias": bias, "mlp_bias": bias}
    if family == "helium":  # interleaved RoPE, q/k/v biases only
        cfg.update(hidden_size=heads * head_dim, rms_norm_eps=float(rng.choice([1e-8, 1e-6])))  # o_proj is D x D
        return "HeliumConfig", {**cfg, "attention_bias": bool(rng.integers(2)), "mlp_bias": False}
    if family == "ernie4_5":  # interleaved RoPE, use_bias on every projection
        return "Ernie4_5Config", {**cfg, "use_bias": bool(rng.integers(2))}
    if family == "seed_oss":  # (attention_bias, attention_out_bias, mlp_bias): the combinations jaxformer holds
        qkv, o, mlp = [(False, False, False), (True, False, False), (True, True, True)][int(rng.integers(3))]
        return "SeedOssConfig", {**cfg, "attention_bias": qkv, "attention_out_bias": o, "mlp_bias": mlp}
    if family == "starcoder2":  # LayerNorm, GELU c_fc/c_proj, biases together, one window on every layer
        cfg.pop("rms_norm_eps")
        return "Starcoder2Config", {**cfg, "norm_epsilon": float(rng.choice([1e-5, 1e-6, 1e-3])),
                                    "hidden_act": "gelu_pytorch_tanh", "use_bias": bool(rng.integers(2)),
                                    "sliding_window": window if rng.integers(2) else None}
    if family in ("glm4", "granite", "cohere2"):
        cfg["rope_parameters"] = draw_rope(rng, cfg)  # after the families above: their draws stay as they were
    if family == "glm4":  # sandwich norms, partial interleaved RoPE, fused gate_up_proj, q/k/v biases
        factors = [f for f in (0.25, 0.5, 1.0) if int(head_dim * f) % 2 == 0]  # rotated dims even
        cfg["rope_parameters"]["partial_rotary_factor"] = float(rng.choice(factors))
        return "Glm4Config", {**cfg, "attention_bias": bool(rng.integers(2))}
    if family == "granite":  # muP multipliers: embedding, residual branches, attention scale, logits divisor
        bias = bool(rng.integers(2))
        return "GraniteConfig", {**cfg, "attention_bias": bias, "mlp_bias": bias,
                                 "embedding_multiplier": float(rng.uniform(0.5, 12)),
                                 "residual_multiplier": float(rng.uniform(0.1, 1.5)),
                                 "attention_multiplier": float(rng.uniform(0.3, 2) * head_dim ** -0.5),
                                 "logits_scaling": float(rng.uniform(0.3, 2))}
    if family == "hunyuan_v1_dense":  # per-head q/k norms after RoPE; NTK-alpha (a fixed larger base) or none
        rope = {"rope_type": "default", "rope_theta": float(rng.choice([1e4, 5e5, 1e6]))}
        if rng.integers(2):
            rope.update(rope_type="dynamic", alpha=float(10 ** rng.uniform(0, 3)), factor=1.0)
        return "HunYuanDenseV1Config", {**cfg, "rope_parameters": rope, "attention_bias": False}  # True: refused
    if family == "cohere2":  # parallel block, bias-free LayerNorm, RoPE on sliding layers only, scaled logits
        cfg.pop("rms_norm_eps")
        cfg["hidden_size"] = heads * head_dim  # transformers derives head_dim as D // N
        return "Cohere2Config", {**cfg, "layer_norm_eps": float(rng.choice([1e-5, 1e-6, 1e-3])),
                                 "logit_scale": float(rng.uniform(0.3, 2)), "sliding_window": window,
                                 "layer_types": mixed, "attention_bias": False}  # True: refused (o, not MLP)
    if family == "apertus":  # non-gated MLP with learned xIELU, per-head q/k norms; llama3 RoPE or none
        return "ApertusConfig", {**cfg, "hidden_act": "xielu", "attention_bias": False,  # True: refused
                                 "rope_parameters": draw_rope(rng, cfg, ("default", "llama3"))}
    if family == "gemma4_text":
        return "Gemma4TextConfig", draw_gemma4(rng, cfg, window, heads)
    if family == "gemma3n_text":
        return "Gemma3nTextConfig", draw_gemma3n(rng, cfg, window, heads)
    if family == "llama4_text":  # chunks, NoPE layers with temperature, weightless q/k norms, sigmoid-input routing
        n = int(rng.integers(2, 7))
        step = int(rng.integers(1, 3))
        experts = int(rng.integers(3, 9))
        return "Llama4TextConfig", {
            **cfg, "num_hidden_layers": n, "attention_chunk_size": int(rng.integers(17, 120)),
            "no_rope_layer_interval": int(rng.integers(2, 5)), "use_qk_norm": bool(rng.integers(2)),
            "attn_temperature_tuning": bool(rng.integers(2)), "floor_scale": int(rng.choice([8, 32, 8192])),
            "attn_scale": float(rng.uniform(0.05, 1.0)), "num_local_experts": experts,
            "num_experts_per_tok": int(rng.integers(1, min(3, experts) + 1)), "interleave_moe_layer_step": step,
            "intermediate_size_mlp": int(rng.integers(50, 160)), "attention_bias": False,
            "rope_parameters": draw_rope(rng, cfg, ("default", "llama3", "linear"))}
    if family == "minimax_m2":  # sigmoid + correction-bias routing, q/k norms over projections, partial RoPE
        experts = int(rng.integers(3, 11))
        rope = draw_rope(rng, cfg, ("default", "linear", "yarn"))
        return "MiniMaxM2Config", {**cfg, "num_local_experts": experts, "rope_parameters": rope,
                                   "num_experts_per_tok": int(rng.integers(1, min(4, experts) + 1)),
                                   "rotary_dim": int(rng.choice([d for d in (4, 8, head_dim // 2, head_dim)
                                                                 if d % 2 == 0 and d <= head_dim]))}
    if family in ("glm4_moe", "deepseek_v3"):
        return draw_deepseek_routed(family, rng, cfg, heads, head_dim)
    if family in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"):
        return draw_gated_delta(family, rng, cfg)
    if family == "lfm2":
        return "Lfm2Config", draw_lfm2(rng, cfg, heads)
    if family == "gpt_oss":  # sinks, biases everywhere, alternating windows, biased clamped experts, yarn
        experts = int(rng.integers(3, 9))
        return "GptOssConfig", {**cfg, "num_local_experts": experts, "sliding_window": window, "layer_types": mixed,
                                "num_experts_per_tok": int(rng.integers(1, min(4, experts) + 1)),
                                "swiglu_limit": float(rng.uniform(0.5, 7.0)), "attention_bias": True,
                                "rope_parameters": {**draw_rope(rng, cfg, ("default", "yarn")), "truncate": False}}
    experts = int(rng.integers(3, 11))
    moe = dict(num_experts_per_tok=int(rng.integers(1, min(4, experts) + 1)), router_aux_loss_coef=0.02)
    if family == "mixtral":
        return "MixtralConfig", {**cfg, **moe, "num_local_experts": experts, "head_dim": head_dim,
                                 "rope_theta": float(rng.choice([1e4, 1e6]))}
    if family in ("qwen2_moe", "qwen3_moe"):
        step = int(rng.integers(1, 3))
        qwen = {**cfg, **moe, "num_experts": experts, "moe_intermediate_size": int(rng.integers(16, 80)),
                "decoder_sparse_step": step, "mlp_only_layers": [int(i) for i in range(n) if rng.random() < 0.25],
                "norm_topk_prob": bool(rng.integers(2))}
        if not any((i + 1) % step == 0 and i not in qwen["mlp_only_layers"] for i in range(n)):
            qwen["mlp_only_layers"] = []  # at least one sparse layer
        if family == "qwen2_moe":
            return "Qwen2MoeConfig", {**qwen, "shared_expert_intermediate_size": int(rng.integers(16, 96)),
                                      "qkv_bias": bool(rng.integers(2))}
        return "Qwen3MoeConfig", qwen
    return "Olmo2Config", cfg  # olmo2


def draw_deepseek_routed(family: str, rng: np.random.Generator, cfg: dict, heads: int, head_dim: int) -> tuple[str, dict]:
    """GLM-4.5 and DeepSeek-V3: the deepseek router (groups, correction bias, scaling, top-k renormalised or not),
    shared experts, leading dense layers; GLM's partial RoPE, q/k norms and biases; DeepSeek's latent attention
    (a query bottleneck or not, latent rank, rotated / unrotated / value dims, yarn with mscale_all_dim)."""
    n = cfg["num_hidden_layers"]
    group = int(rng.choice([1, 2, 4]))
    experts = group * int(rng.integers(2, 5))
    topk_group = int(rng.integers(1, group + 1))
    routed = dict(n_routed_experts=experts, n_group=group, topk_group=topk_group,
                  num_experts_per_tok=int(rng.integers(1, min(4, topk_group * experts // group) + 1)),
                  n_shared_experts=int(rng.integers(0, 3)),
                  routed_scaling_factor=float(rng.uniform(1.0, 3.0)), norm_topk_prob=bool(rng.integers(2)),
                  moe_intermediate_size=int(rng.integers(16, 80)), first_k_dense_replace=int(rng.integers(0, n)))
    if family == "glm4_moe":
        return "Glm4MoeConfig", {**cfg, **routed, "use_qk_norm": bool(rng.integers(2)),
                                 "attention_bias": bool(rng.integers(2)), "rope_parameters": {
                                     **draw_rope(rng, cfg, ("default", "yarn")),
                                     "partial_rotary_factor": float(rng.choice([f for f in (0.25, 0.5, 1.0)
                                                                                if (head_dim * f) % 2 == 0]))}}
    rope_dim = int(rng.choice([4, 8, 12]))
    rope = draw_rope(rng, cfg, ("default", "yarn"))
    if rope["rope_type"] == "yarn" and rng.integers(2):
        rope.update(mscale=1.0, mscale_all_dim=float(rng.choice([0.707, 1.0])))
    return "DeepseekV3Config", {
        **cfg, **routed, "num_key_value_heads": heads, "head_dim": rope_dim, "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": int(rng.choice([8, 12, 16])), "v_head_dim": int(rng.choice([8, 12, 20])),
        "kv_lora_rank": int(rng.choice([12, 24, 40])), "q_lora_rank": [None, 16, 28][int(rng.integers(3))],
        "attention_bias": bool(rng.integers(2)), "rope_parameters": rope}


def hybrid_types(rng: np.random.Generator, n: int, kinds: tuple[str, str]) -> list[str]:
    """n layer types of the two kinds at random, each kind at least once."""
    types = [str(rng.choice(kinds)) for _ in range(n)]
    first, second = rng.choice(n, 2, replace=False)
    types[first], types[second] = kinds
    return types


def draw_gated_delta(family: str, rng: np.random.Generator, cfg: dict) -> tuple[str, dict]:
    """Qwen3.5 / Qwen3.5-MoE / Qwen3-Next: 2-6 layers mixing Gated DeltaNet (linear_attention) and gated full
    attention; 1-3 key heads with 1-3 value heads each, key / value head dims, 2-5 conv taps; partial RoPE of 0.25 /
    0.5 / 1.0 (or the family's 0.25 default) with rotated dims even; default / linear / yarn RoPE; experts beside a
    gated shared expert (Qwen3-Next: sparse step, mlp_only_layers, norm_topk_prob). Weights of std 0.02-0.06: at
    0.1 the DeltaNet's decays grow so strong that transformers' own float32 drifts ~3e-5 from its float64."""
    n = int(rng.integers(2, 7))
    head_dim = int(rng.choice([8, 12, 16, 20, 24, 32]))
    key_heads = int(rng.integers(1, 4))
    rope = draw_rope(rng, cfg, ("default", "linear", "yarn"))
    factors = [f for f in (0.25, 0.5, 1.0) if int(head_dim * f) % 2 == 0]
    if rng.integers(4):  # else the configs' own default, 0.25 (head_dim 8, 16, 24, 32: rotated dims even)
        rope["partial_rotary_factor"] = float(rng.choice(factors))
    elif int(head_dim * 0.25) % 2:
        head_dim = 16
    out = {**cfg, "num_hidden_layers": n, "head_dim": head_dim, "initializer_range": float(rng.uniform(0.02, 0.06)),
           "layer_types": hybrid_types(rng, n, ("linear_attention", "full_attention")), "rope_parameters": rope,
           "linear_num_key_heads": key_heads, "linear_num_value_heads": key_heads * int(rng.integers(1, 4)),
           "linear_key_head_dim": int(rng.choice([8, 12, 16, 24])),
           "linear_value_head_dim": int(rng.choice([8, 12, 16, 20])),
           "linear_conv_kernel_dim": int(rng.integers(2, 6)), "attention_bias": False}
    if family == "qwen3_5_text":
        return "Qwen3_5TextConfig", out
    experts = int(rng.integers(3, 11))
    out.update(num_experts=experts, num_experts_per_tok=int(rng.integers(1, min(4, experts) + 1)),
               moe_intermediate_size=int(rng.integers(16, 80)),
               shared_expert_intermediate_size=int(rng.integers(16, 96)))
    if family == "qwen3_5_moe_text":  # every layer sparse, top-k always renormalised
        return "Qwen3_5MoeTextConfig", out  # intermediate_size kept (an extra field: the importer needs it)
    step = int(rng.integers(1, 3))
    out.update(decoder_sparse_step=step, norm_topk_prob=bool(rng.integers(2)),
               mlp_only_layers=[int(i) for i in range(n) if rng.random() < 0.25])
    if not any((i + 1) % step == 0 and i not in out["mlp_only_layers"] for i in range(n)):
        out["mlp_only_layers"] = []  # at least one sparse layer
    return "Qwen3NextConfig", out


def draw_lfm2(rng: np.random.Generator, cfg: dict, heads: int) -> dict:
    """LFM2: 2-6 layers mixing gated short convolutions and attention (per-head q/k norms), by layer_types or by
    full_attn_idxs; 2-5 conv taps, conv biases (in/out projections too) either way; the MLP width rule on (2/3,
    a multiplier of None / 1 / 0.5-1.5, rounded up to a multiple of 1-256) or off; default / linear / yarn RoPE.
    No head_dim in the config (transformers takes D / N, as the published ones do)."""
    n = int(rng.integers(2, 7))
    types = hybrid_types(rng, n, ("conv", "full_attention"))
    out = {k: v for k, v in cfg.items() if k not in ("rms_norm_eps", "head_dim")}
    out.update(num_hidden_layers=n, hidden_size=heads * cfg["head_dim"], norm_eps=float(rng.choice([1e-5, 1e-6])),
               initializer_range=float(rng.uniform(0.02, 0.1)), conv_L_cache=int(rng.integers(2, 6)),
               conv_bias=bool(rng.integers(2)), block_auto_adjust_ff_dim=bool(rng.integers(2)),
               block_multiple_of=int(rng.choice([1, 8, 32, 256])),
               block_ffn_dim_multiplier=[None, 1.0, float(rng.uniform(0.5, 1.5))][int(rng.integers(3))],
               rope_parameters=draw_rope(rng, cfg, ("default", "linear", "yarn")))
    if rng.integers(2):
        out["layer_types"] = types
    else:  # the older spelling: the attention layers' indices
        out["full_attn_idxs"] = [i for i, t in enumerate(types) if t == "full_attention"]
    return out


def draw_gemma4(rng: np.random.Generator, cfg: dict, window: int, heads: int) -> dict:
    """Gemma 4: 2-6 layers of mixed types ending full; kv sharing over a tail whose types all appear before it."""
    n = int(rng.integers(2, 7))
    types = [str(rng.choice(["sliding_attention", "full_attention"])) for _ in range(n - 1)] + ["full_attention"]
    shared = max(k for k in range(n) if set(types[n - k:]) <= set(types[:n - k])) if rng.integers(2) else 0
    shared = int(rng.integers(0, shared + 1))
    k_eq_v = bool(rng.integers(2))
    out = {**cfg, "num_hidden_layers": n, "layer_types": types, "sliding_window": window, "attention_bias": False,
           "global_head_dim": int(rng.choice([8, 16, 32, 40])), "attention_k_eq_v": k_eq_v,
           "num_kv_shared_layers": shared, "use_double_wide_mlp": bool(rng.integers(2)),
           # per-layer widths of 4 leave rows whose every gate is shut: their RMSNorm divides rounding by ~1e-3,
           # and transformers' own float32 logits then differ from its float64 ones by ~1e-3 (the models use 256)
           "hidden_size_per_layer_input": int(rng.choice([0, 16, 32])), "vocab_size_per_layer_input": cfg["vocab_size"],
           "final_logit_softcapping": float(rng.uniform(5, 40)) if rng.integers(2) else None,
           "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": float(rng.choice([1e4, 1e5]))},
                               "full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                                  "partial_rotary_factor": float(rng.choice([f for f in (0.25, 0.5, 1.0)
                                                                                if (head_dim * f) % 2 == 0]))}}}
    if k_eq_v:
        out["num_global_key_value_heads"] = int(rng.choice([k for k in (1, 2, 3) if heads % k == 0]))
    if rng.integers(2):
        experts = int(rng.integers(3, 9))
        out.update(enable_moe_block=True, num_experts=experts, top_k_experts=int(rng.integers(1, min(4, experts) + 1)),
                   moe_intermediate_size=int(rng.integers(16, 64)))
    return out


def draw_gemma3n(rng: np.random.Generator, cfg: dict, window: int, heads: int) -> dict:
    """Gemma 3n: 2-6 layers of mixed types; 1-4 AltUp streams with any active one; LAuReL rank; per-layer Gaussian
    top-k sparsity; kv sharing as for Gemma 4; a per-layer table shorter than the vocabulary or not."""
    n = int(rng.integers(2, 7))
    types = [str(rng.choice(["sliding_attention", "full_attention"])) for _ in range(n)]
    shared = max(k for k in range(n) if set(types[n - k:]) <= set(types[:n - k])) if rng.integers(2) else 0
    altup = int(rng.integers(1, 5))
    cfg = {**cfg, "hidden_size": heads * cfg["head_dim"]}  # transformers checks hidden_size % heads == 0
    return {**cfg, "num_hidden_layers": n, "layer_types": types, "sliding_window": window, "attention_bias": False,
            "num_kv_shared_layers": int(rng.integers(0, shared + 1)), "altup_num_inputs": altup,
            "altup_active_idx": int(rng.integers(altup)), "altup_correct_scale": bool(rng.integers(2)),
            "laurel_rank": int(rng.integers(2, 17)), "hidden_size_per_layer_input": int(rng.choice([16, 32])),
            "vocab_size_per_layer_input": int(rng.integers(cfg["vocab_size"] // 2, cfg["vocab_size"] + 1)),
            "activation_sparsity_pattern": [float(rng.choice([0.0, 0.5, 0.95])) for _ in range(n)],
            "final_logit_softcapping": float(rng.uniform(5, 40)),
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": float(rng.choice([1e4, 1e5]))},
                                "full_attention": draw_rope(rng, cfg, ("default", "linear", "yarn"))}}


# None where transformers 5's strict field types refuse it but its model reads it: LFM2's MLP takes 2/3 of
# intermediate_size and skips the multiplier and the rounding (set past the validator; transformers then writes null)
NONE_PAST_VALIDATOR = ("block_ffn_dim_multiplier",)


def make_config(cls: str, kw: dict):
    none = [k for k in NONE_PAST_VALIDATOR if k in kw and kw[k] is None]
    config = getattr(transformers, cls)(**{k: v for k, v in kw.items() if k not in none})
    for k in none:
        object.__setattr__(config, k, None)
    return config


def logits_hf(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-family", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    families = args.families
    results = {}
    for family in families:
        worst = [0.0] * 5
        for _ in range(args.per_family):
            cls, kw = draw(family, rng)
            torch.manual_seed(int(rng.integers(1 << 30)))
            hf = transformers.AutoModelForCausalLM.from_config(make_config(cls, kw), **EAGER).eval()
            with torch.no_grad():
                for p in hf.parameters():
                    if p.ndim == 1:
                        p.add_(0.3 * torch.randn_like(p))
                for name, b in hf.named_buffers():  # Gemma 4's layer scalars, MiniMax-M2's correction biases
                    if name.endswith(("layer_scalar", "e_score_correction_bias")):
                        b.add_(0.3 * torch.randn_like(b))
            tokens = rng.integers(3, kw["vocab_size"], (2, T))
            ref = logits_hf(hf, tokens)
            ref64 = logits_hf(hf.double(), tokens)  # transformers in float64: the rounding-free reference
            hf.float()
            with tempfile.TemporaryDirectory() as tmp:
                hf.save_pretrained(Path(tmp) / "in")
                model = load_hf(Path(tmp) / "in")
                ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
                save_hf(model, Path(tmp) / "out")
                back = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "out", **EAGER).eval()
                again = logits_hf(back, tokens)
            d_in, d_out = float(np.abs(ours - ref).max()), float(np.abs(again - ours).max())
            # float32 rounding, amplified where a config divides by a small norm: ours and transformers' float32
            # logits each against transformers' float64 ones
            ours64, hf64 = float(np.abs(ours - ref64).max()), float(np.abs(ref - ref64).max())
            worst = [max(worst[0], d_in), max(worst[1], d_out), max(worst[2], ours64), max(worst[3], hf64),
                     max(worst[4], ours64 / max(hf64, 1e-7))]
            print(f"{family:12s} {cls:17s} import {d_in:.1e} export {d_out:.1e} vs float64: ours {ours64:.1e} "
                  f"transformers' float32 {hf64:.1e}  max|logit| {np.abs(ref).max():6.1f} "
                  f"layers {kw['num_hidden_layers']} D {kw['hidden_size']} "
                  f"H {kw.get('head_dim', kw['hidden_size'] // kw['num_attention_heads'])} "
                  f"N:K {kw['num_attention_heads']}:{kw['num_key_value_heads']} V {kw['vocab_size']}", flush=True)
            if max(d_in, d_out) > 1e-4:  # the whole config, to reproduce the draw
                print(f"  over 1e-4: {cls} {json.dumps(kw)}", flush=True)
        results[family] = {"import_max_abs": worst[0], "export_max_abs": worst[1], "ours_vs_float64": worst[2],
                           "transformers_float32_vs_float64": worst[3], "worst_ratio_to_transformers_float32": worst[4]}
    print(json.dumps({"tokens": T, "per_family": args.per_family, "families": results,
                      "all_within_1e-4": all(max(r["import_max_abs"], r["export_max_abs"]) <= 1e-4
                                             for r in results.values())}))


if __name__ == "__main__":
    main()
