"""Hugging Face import and export for every open family, against transformers itself.

Each case builds a random-init transformers model from its config class (no download), moves its 1-D weights
(norms, biases) away from their init values, saves it (sharded for one case), loads it with
`jaxformer.load_hf`, and compares logits on a prompt longer than any sliding window; then `save_hf` writes it
back and `AutoModelForCausalLM.from_pretrained` must give the same logits.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxformer.interop import UnsupportedCheckpointError, load_hf, save_hf  # noqa: E402
from parity_tests.conftest import hf_tol  # noqa: E402

T = 320  # tokens per prompt: past every window below, and past the RoPE scalings' original contexts
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
SHORT = [1.0 + 0.05 * i for i in range(8)]  # longrope factors for head_dim 16
LONG = [1.0 + 0.5 * i for i in range(8)]

CASES = {
    "llama3": ("LlamaConfig", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=64))),
    "llama_yarn": ("LlamaConfig", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                            original_max_position_embeddings=128))),
    "llama_linear_bias": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                   factor=2.0), attention_bias=True, mlp_bias=True)),
    "llama_dynamic": ("LlamaConfig", dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "mistral": ("MistralConfig", dict(sliding_window=48, head_dim=24)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=40, max_window_layers=1,
                                  tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "gemma": ("GemmaConfig", dict(head_dim=32, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh",
                                  tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(head_dim=32, sliding_window=40, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0, num_hidden_layers=4)),
    # every layer full although sliding_window is set: the window must not apply anywhere (found by
    # bench/hf_families_sweep.py), and the export must still give transformers a window to build its mask with
    "gemma2_all_full": ("Gemma2Config", dict(head_dim=32, sliding_window=40, num_hidden_layers=2,
                                             layer_types=["full_attention", "full_attention"])),
    "gemma3": ("Gemma3TextConfig", dict(
        head_dim=32, sliding_window=40, query_pre_attn_scalar=24, num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, sliding_window=200, original_max_position_embeddings=128,
                                rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=SHORT,
                                                     long_factor=LONG, original_max_position_embeddings=128))),
    "olmo2": ("Olmo2Config", dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # issue 28's families: each a Llama with a twist or two
    "olmo3": ("Olmo3Config", dict(sliding_window=40, layer_types=["sliding_attention", "full_attention",
                                                                  "sliding_attention"],
                                  rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0,
                                                                          rope_theta=1e4),
                                                   "sliding_attention": dict(rope_type="default", rope_theta=5e4)})),
    "smollm3": ("SmolLM3Config", dict(use_sliding_window=True, sliding_window=40, no_rope_layers=[1, 0, 1],
                                      layer_types=["full_attention", "sliding_attention", "full_attention"],
                                      tie_word_embeddings=True)),
    "exaone4": ("Exaone4Config", dict(sliding_window=40, sliding_window_pattern=2)),  # full layer 1 has no RoPE
    "arcee": ("ArceeConfig", dict(head_dim=16)),  # up -> relu^2 -> down
    "helium": ("HeliumConfig", dict(head_dim=16, attention_bias=True)),  # interleaved RoPE, q/k/v biases
    "ernie4_5": ("Ernie4_5Config", dict(head_dim=16, use_bias=True)),  # interleaved RoPE, every bias
    "seed_oss": ("SeedOssConfig", dict(head_dim=16)),  # q/k/v biases (attention_bias), none on o or the MLP
    "starcoder2": ("Starcoder2Config", dict(sliding_window=40, use_bias=True)),  # LayerNorm, GELU c_fc / c_proj
    # four norms a block, interleaved RoPE on half of each head, fused gate_up_proj, q/k/v biases
    "glm4": ("Glm4Config", dict(head_dim=16, partial_rotary_factor=0.5, attention_bias=True)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1,
                                      logits_scaling=0.5)),  # muP multipliers
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", dict(head_dim=16, rope_parameters=dict(
        rope_type="dynamic", alpha=50.0, rope_theta=10000.0, factor=1.0))),  # q/k norms after RoPE; NTK alpha
    # parallel block, bias-free LayerNorm, interleaved RoPE on sliding layers only, logit_scale
    "cohere2": ("Cohere2Config", dict(sliding_window=40, logit_scale=0.5,
                                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "phi3_partial": ("Phi3Config", dict(num_key_value_heads=4, partial_rotary_factor=0.5)),
    # attention sinks, biases everywhere, alternating 40-token windows, yarn, biased experts with the clamped GLU
    # (limit 1.5 so the clamp binds on these random weights)
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=40,
                                     swiglu_limit=1.5, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                                                            original_max_position_embeddings=128,
                                                                            truncate=False))),
    # GLM-4.5: the deepseek router (sigmoid, correction bias, 2 of 4 groups, scaled), a shared expert, the first
    # layer dense, half of each head rotated, q/k norms and q/k/v biases
    "glm4_moe": ("Glm4MoeConfig", dict(head_dim=16, moe_intermediate_size=24, n_routed_experts=8,
                                       num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                       first_k_dense_replace=1, n_shared_experts=1, use_qk_norm=True,
                                       attention_bias=True, rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                                                 partial_rotary_factor=0.5))),
    "apertus": ("ApertusConfig", dict(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=1e4))),  # xIELU
    # Gemma 4 (E2B-like): per-layer inputs, the last 2 layers reusing keys/values with double-wide MLPs, full layers
    # with 32-wide heads and proportional RoPE on a quarter of their pairs, value norms, scores scaled by 1
    "gemma4": ("Gemma4TextConfig", dict(
        head_dim=16, global_head_dim=32, num_hidden_layers=4, sliding_window=40, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=128, num_kv_shared_layers=2, use_double_wide_mlp=True, initializer_range=0.05,
        final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention"] * 2)),
    # Gemma 4 (26B-A4B-like): experts beside every MLP, full layers with k = v and one kv head
    "gemma4_moe": ("Gemma4TextConfig", dict(
        head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=40,
        hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24,
        final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention", "full_attention"])),
    # MiniMax-M2: sigmoid scores + correction bias choose 2 of 8 experts on every layer (no groups, no shared expert),
    # q/k RMSNorm over whole projections, RoPE on the first half of each head (the released `rotary_dim` spelling)
    "minimax_m2": ("MiniMaxM2Config", dict(head_dim=16, num_local_experts=8, num_experts_per_tok=2, rotary_dim=8,
                                           intermediate_size=32)),
    # Llama 4: 40-token chunks on RoPE layers (interleaved pairs), NoPE layer 3 with the attention temperature (floor 16
    # so it grows within 320 tokens), weightless q/k RMS norms, top-1 sigmoid routing onto the experts' inputs with a
    # shared expert on layers 1 and 3, llama3 RoPE scaling
    "llama4": ("Llama4TextConfig", dict(
        head_dim=16, num_hidden_layers=4, attention_chunk_size=40, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, intermediate_size=32, intermediate_size_mlp=96, floor_scale=16, attn_scale=0.5,
        rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64))),
    # DeepSeek-V3: latent attention (rank-24 queries, rank-32 latent, 8 interleaved rope dims of 24, 12-wide values),
    # yarn whose mscale_all_dim scales the softmax too, the deepseek router over 2 of 4 groups with a shared expert,
    # the first layer dense, biases on q_a / kv_a / o
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, n_shared_experts=1, attention_bias=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, mscale=1.0, mscale_all_dim=1.0,
                             original_max_position_embeddings=128, beta_fast=32.0, beta_slow=1.0))),
    # DeepSeek-V2-Lite-like attention (one q_proj, no q bottleneck), no groups (Kimi-K2's routing), no shared expert
    # (transformers keeps a 0-wide one: found by bench/hf_families_sweep.py)
    "deepseek_v3_plain_q": ("DeepseekV3Config", dict(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=16, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, routed_scaling_factor=2.827, first_k_dense_replace=1, n_shared_experts=0)),
    # LFM2: gated short convolutions (3 taps, biased) around two attention layers with per-head q/k norms;
    # intermediate_size shrunk to 2/3 and rounded up to a multiple of 32
    "lfm2": ("Lfm2Config", dict(num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "full_attention"],
                                conv_bias=True, conv_L_cache=3, block_multiple_of=32, norm_eps=1e-5,
                                rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    # Qwen3.5: Gated DeltaNet layers (2 key heads of 16, 4 value heads of 12, 4 conv taps) and a gated full-attention
    # layer (q/k norms, a quarter of each head rotated), (1 + w) norms. Weights of std 0.05: at 0.1 the decays reach
    # e^-60 a token and both float32 implementations sit ~3e-5 from transformers' float64 (ours 3.1e-5, its 3.8e-5)
    "qwen3_5_text": ("Qwen3_5TextConfig", dict(
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=12, initializer_range=0.05,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.25))),
    # Qwen3-Next: the fused DeltaNet projections, experts with a gated shared expert, one dense layer
    "qwen3_next": ("Qwen3NextConfig", dict(
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=12, initializer_range=0.05,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32,
        mlp_only_layers=[2], norm_topk_prob=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5))),
    # Qwen3.5-MoE: every layer sparse, the same mixers
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", dict(
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=12, initializer_range=0.05,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32,
        rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.25))),
    # Gemma 3n: 4 AltUp streams, LAuReL, Gaussian top-k gates on two layers, per-layer inputs over a table shorter
    # than the vocabulary, the last 2 layers reusing keys/values
    "gemma3n": ("Gemma3nTextConfig", dict(
        head_dim=16, num_hidden_layers=4, sliding_window=40, hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=100, num_kv_shared_layers=2, laurel_rank=8, altup_num_inputs=4,
        activation_sparsity_pattern=[0.95, 0.6, 0.0, 0.0], initializer_range=0.05,
        layer_types=["sliding_attention", "full_attention"] * 2)),
}


def _hf_model(name: str, seed: int = 0):
    cls_name, extra = CASES[name]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # 1-D weights (and gpt-oss's stacked expert biases) away from their init (ones / zeros),
        for name, p in model.named_parameters():  # so a swapped norm or bias would show
            if p.ndim == 1 or name.endswith("_bias"):
                p.add_(0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():  # the deepseek router's correction bias, Gemma 4's layer scalars
            if name.endswith(("e_score_correction_bias", "layer_scalar")):  # (buffers in transformers)
                b.add_(0.3 * torch.randn_like(b))
    return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def _tokens(n: int, seed: int, length: int = T) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, COMMON["vocab_size"], (2, length)).astype(np.int64)


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_and_export_match_transformers(name, tmp_path):
    hf_model = _hf_model(name)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="100KB" if name == "qwen2" else "5GB")
    if name == "qwen2":
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    overrides = {"max_seq_len": 512} if name == "llama_dynamic" else {}
    model = load_hf(tmp_path / "hf", **overrides)
    # Phi-3: long factors past 128 tokens, short ones below; Gated DeltaNet layers: a length their 64-token chunks
    # do not divide (320 does)
    lengths = {"phi3": (T, 100), "qwen3_5_text": (T, 301), "qwen3_5_moe_text": (301,), "qwen3_next": (301,)}.get(
        name, (T,))
    for i, length in enumerate(lengths):
        tokens = _tokens(2, seed=i, length=length)
        ref = _hf_logits(hf_model, tokens)
        ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
        assert np.abs(ref).max() > 1.0, "logits too small to prove anything"
        assert np.abs(ours - ref).max() <= 1e-4, f"{name}: import max|diff| {np.abs(ours - ref).max():.2e}"
        print(f"{name} T={length}: import max|diff| {np.abs(ours - ref).max():.1e} (max|logit| {np.abs(ref).max():.1f})")

    if name == "llama_dynamic":  # transformers' dynamic NTK grows past max_position_embeddings: export at 128
        model = load_hf(tmp_path / "hf")
        tokens = _tokens(2, seed=5, length=128)
        ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    save_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back).__name__ == type(hf_model).__name__
    export_diff = np.abs(_hf_logits(back, np.asarray(tokens)) - ours).max()
    print(f"{name}: export max|diff| {export_diff:.1e}")
    assert export_diff <= 1e-4


def test_exported_configs_read_back_as_the_same_architecture(tmp_path):
    """A family's export of every case reads back to the config it came from, field by field."""
    for name in ("gemma3", "phi3", "qwen2"):
        _hf_model(name).save_pretrained(tmp_path / name)
        model = load_hf(tmp_path / name)
        save_hf(model, tmp_path / f"{name}_out")
        again = load_hf(tmp_path / f"{name}_out")
        assert again.config.architecture() == model.config.architecture()


def test_options_that_do_not_map_are_named(tmp_path):
    cfg = transformers.Qwen3Config(**{**COMMON, "attention_bias": True})
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "q3")
    with pytest.raises(UnsupportedCheckpointError, match="attention_bias=True"):
        load_hf(tmp_path / "q3")
    cfg = transformers.Cohere2Config(**{**COMMON, "attention_bias": True})
    transformers.Cohere2ForCausalLM(cfg).save_pretrained(tmp_path / "cohere2")
    with pytest.raises(UnsupportedCheckpointError, match="attention_bias=True"):
        load_hf(tmp_path / "cohere2")
    cfg = transformers.LlamaConfig(**{**COMMON, "partial_rotary_factor": 0.5})  # Llama's own code rotates whole heads
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedCheckpointError, match="partial_rotary_factor=0.5"):
        load_hf(tmp_path / "llama")
    # an export that would lose a field names it
    model = load_hf(_saved(tmp_path, "gemma2"))
    model.config = model.config.replace(export_as="llama")
    with pytest.raises(UnsupportedCheckpointError, match="norm_unit_offset=True"):
        save_hf(model, tmp_path / "as_llama")


def _saved(tmp_path, name):
    _hf_model(name).save_pretrained(tmp_path / name)
    return tmp_path / name


def test_olmo3_config_in_the_older_flat_rope_format(tmp_path):
    """OLMo 3 config.json with one rope_theta + rope_scaling (the older spelling): transformers scales the full
    layers only and gives sliding layers the plain RoPE of its default base (500000); so must the importer."""
    import json

    hf_model = _hf_model("olmo3")
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=1e4, rope_scaling=dict(rope_type="linear", factor=2.0))
    (tmp_path / "config.json").write_text(json.dumps(config))
    reread = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert reread.config.rope_parameters["sliding_attention"]["rope_type"] == "default"
    model = load_hf(tmp_path)
    assert reread.config.rope_parameters["sliding_attention"]["rope_theta"] == 500000.0
    assert model.config.rope.local_theta == 500000.0 and model.config.rope.scaling.rope_type == "linear"
    tokens = _tokens(2, seed=3)
    ref = _hf_logits(reread, tokens)
    assert np.abs(np.asarray(model(jnp.asarray(tokens, jnp.int32))) - ref).max() <= 1e-4


def test_gpt_oss_mxfp4_experts_import_as_transformers_dequantizes_them(tmp_path):
    """gpt-oss as published: expert matrices in MXFP4 (`<proj>_blocks` [E, R, G, 16] bytes, `<proj>_scales`
    [E, R, G] exponents) and a quantization_config. Random codes and scales are written in that layout;
    transformers' own dequantizer (integrations/mxfp4.py) gives the dense weights of the reference model, and
    jaxformer's import of the MXFP4 directory must give its logits."""
    import json

    from safetensors.numpy import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from jaxformer.interop.gpt_oss import dequantize_mxfp4

    hf_model = _hf_model("gpt_oss")
    rng = np.random.default_rng(9)
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(hf_model.model.layers):
            for name in ("gate_up_proj", "down_proj"):
                dense = getattr(layer.mlp.experts, name)  # [E, in, out]
                E, n_in, n_out = dense.shape
                blocks = rng.integers(0, 256, (E, n_out, n_in // 32, 16), dtype=np.uint8)
                scales = rng.integers(124, 128, (E, n_out, n_in // 32), dtype=np.uint8)  # 2^-3 .. 2^0
                ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                 dtype=torch.float32)
                assert ref.shape == dense.shape
                np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales), ref.numpy())  # exact: both float32
                dense.copy_(ref)
                packed[f"model.layers.{i}.mlp.experts.{name}_blocks"] = blocks
                packed[f"model.layers.{i}.mlp.experts.{name}_scales"] = scales
    hf_model.save_pretrained(tmp_path)
    weights = {k: v for k, v in load_file(str(tmp_path / "model.safetensors")).items()
               if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    save_file({**weights, **packed}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                        "model.embed_tokens", "lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_hf(tmp_path)
    tokens = _tokens(2, seed=4)
    ref = _hf_logits(hf_model, tokens)
    assert np.abs(np.asarray(model(jnp.asarray(tokens, jnp.int32))) - ref).max() <= hf_tol(np.abs(ref).max())
    config["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpointError, match="quant_method='fp8'"):
        load_hf(tmp_path)


def test_gemma4_published_layout(tmp_path):
    """The published Gemma 4 checkpoints are Gemma4ForConditionalGeneration: config.json's text_config (with
    global_head_dim / num_global_key_value_heads, not transformers 5's per_layer_config) and the text weights under
    model.language_model. beside the vision and audio towers; the importer takes the text model, and refuses the
    options it cannot express by name."""
    import json

    from safetensors.numpy import load_file, save_file

    hf_model = _hf_model("gemma4_moe")
    hf_model.save_pretrained(tmp_path / "text")
    text = json.loads((tmp_path / "text" / "config.json").read_text())
    text.pop("per_layer_config")
    text.update(global_head_dim=32, num_global_key_value_heads=1)
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "config.json").write_text(json.dumps({
        "model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": text,
        "vision_config": {"hidden_size": 8}, "tie_word_embeddings": text["tie_word_embeddings"]}))  # the top decides
    weights = {k.replace("model.", "model.language_model.", 1): v
               for k, v in load_file(tmp_path / "text" / "model.safetensors").items()}
    weights["model.vision_tower.patch_embedder.weight"] = np.ones((8, 4), np.float32)
    save_file(weights, tmp_path / "mm" / "model.safetensors")
    model = load_hf(tmp_path / "mm")
    assert model.config.export_as == "gemma4_text" and model.config.attention.global_kv_heads == 1
    tokens = _tokens(2, seed=3)
    diff = np.abs(np.asarray(model(jnp.asarray(tokens, jnp.int32))) - _hf_logits(hf_model, tokens)).max()
    assert diff <= 1e-4, diff

    for change, named in ((dict(use_bidirectional_attention="all"), "use_bidirectional_attention='all'"),
                          (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e6},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
                           "rope_type='yarn'")):
        (tmp_path / "text" / "config.json").write_text(json.dumps({**text, **change}))
        with pytest.raises(UnsupportedCheckpointError, match=named):
            load_hf(tmp_path / "text")


def test_gemma4_empty_per_layer_config_means_no_override():
    """transformers 5 writes per_layer_config without the entries equal to the base config: full layers whose head
    sizes equal the sliding ones' save `{}`, which means "no override", not Gemma4TextConfig's default 512 (found by
    bench/hf_families_sweep.py)."""
    from jaxformer.interop.hf import config_from_hf

    written = transformers.Gemma4TextConfig(**{**COMMON, "head_dim": 16, "global_head_dim": 16,
                                               "layer_types": ["sliding_attention", "full_attention"],
                                               "num_hidden_layers": 2}).to_dict()
    assert written["per_layer_config"] == {}
    cfg = config_from_hf(written)
    assert [cfg.layer_head_dim(i) for i in range(2)] == [16, 16]
    wider = transformers.Gemma4TextConfig(**{**COMMON, "head_dim": 16, "global_head_dim": 24, "num_hidden_layers": 2,
                                             "layer_types": ["sliding_attention", "full_attention"]}).to_dict()
    assert [config_from_hf(wider).layer_head_dim(i) for i in range(2)] == [16, 24]


def test_gemma3n_published_layout(tmp_path):
    """Gemma 3n's published checkpoints: Gemma3nForConditionalGeneration with the text model's weights under
    model.language_model. and a text_config in the older RoPE spelling (rope_theta, rope_local_base_freq)."""
    import json

    from safetensors.numpy import load_file, save_file

    hf_model = _hf_model("gemma3n")
    hf_model.save_pretrained(tmp_path / "text")
    text = json.loads((tmp_path / "text" / "config.json").read_text())
    rope = text.pop("rope_parameters")
    text.update(rope_theta=rope["full_attention"]["rope_theta"],
                rope_local_base_freq=rope["sliding_attention"]["rope_theta"], rope_scaling=None)
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "config.json").write_text(json.dumps({
        "model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"], "text_config": text,
        "audio_config": {"hidden_size": 8}, "tie_word_embeddings": text["tie_word_embeddings"]}))
    weights = {k.replace("model.", "model.language_model.", 1): v
               for k, v in load_file(tmp_path / "text" / "model.safetensors").items()}
    weights["model.audio_tower.conformer.0.weight"] = np.ones((4,), np.float32)
    save_file(weights, tmp_path / "mm" / "model.safetensors")
    model = load_hf(tmp_path / "mm")
    assert model.config.export_as == "gemma3n_text" and model.config.altup.inputs == 4
    tokens = _tokens(2, seed=3)
    diff = np.abs(np.asarray(model(jnp.asarray(tokens, jnp.int32))) - _hf_logits(hf_model, tokens)).max()
    assert diff <= 1e-4, diff
    (tmp_path / "text" / "config.json").write_text(json.dumps({**text, "intermediate_size": [96, 96, 96, 64]}))
    with pytest.raises(UnsupportedCheckpointError, match="one MLP width for every layer"):
        load_hf(tmp_path / "text")


def test_fp8_block_scaled_checkpoint(tmp_path):
    """DeepSeek-V3 / MiniMax-M2 ship block-scaled fp8 (`quant_method: fp8`, weight_block_size): every matrix stored as
    float8_e4m3fn beside a float32 weight_scale_inv per block. Written here with torch's float8 (blocks of 8 x 8, sizes
    the blocks do not divide), imported, the weights equal torch's W.float() * scale per block, and the logits equal
    transformers' on those dequantized weights."""
    import json

    from safetensors.torch import load_file, save_file

    hf_model = _hf_model("minimax_m2")
    hf_model.save_pretrained(tmp_path / "float")
    sd = load_file(tmp_path / "float" / "model.safetensors")
    block = 8
    quantized, dequantized = {}, {}
    for k, w in sd.items():
        if w.ndim != 2 or "embed_tokens" in k or "lm_head" in k or ".gate." in k:  # as the releases: embeddings,
            quantized[k] = dequantized[k] = w  # head and router stay float
            continue
        O, I = w.shape
        blocks = torch.nn.functional.pad(w, (0, -I % block, 0, -O % block)).reshape(-(-O // block), block,
                                                                                    -(-I // block), block)
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # [O/b, I/b]
        full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:O, :I]
        w8 = (w / full).to(torch.float8_e4m3fn)
        quantized[k], quantized[k + "_scale_inv"] = w8, scale
        dequantized[k] = w8.float() * full
    (tmp_path / "fp8").mkdir()
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    save_file(quantized, tmp_path / "fp8" / "model.safetensors")
    model = load_hf(tmp_path / "fp8")
    (tmp_path / "dequantized").mkdir()  # transformers on the same dequantized weights, from a float checkpoint
    (tmp_path / "dequantized" / "config.json").write_text((tmp_path / "float" / "config.json").read_text())
    save_file(dequantized, tmp_path / "dequantized" / "model.safetensors", metadata={"format": "pt"})
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized",
                                                                  attn_implementation="eager").eval()
    tokens = _tokens(2, seed=4)
    diff = np.abs(np.asarray(model(jnp.asarray(tokens, jnp.int32))) - _hf_logits(reference, tokens)).max()
    assert diff <= 1e-4, diff
    from jaxformer.interop import to_numpy_state_dict

    ours = to_numpy_state_dict(model)
    np.testing.assert_array_equal(ours["layers.0.self_attn.q_proj.weight"],
                                  dequantized["model.layers.0.self_attn.q_proj.weight"].numpy())
    assert not np.array_equal(dequantized["model.layers.0.self_attn.q_proj.weight"].numpy(),
                              sd["model.layers.0.self_attn.q_proj.weight"].numpy())  # fp8 rounding did happen
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpointError, match="quant_method='awq' is not supported"):
        load_hf(tmp_path / "fp8")
