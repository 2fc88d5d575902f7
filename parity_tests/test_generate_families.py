"""The KV-cache engine past a sliding window: greedy continuations token-identical to transformers' generate.

Prompts are longer than the window, so every decode step attends through a cache in which old keys must be
masked; Gemma 2 adds soft-caps and alternating local/global layers, Gemma 3 a second RoPE base, Phi-3
crosses its original context mid-generation (longrope switches to its long factors, as transformers does);
SmolLM3, Cohere 2 and EXAONE 4 mix layers with and without RoPE, GLM-4 rotates half of each head; DeepSeek-V3
decodes from a cache of latents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxformer
from jaxformer.infer import Engine, SamplingParams, generate
from parity_tests.conftest import quiet_transformers, randomize_torch

quiet_transformers()
import transformers  # noqa: E402

V, PROMPT, NEW = 97, 40, 24
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
CASES = {
    "mistral": ("MistralConfig", dict(sliding_window=16)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=12, query_pre_attn_scalar=12,
                                    attn_logit_softcapping=20.0, final_logit_softcapping=15.0)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=12, num_hidden_layers=3,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, original_max_position_embeddings=48, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + 0.1 * i for i in range(4)],
        long_factor=[1.0 + 2.0 * i for i in range(4)], original_max_position_embeddings=48))),
    # a NoPE layer that slides and a RoPE layer that does not
    "smollm3": ("SmolLM3Config", dict(use_sliding_window=True, sliding_window=12, no_rope_layers=[1, 0],
                                      layer_types=["full_attention", "sliding_attention"],
                                      rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # parallel blocks, interleaved RoPE on the sliding layers, NoPE full layers, scaled logits
    "cohere2": ("Cohere2Config", dict(sliding_window=12, num_hidden_layers=3, logit_scale=2.0,
                                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # GLM-4: half of each head rotated (interleaved); EXAONE 4: post-norms, NoPE full layers
    "glm4": ("Glm4Config", dict(head_dim=8, partial_rotary_factor=0.5, attention_bias=True)),
    "exaone4": ("Exaone4Config", dict(sliding_window=12, sliding_window_pattern=2, num_hidden_layers=3)),
    # gpt-oss: sinks in every cached softmax, alternating windows, biased experts with the clamped GLU
    "glm4_moe": ("Glm4MoeConfig", dict(head_dim=8, moe_intermediate_size=24, n_routed_experts=8,
                                       num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=1.0,
                                       first_k_dense_replace=1, n_shared_experts=1,
                                       rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                            partial_rotary_factor=0.5))),
    "gpt_oss": ("GptOssConfig", dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=12,
                                     swiglu_limit=2.0, rope_parameters=dict(rope_type="default", rope_theta=1e4))),
    # Gemma 4: the last two layers decode from the first two's caches (kv sharing), per-layer inputs, wider full
    # layers with proportional RoPE; and experts beside every MLP with k = v full layers
    "gemma4": ("Gemma4TextConfig", dict(head_dim=8, global_head_dim=16, num_hidden_layers=4, sliding_window=12,
                                        hidden_size_per_layer_input=4, vocab_size_per_layer_input=V,
                                        num_kv_shared_layers=2, use_double_wide_mlp=True, final_logit_softcapping=30.0,
                                        layer_types=["sliding_attention", "full_attention"] * 2)),
    # Gemma 3n: AltUp streams through the cache, LAuReL, sparse gates, per-layer inputs, kv-shared last layers
    "gemma3n": ("Gemma3nTextConfig", dict(head_dim=8, num_hidden_layers=4, sliding_window=12,
                                          hidden_size_per_layer_input=8, vocab_size_per_layer_input=90,
                                          num_kv_shared_layers=2, laurel_rank=4, altup_num_inputs=3,
                                          activation_sparsity_pattern=[0.9, 0.0, 0.0, 0.0],
                                          layer_types=["sliding_attention", "full_attention"] * 2)),
    # Llama 4: 12-token chunks (prompt and continuation cross several), a NoPE layer with the query temperature
    # (floor 8), weightless q/k norms, top-1 routing onto the experts' inputs with a shared expert
    "llama4": ("Llama4TextConfig", dict(head_dim=8, num_hidden_layers=4, attention_chunk_size=12, num_local_experts=4,
                                        num_experts_per_tok=1, interleave_moe_layer_step=2, intermediate_size=32,
                                        intermediate_size_mlp=64, floor_scale=8, attn_scale=0.5,
                                        rope_parameters=dict(rope_type="default", rope_theta=1e4))),
    # DeepSeek-V3: latent attention decoded in its absorbed form from a cache of latents (prefill and every step),
    # yarn with mscale_all_dim, grouped sigmoid routing with a shared expert
    "deepseek_v3": ("DeepseekV3Config", dict(q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                             v_head_dim=12, num_key_value_heads=4, moe_intermediate_size=24,
                                             n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                             routed_scaling_factor=2.5, first_k_dense_replace=1, n_shared_experts=1,
                                             rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                                                  mscale=1.0, mscale_all_dim=1.0,
                                                                  original_max_position_embeddings=32))),
    "gemma4_moe": ("Gemma4TextConfig", dict(head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
                                            attention_k_eq_v=True, sliding_window=12, hidden_size_per_layer_input=0,
                                            enable_moe_block=True, num_experts=4, top_k_experts=2,
                                            moe_intermediate_size=16, final_logit_softcapping=30.0, num_hidden_layers=3,
                                            layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    # hybrids: decoding carries each Gated DeltaNet layer's conv tail and delta-rule matrix (Qwen3.5, Qwen3-Next with
    # experts) or each short convolution's tail (LFM2) from the prefill through every step, beside attention caches
    "qwen3_5_text": ("Qwen3_5TextConfig", dict(head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                                               linear_key_head_dim=8, linear_value_head_dim=8, num_hidden_layers=3,
                                               layer_types=["linear_attention", "full_attention", "linear_attention"],
                                               rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                                    partial_rotary_factor=0.5))),
    "qwen3_next": ("Qwen3NextConfig", dict(head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                                           linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4,
                                           num_experts_per_tok=2, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=16,
                                           layer_types=["linear_attention", "full_attention"],
                                           rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                                partial_rotary_factor=0.5))),
    "lfm2": ("Lfm2Config", dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], conv_bias=True,
                                block_multiple_of=16, rope_parameters=dict(rope_type="default", rope_theta=1e4))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_greedy_generation_matches_transformers(name, tmp_path):
    cls_name, extra = CASES[name]
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**{**BASE, **extra}),
                                                       attn_implementation="eager")
    hf = randomize_torch(hf.eval(), seed=21, std=0.5)
    hf.generation_config.eos_token_id = None  # exactly NEW tokens
    hf.save_pretrained(tmp_path)
    prompt = np.random.default_rng(22).integers(3, V, (1, PROMPT))
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(prompt), do_sample=False, max_new_tokens=NEW, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    hf_new = ref.sequences[0, PROMPT:].numpy()
    steps = torch.stack(ref.logits, 1)[0].float().numpy()
    top2 = np.sort(steps, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, "near-tie in the reference: pick another seed"
    assert len(set(hf_new.tolist())) > 3, "degenerate continuation: the test would be weak"

    model = jaxformer.load_hf(tmp_path)
    engine = Engine(model, max_batch=2, max_len=PROMPT + NEW + 8)
    # a second, shorter prompt in the same batch: per-row cache lengths differ
    (seq, _) = generate(engine, [prompt[0].tolist(), prompt[0, :9].tolist()],
                        SamplingParams(max_new_tokens=NEW, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(seq.tokens), hf_new)


@pytest.mark.parametrize("name", ["qwen3_5_text", "lfm2"])
def test_hybrid_paged_generation_matches_transformers(name, tmp_path):
    """The paged engine on a hybrid model: three prompts of different lengths batched continuously, prefilled 7
    tokens a chunk (each chunk continuing the rows' recurrent states, its padding moving none), with a pool small
    enough that a row is preempted and re-prefilled; every row token-identical to transformers' generate."""
    from jaxformer.infer.paged_engine import PagedEngine

    cls_name, extra = CASES[name]
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**{**BASE, **extra}),
                                                       attn_implementation="eager")
    hf = randomize_torch(hf.eval(), seed=23, std=0.5)
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(tmp_path)
    rng = np.random.default_rng(24)
    prompts = [rng.integers(3, V, n).tolist() for n in (PROMPT, 17, 29)]
    refs = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW, pad_token_id=0)
            refs.append(out[0, len(p):].numpy())
    model = jaxformer.load_hf(tmp_path)
    engine = PagedEngine(model, max_batch=3, max_len=PROMPT + NEW + 8, page_size=4, num_pages=30)
    assert not engine.prefix_cache, "a prefix's pages hold no recurrent state: hybrids prefill every prompt"
    seqs = generate(engine, prompts, SamplingParams(max_new_tokens=NEW, temperature=0.0), chunk=7)
    for seq, ref in zip(seqs, refs):
        np.testing.assert_array_equal(np.asarray(seq.tokens), ref)
    assert sum(s.preemptions for s in seqs) > 0, "the pool was meant to force a preemption"
