"""torch_ref vs Hugging Face transformers, family by family: the open families' ModelConfig fields.

Each case is a random-init transformers model built from its config class (nothing is downloaded) with
every matrix redrawn and every 1-D weight (norms, biases) perturbed away from its init, copied into
torch_ref.DecoderLM by renaming (`hf_to_torch_ref`), and run on prompts longer than any sliding window.
Logits must agree within 1e-4 absolute (eager attention on the transformers side).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import torch_ref
from torch_ref.layers import rope_inv_freq
from jaxformer.config import ModelConfig, RopeScaling
from parity_tests.conftest import assert_hf_close, quiet_transformers

quiet_transformers()
import transformers  # noqa: E402

B = 2
V = 101
# transformers kwargs and the jaxformer fields shared by most cases: GQA, head_dim 16 with d_model 48
HF_BASE = dict(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=64,
               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
OURS_BASE = dict(vocab_size=V, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64,
                 max_seq_len=64, norm_eps=1e-6)
GEMMA = dict(norm_unit_offset=True, scale_embedding=True, activation="gelu_tanh", tie_embeddings=True)
GEMMA4 = dict(block="gemma4", activation="gelu_tanh", norm_placement="sandwich", scale_embedding=True,
              tie_embeddings=True, final_logit_softcap=30.0, export_as="gemma4_text",
              rope=dict(theta=1e6, local_theta=1e4, scaling=dict(rope_type="proportional", partial_rotary_factor=0.25)))
GEMMA4_ATTENTION = dict(qk_norm="head", v_norm=True, scale=1.0, sliding_window=8)
SHORT = tuple(float(x) for x in np.linspace(1.0, 1.6, 8))  # longrope factors, head_dim / 2 of them
LONG = tuple(float(x) for x in np.geomspace(1.0, 12.0, 8))


@dataclasses.dataclass(frozen=True)
class Case:
    hf_class: str  # transformers class name, e.g. "LlamaForCausalLM"
    hf_config: str  # its config class
    hf: dict  # config kwargs on top of HF_BASE
    ours: ModelConfig
    lengths: tuple[int, ...] = (40,)  # prompt lengths, each longer than any window


def llama(rope: dict, scaling: RopeScaling, lengths=(40,), **hf) -> Case:
    return Case("LlamaForCausalLM", "LlamaConfig", dict(rope_parameters=rope, **hf),
                ModelConfig.llama(**OURS_BASE, rope_theta=rope["rope_theta"], rope_scaling=scaling), lengths)


CASES = {
    # Llama 3.1: orig 64 puts wavelengths of head_dim 16 in all three bands (kept, blended, / factor)
    "llama3": llama(dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=64),
                    RopeScaling("llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=64)),
    # yarn: correction range [0, 2] of 8 frequencies, attention factor 0.1 ln 4 + 1
    "llama_yarn": llama(dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32),
                        RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32)),
    # yarn with DeepSeek-style mscale, explicit betas, an untruncated correction range
    "llama_yarn_mscale": llama(dict(rope_type="yarn", rope_theta=500.0, factor=8.0, original_max_position_embeddings=48,
                                    beta_fast=16.0, beta_slow=2.0, mscale=1.0, mscale_all_dim=0.5, truncate=False),
                               RopeScaling("yarn", factor=8.0, original_max_position_embeddings=48, beta_fast=16.0,
                                           beta_slow=2.0, mscale=1.0, mscale_all_dim=0.5, truncate=False)),
    "llama_linear": llama(dict(rope_type="linear", rope_theta=10000.0, factor=2.5),
                          RopeScaling("linear", factor=2.5)),
    # dynamic NTK: transformers' threshold is max_position_embeddings (32 here); 24 stays, 48 grows the base
    "llama_dynamic": llama(dict(rope_type="dynamic", rope_theta=10000.0, factor=3.0),
                           RopeScaling("dynamic", factor=3.0, original_max_position_embeddings=32), (24, 48),
                           max_position_embeddings=32),
    # Qwen2: q/k/v biases (not o_proj), layer 0 full and layer 1 sliding (max_window_layers=1)
    "qwen2": Case("Qwen2ForCausalLM", "Qwen2Config",
                  dict(rope_parameters=dict(rope_type="default", rope_theta=1e6), use_sliding_window=True,
                       sliding_window=8, max_window_layers=1),
                  ModelConfig.llama(**OURS_BASE, rope_theta=1e6, qkv_bias=True, sliding_window=8,
                                    layer_types=("full_attention", "sliding_attention"))),
    # Qwen3: RMSNorm over head_dim on q and k, tied embeddings
    "qwen3": Case("Qwen3ForCausalLM", "Qwen3Config",
                  dict(rope_parameters=dict(rope_type="default", rope_theta=1e6), tie_word_embeddings=True),
                  ModelConfig.llama(**OURS_BASE, rope_theta=1e6, qk_norm="head", tie_embeddings=True)),
    # Mistral: every layer sliding, window 8
    "mistral": Case("MistralForCausalLM", "MistralConfig", dict(sliding_window=8),
                    ModelConfig.llama(**OURS_BASE, sliding_window=8)),
    # Gemma: (1 + w) RMSNorm, sqrt(D) embedding scale, GeGLU, tied head
    "gemma": Case("GemmaForCausalLM", "GemmaConfig", dict(hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
                  ModelConfig.llama(**OURS_BASE, **GEMMA)),
    # Gemma 2: sandwich norms, query_pre_attn_scalar != head_dim, both soft-caps low enough to bend,
    # a sliding and a full layer (transformers' default alternation)
    "gemma2": Case("Gemma2ForCausalLM", "Gemma2Config",
                   dict(hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, query_pre_attn_scalar=24,
                        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=8),
                   ModelConfig.llama(**OURS_BASE, **GEMMA, norm_placement="sandwich", query_pre_attn_scalar=24,
                                     attn_logit_softcap=2.0, final_logit_softcap=3.0, sliding_window=8,
                                     layer_types=("sliding_attention", "full_attention"))),
    # Gemma 3: + q/k head norms, local RoPE base on sliding layers, linear scaling on the global ones
    "gemma3_text": Case("Gemma3ForCausalLM", "Gemma3TextConfig",
                        dict(hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, query_pre_attn_scalar=24,
                             final_logit_softcapping=3.0, sliding_window=8,
                             layer_types=["sliding_attention", "full_attention"],
                             rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                              "full_attention": dict(rope_type="linear", factor=2.0,
                                                                     rope_theta=1e6)}),
                        ModelConfig.llama(**OURS_BASE, **GEMMA, norm_placement="sandwich", qk_norm="head",
                                          query_pre_attn_scalar=24, final_logit_softcap=3.0, sliding_window=8,
                                          rope_theta=1e6, rope_local_theta=10000.0,
                                          rope_scaling=RopeScaling("linear", factor=2.0),
                                          layer_types=("sliding_attention", "full_attention"))),
    # Phi-3: longrope, short factors up to 32 tokens, long ones past them; attention factor from 64 / 32
    "phi3_longrope": Case("Phi3ForCausalLM", "Phi3Config",
                          dict(head_dim=None, hidden_size=64, original_max_position_embeddings=32,
                               rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                    short_factor=list(SHORT), long_factor=list(LONG))),
                          ModelConfig.llama(**{**OURS_BASE, "d_model": 64},
                                            rope_scaling=RopeScaling("longrope", factor=2.0,
                                                                     original_max_position_embeddings=32,
                                                                     short_factor=SHORT, long_factor=LONG)),
                          (24, 48)),
    # OLMo 2: norms after attention and MLP only, q/k RMSNorm over the whole projections (N*H and K*H)
    "olmo2": Case("Olmo2ForCausalLM", "Olmo2Config", dict(),
                  ModelConfig.llama(**OURS_BASE, norm_placement="post", qk_norm="proj")),
    # SmolLM3: layer 1 without RoPE and sliding, layer 0 full with RoPE
    "smollm3": Case("SmolLM3ForCausalLM", "SmolLM3Config",
                    dict(no_rope_layers=[1, 0], use_sliding_window=True, sliding_window=8,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                         layer_types=["full_attention", "sliding_attention"]),
                    ModelConfig.llama(**OURS_BASE, rope=dict(nope_layers=[1]), sliding_window=8,
                                      layer_types=("full_attention", "sliding_attention"))),
    # EXAONE 4: post-norms, per-head q/k norms, a sliding layer with RoPE, a full one without
    "exaone4": Case("Exaone4ForCausalLM", "Exaone4Config", dict(sliding_window=8, sliding_window_pattern=2),
                    ModelConfig.llama(**OURS_BASE, norm_placement="post", qk_norm="head", sliding_window=8,
                                      rope=dict(nope_layers=[1]), layer_types=("sliding_attention", "full_attention"))),
    # Arcee: up -> ReLU squared -> down, no gate
    "arcee": Case("ArceeForCausalLM", "ArceeConfig", dict(hidden_act="relu2"),
                  ModelConfig.llama(**OURS_BASE, gated_mlp=False, activation="relu2")),
    # StarCoder2: LayerNorm with biases, GELU(tanh) c_fc / c_proj, every projection biased, all layers sliding
    "starcoder2": Case("Starcoder2ForCausalLM", "Starcoder2Config",
                       dict(use_bias=True, sliding_window=8, norm_epsilon=1e-6, hidden_act="gelu_pytorch_tanh"),
                       ModelConfig(**OURS_BASE, norm="layernorm", gated_mlp=False, activation="gelu_tanh",
                                   use_bias=True, sliding_window=8)),
    # GLM-4: sandwich norms under its names, half of each head rotated (interleaved), q/k/v biases
    "glm4": Case("Glm4ForCausalLM", "Glm4Config", dict(partial_rotary_factor=0.5, attention_bias=True),
                 ModelConfig.llama(**OURS_BASE, norm_placement="sandwich", qkv_bias=True, export_as="glm4",
                                   rope=dict(partial_factor=0.5))),
    # Granite: multipliers on embedding, residual branches, attention scores and logits
    "granite": Case("GraniteForCausalLM", "GraniteConfig",
                    dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1,
                         logits_scaling=0.5),
                    ModelConfig.llama(**OURS_BASE, scales=dict(embedding=3.0, residual=0.5, logits=2.0),
                                      attention=dict(scale=0.1))),
    # Apertus: learned xIELU in a non-gated MLP, per-head q/k norms
    "apertus": Case("ApertusForCausalLM", "ApertusConfig",
                    dict(hidden_act="xielu", rope_parameters=dict(rope_type="default", rope_theta=1e4)),
                    ModelConfig.llama(**OURS_BASE, gated_mlp=False, activation="xielu", qk_norm="head",
                                      export_as="apertus")),
    # gpt-oss: sinks, every projection biased, a sliding and a full layer, biased experts with the clamped GLU
    "gpt_oss": Case("GptOssForCausalLM", "GptOssConfig",
                    dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8, swiglu_limit=1.5,
                         layer_types=["sliding_attention", "full_attention"],
                         rope_parameters=dict(rope_type="default", rope_theta=1e4)),
                    ModelConfig.llama(**OURS_BASE, use_bias=True, export_as="gpt_oss", sliding_window=8,
                                      layer_types=("sliding_attention", "full_attention"),
                                      attention=dict(sinks=True),
                                      moe=dict(n_experts=4, n_experts_per_token=2, swiglu_limit=1.5))),
    # GLM-4.5: the deepseek router over 8 experts in 4 groups (2 allowed), a shared expert, layer 0 dense
    "glm4_moe": Case("Glm4MoeForCausalLM", "Glm4MoeConfig",
                     dict(moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                          topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, n_shared_experts=1,
                          use_qk_norm=True, rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                                 partial_rotary_factor=0.5)),
                     ModelConfig.llama(**OURS_BASE, export_as="glm4_moe", qk_norm="head",
                                       rope=dict(partial_factor=0.5),
                                       moe=dict(n_experts=8, n_experts_per_token=2, d_ff=24, shared_d_ff=24,
                                                router="deepseek", n_group=4, topk_group=2,
                                                routed_scaling_factor=2.5, dense_layers=(0,)))),
    # DeepSeek-V3: latent attention (rank-20 queries, rank-24 latent, 6 of 16 q/k dims rotated in interleaved pairs,
    # 12-wide values), yarn with mscale_all_dim, the deepseek router over 2 of 4 groups, a shared expert, layer 0 dense
    "deepseek_v3": Case("DeepseekV3ForCausalLM", "DeepseekV3Config",
                        dict(num_key_value_heads=4, head_dim=None, q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=10,
                             qk_rope_head_dim=6, v_head_dim=12, attention_bias=True, moe_intermediate_size=24,
                             n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                             routed_scaling_factor=2.5, first_k_dense_replace=1, n_shared_experts=1,
                             rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, mscale=1.0,
                                                  mscale_all_dim=1.0, original_max_position_embeddings=16)),
                        ModelConfig.llama(**{**OURS_BASE, "n_kv_heads": 4}, export_as="deepseek_v3",
                                          rope=dict(scaling=dict(rope_type="yarn", factor=4.0, mscale=1.0,
                                                                 mscale_all_dim=1.0,
                                                                 original_max_position_embeddings=16)),
                                          latent=dict(kv_rank=24, q_rank=20, rope_dim=6, v_head_dim=12, bias=True),
                                          moe=dict(n_experts=8, n_experts_per_token=2, d_ff=24, shared_d_ff=24,
                                                   router="deepseek", n_group=4, topk_group=2,
                                                   routed_scaling_factor=2.5, dense_layers=(0,)))),
    # Gemma 4: per-layer inputs, layers 2-3 reusing layers 0-1's keys and values with double-wide MLPs, full layers
    # with 32-wide heads and proportional RoPE, value norms, scores scaled by 1, layer scalars
    "gemma4": Case("Gemma4ForCausalLM", "Gemma4TextConfig",
                   dict(num_hidden_layers=4, global_head_dim=32, sliding_window=8, hidden_size_per_layer_input=16,
                        vocab_size_per_layer_input=V, num_kv_shared_layers=2, use_double_wide_mlp=True,
                        final_logit_softcapping=30.0, tie_word_embeddings=True,
                        layer_types=["sliding_attention", "full_attention"] * 2),
                   ModelConfig.llama(**{**OURS_BASE, "n_layers": 4}, **GEMMA4, per_layer_dim=16, kv_shared_layers=2,
                                     double_wide_shared_mlp=True, layer_types=("sliding_attention", "full_attention") * 2,
                                     attention=dict(GEMMA4_ATTENTION, global_head_dim=32))),
    # Gemma 4 with experts beside every MLP (router on the normed, scaled input, per-expert scales); k = v full layer
    "gemma4_moe": Case("Gemma4ForCausalLM", "Gemma4TextConfig",
                       dict(global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
                            hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=4, top_k_experts=2,
                            moe_intermediate_size=24, final_logit_softcapping=30.0, tie_word_embeddings=True,
                            layer_types=["sliding_attention", "full_attention"]),
                       ModelConfig.llama(**OURS_BASE, **GEMMA4, layer_types=("sliding_attention", "full_attention"),
                                         attention=dict(GEMMA4_ATTENTION, global_head_dim=32, global_kv_heads=1,
                                                        k_eq_v=True),
                                         moe=dict(n_experts=4, n_experts_per_token=2, d_ff=24, router="gemma4",
                                                  aux_loss_coef=0.0))),
    # Gemma 3n: 3 AltUp streams (the second active), LAuReL, Gaussian top-k gates, per-layer inputs over a short
    # table, layers 2-3 reusing layers 0-1's keys and values
    "gemma3n": Case("Gemma3nForCausalLM", "Gemma3nTextConfig",
                    dict(num_hidden_layers=4, sliding_window=8, hidden_size_per_layer_input=16,
                         vocab_size_per_layer_input=90, num_kv_shared_layers=2, laurel_rank=8, altup_num_inputs=3,
                         altup_active_idx=1, activation_sparsity_pattern=[0.95, 0.5, 0.0, 0.0],
                         final_logit_softcapping=30.0, tie_word_embeddings=True,
                         rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                         layer_types=["sliding_attention", "full_attention"] * 2),
                    ModelConfig.llama(**{**OURS_BASE, "n_layers": 4}, **{**GEMMA4, "export_as": "gemma3n_text",
                                                                         "block": "gemma3n",
                                                                         "rope": dict(theta=1e6, local_theta=1e4)},
                                      per_layer_dim=16, per_layer_vocab_size=90, kv_shared_layers=2, laurel_rank=8,
                                      activation_sparsity=(0.95, 0.5, 0.0, 0.0), altup=dict(inputs=3, active_idx=1),
                                      layer_types=("sliding_attention", "full_attention") * 2,
                                      attention=GEMMA4_ATTENTION)),
    # MiniMax-M2: sigmoid + correction-bias routing without groups over every layer's experts, q/k norms over whole
    # projections, half of each head rotated
    "minimax_m2": Case("MiniMaxM2ForCausalLM", "MiniMaxM2Config",
                       dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, rotary_dim=8,
                            rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
                       ModelConfig.llama(**{**OURS_BASE, "d_ff": 24}, export_as="minimax_m2", qk_norm="proj",
                                         rope=dict(partial_factor=0.5),
                                         moe=dict(n_experts=4, n_experts_per_token=2, router="deepseek", n_group=1,
                                                  topk_group=1))),
    # Llama 4: chunks of 8 on RoPE layers, NoPE layer 3 with a query temperature, weightless q/k RMS norms, top-2
    # sigmoid routing onto the experts' inputs plus a shared expert on layers 1 and 3
    "llama4": Case("Llama4ForCausalLM", "Llama4TextConfig",
                   dict(num_hidden_layers=4, attention_chunk_size=8, num_local_experts=4, num_experts_per_tok=2,
                        interleave_moe_layer_step=2, intermediate_size=24, intermediate_size_mlp=64, floor_scale=4,
                        attn_scale=0.5, rope_parameters=dict(rope_type="default", rope_theta=1e4)),
                   ModelConfig.llama(**{**OURS_BASE, "n_layers": 4}, export_as="llama4_text",
                                     layer_types=("chunked_attention",) * 3 + ("full_attention",),
                                     rope=dict(theta=1e4, nope_layers=(3,)),
                                     attention=dict(qk_norm="rms", chunk_size=8, temperature_floor=4.0,
                                                    temperature_scale=0.5),
                                     moe=dict(n_experts=4, n_experts_per_token=2, d_ff=24, shared_d_ff=24,
                                              router="llama4", dense_layers=(0, 2)))),
    # LFM2: a short convolution (3 taps, biases) before an attention layer with per-head q/k norms; an MLP whose
    # width transformers derives (96 -> 2/3 -> a multiple of 32 = 64)
    "lfm2": Case("Lfm2ForCausalLM", "Lfm2Config",
                 dict(layer_types=["conv", "full_attention"], conv_bias=True, conv_L_cache=3, intermediate_size=96,
                      block_multiple_of=32, norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1e4)),
                 ModelConfig.llama(**OURS_BASE, export_as="lfm2", layer_types=("conv", "full_attention"),
                                   attention=dict(qk_norm="head"), conv=dict(kernel=3, bias=True),
                                   rope=dict(theta=1e4))),
    # Qwen3.5: a Gated DeltaNet layer (2 key heads, 4 value heads, 4 conv taps) before a gated full-attention layer
    # with per-head q/k norms and a quarter of each head rotated; (1 + w) norms
    "qwen3_5_text": Case("Qwen3_5ForCausalLM", "Qwen3_5TextConfig",
                         dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                              linear_value_head_dim=6, layer_types=["linear_attention", "full_attention"],
                              rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.25)),
                         ModelConfig.llama(**OURS_BASE, export_as="qwen3_5_text", norm_unit_offset=True,
                                           layer_types=("linear_attention", "full_attention"),
                                           attention=dict(qk_norm="head", output_gate=True),
                                           rope=dict(theta=1e4, partial_factor=0.25),
                                           linear=dict(key_heads=2, value_heads=4, key_head_dim=8, value_head_dim=6))),
    # Qwen3-Next: the same mixers from fused projections, experts beside a gated shared expert
    "qwen3_next": Case("Qwen3NextForCausalLM", "Qwen3NextConfig",
                       dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                            linear_value_head_dim=6, layer_types=["linear_attention", "full_attention"],
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                            shared_expert_intermediate_size=32, norm_topk_prob=True,
                            rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.25)),
                       ModelConfig.llama(**OURS_BASE, export_as="qwen3_next", norm_unit_offset=True,
                                         layer_types=("linear_attention", "full_attention"),
                                         attention=dict(qk_norm="head", output_gate=True),
                                         rope=dict(theta=1e4, partial_factor=0.25),
                                         linear=dict(key_heads=2, value_heads=4, key_head_dim=8, value_head_dim=6),
                                         moe=dict(n_experts=4, n_experts_per_token=2, d_ff=24, shared_d_ff=32,
                                                  shared_gate=True, router="qwen", norm_topk_prob=True))),
    "hunyuan_v1_dense": Case("HunYuanDenseV1ForCausalLM", "HunYuanDenseV1Config", dict(),
                             ModelConfig.llama(**OURS_BASE, export_as="hunyuan_v1_dense",
                                               attention=dict(qk_norm="head", qk_norm_after_rope=True))),
    # Cohere 2: parallel block, bias-free LayerNorm, RoPE (interleaved) on the sliding layer only, logit scale
    "cohere2": Case("Cohere2ForCausalLM", "Cohere2Config",
                    dict(sliding_window=8, logit_scale=0.5, layer_norm_eps=1e-6, tie_word_embeddings=True,
                         layer_types=["sliding_attention", "full_attention"], head_dim=None, hidden_size=64),
                    ModelConfig.llama(**{**OURS_BASE, "d_model": 64}, norm="layernorm_nobias", tie_embeddings=True,
                                      norm_placement="parallel", sliding_window=8, export_as="cohere2",
                                      layer_types=("sliding_attention", "full_attention"),
                                      rope=dict(nope_layers=[1]), scales=dict(logits=0.5))),
}


def hf_model(case: Case, seed: int, std: float = 0.2):
    """The transformers model of `case`, eager attention, matrices redrawn, 1-D weights moved off their init."""
    kwargs = {k: v for k, v in {**HF_BASE, **case.hf}.items() if v is not None}
    config = getattr(transformers, case.hf_config)(**kwargs)
    config._attn_implementation = "eager"
    model = getattr(transformers, case.hf_class)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.add_(0.1 * noise)  # norm scales (1, or 0 for Gemma's 1 + w) and biases (0)
            else:
                p.copy_(std * noise)
        for name, b in sorted(model.named_buffers()):  # the deepseek router's correction bias is a buffer there
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
            if name.endswith("layer_scalar"):  # Gemma 4's, a buffer too
                b.copy_(1.0 + 0.3 * torch.randn(b.shape, generator=gen))
    return model


# layouts beyond renaming (interleaved RoPE rows, GLM's norm names): the importer's own conversion, which the
# transformers comparison below then checks as much as torch_ref
CONVERTED = ("glm4", "cohere2", "hunyuan_v1_dense", "apertus", "gpt_oss", "glm4_moe", "gemma4_text", "gemma3n_text",
             "minimax_m2", "llama4_text", "deepseek_v3", "lfm2", "qwen3_next")


def hf_to_torch_ref(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face state dict -> torch_ref keys: drop "model.", split Phi-3's fused qkv_proj and gate_up_proj, name
    StarCoder2's c_fc / c_proj as up_proj / down_proj."""
    if cfg.export_as in CONVERTED:
        from jaxformer.interop.hf import FAMILIES

        sd = FAMILIES[cfg.export_as].from_hf({k: t.numpy() for k, t in hf_sd.items()}, cfg)
        return {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    out = {}
    for key, t in hf_sd.items():
        name = key.removeprefix("model.")
        if name.endswith("self_attn.qkv_proj.weight"):  # rows [q: N*H | k: K*H | v: K*H]
            q, k, v = t.split([cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim,
                               cfg.n_kv_heads * cfg.head_dim])
            prefix = name.removesuffix("qkv_proj.weight")
            out.update({f"{prefix}q_proj.weight": q, f"{prefix}k_proj.weight": k, f"{prefix}v_proj.weight": v})
        elif name.endswith("mlp.gate_up_proj.weight"):  # rows [gate: F | up: F]
            gate, up = t.chunk(2)
            prefix = name.removesuffix("gate_up_proj.weight")
            out.update({f"{prefix}gate_proj.weight": gate, f"{prefix}up_proj.weight": up})
        elif not (name == "lm_head.weight" and cfg.tie_embeddings):
            out[name.replace(".mlp.c_fc.", ".mlp.up_proj.").replace(".mlp.c_proj.", ".mlp.down_proj.")] = t
    return out


def ref_module(case: Case, hf) -> torch_ref.DecoderLM:
    module = torch_ref.module_class(case.ours)(case.ours).eval()
    module.load_state_dict(hf_to_torch_ref(hf.state_dict(), case.ours), strict=True)
    return module


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name):
    case = CASES[name]
    hf = hf_model(case, seed=1)
    module = ref_module(case, hf)
    rng = np.random.default_rng(2)
    for T in case.lengths:  # ascending: transformers' dynamic RoPE keeps state between calls
        tokens = torch.from_numpy(rng.integers(0, V, (B, T)))
        with torch.no_grad():
            ref = hf(input_ids=tokens).logits.float()
            got = module(tokens)
        assert ref.abs().max() > 1.0, "logits too small for a meaningful check"
        assert_hf_close(got, ref, f"logits T={T}")


def test_weight_names_are_transformers_names():
    """torch_ref's state_dict keys are the transformers keys minus "model." (Phi-3 after its split)."""
    for name in ("gemma2", "gemma3_text", "olmo2", "qwen2", "phi3_longrope"):
        case = CASES[name]
        hf = hf_model(case, seed=3)
        assert set(torch_ref.DecoderLM(case.ours).state_dict()) == set(hf_to_torch_ref(hf.state_dict(), case.ours))
    keys = set(torch_ref.DecoderLM(CASES["gemma3_text"].ours).state_dict())
    assert {"layers.0.self_attn.q_norm.weight", "layers.0.pre_feedforward_layernorm.weight",
            "layers.0.post_feedforward_layernorm.weight", "norm.weight"} <= keys
    assert "layers.0.input_layernorm.weight" not in set(torch_ref.DecoderLM(CASES["olmo2"].ours).state_dict())
    qwen2 = torch_ref.DecoderLM(CASES["qwen2"].ours).state_dict()
    assert "layers.0.self_attn.q_proj.bias" in qwen2 and "layers.0.self_attn.o_proj.bias" not in qwen2


@pytest.mark.parametrize("name", ["llama_dynamic", "phi3_longrope"])
def test_length_dependent_rope_switches(name):
    """The long-context regime really differs from the short one (else the two-length test proves little)."""
    cfg = CASES[name].ours
    short, long = (rope_inv_freq(cfg.head_dim, cfg.rope.theta, cfg.rope.scaling, cfg.max_seq_len, T)[0]
                   for T in CASES[name].lengths)
    assert (short - long).abs().max() > 1e-3 * short.abs().max()
