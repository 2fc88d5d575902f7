"""Every open family's fields train through `jaxformer train`: the loss falls and the checkpoint reloads.

Four "maximal" configs cover the families' distinctive fields in as few runs as possible (docs/models.md):
  gemma3   sandwich norms with (1 + w) scaling, per-head q/k norm, a sliding and a full layer with a local RoPE
           base, embedding scale, query_pre_attn_scalar, attention and final soft-caps, tied head (Gemma 2 and 3)
  olmo2    norms after each sub-layer, q/k norm over whole projections, yarn RoPE
  qwen2    q/k/v biases (Qwen2), longrope past its original context (Phi-3), a window on every layer (Mistral)
  cohere2  a parallel block on a bias-free LayerNorm, RoPE on the sliding layer only, scaled logits (Cohere 2)
  granite  muP multipliers and an explicit attention scale (Granite), half of each head rotated (GLM), per-head q/k
           norms after RoPE (Hunyuan), the learned xIELU activation in a non-gated MLP (Apertus)
  gemma4   Gemma 4's block: per-layer inputs, kv-shared layers with double-wide MLPs, wider k = v full layers with
           proportional RoPE, value norms, experts beside every MLP (with their load-balancing loss), remat
  llama4   chunked attention on RoPE layers, a NoPE layer with the query temperature, weightless q/k norms, top-1
           sigmoid routing onto the experts' inputs with a shared expert on every other layer, scan_layers
  gemma3n  Gemma 3n's block: 3 AltUp streams, LAuReL, Gaussian top-k gates, per-layer inputs over a table shorter
           than the vocabulary, kv-shared layers, remat
  hybrid   Qwen3-Next's layers: Gated DeltaNet beside gated full attention, experts with a gated shared expert, remat
           and scan_layers over the repeating pair; lfm2: a short convolution beside attention with q/k norms
  llama3   the published Llama 3.2 1B preset (llama3 RoPE scaling, GQA, tied head) shrunk by `--model.*`
           overrides through the command line's own entry point
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxformer.checkpoint import load_run_params
from jaxformer.interop import native, to_numpy_state_dict
from jaxformer.interop.state_dict import from_state_dict
from jaxformer.train.lm import train
from jaxformer.train.metrics import read_metrics
from tests.conftest import tiny_run

SLIDE, FULL = "sliding_attention", "full_attention"
FAMILIES = {
    "gemma3": dict(head_dim=16, norm_placement="sandwich", norm_unit_offset=True, qk_norm="head", sliding_window=8,
                   layer_types=(SLIDE, FULL), rope_theta=1e6, rope_local_theta=1e4, scale_embedding=True,
                   query_pre_attn_scalar=24.0, attn_logit_softcap=20.0, final_logit_softcap=15.0,
                   activation="gelu_tanh", tie_embeddings=True),
    "olmo2": dict(norm_placement="post", qk_norm="proj",
                  rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)),
    "qwen2": dict(qkv_bias=True, sliding_window=12,
                  rope_scaling=dict(rope_type="longrope", factor=4.0, original_max_position_embeddings=16,
                                    short_factor=[1.0, 1.1, 1.3, 1.6], long_factor=[1.0, 2.0, 4.0, 8.0])),
    "cohere2": dict(norm="layernorm_nobias", norm_placement="parallel", sliding_window=8, layer_types=(SLIDE, FULL),
                    rope=dict(nope_layers=[1]), scales=dict(logits=0.5), tie_embeddings=True, export_as="cohere2"),
    "granite": dict(gated_mlp=False, activation="xielu", rope=dict(partial_factor=0.5),
                    scales=dict(embedding=2.0, residual=0.5, logits=0.5),
                    attention=dict(scale=0.2, qk_norm="head", qk_norm_after_rope=True), export_as="granite"),
    "gemma4": dict(n_layers=4, head_dim=8, block="gemma4", norm_placement="sandwich", scale_embedding=True,
                   activation="gelu_tanh", tie_embeddings=True, final_logit_softcap=30.0, export_as="gemma4_text",
                   layer_types=(SLIDE, FULL) * 2, per_layer_dim=8, kv_shared_layers=2, double_wide_shared_mlp=True,
                   remat="full", rope=dict(theta=1e6, local_theta=1e4,
                                           scaling=dict(rope_type="proportional", partial_rotary_factor=0.25)),
                   attention=dict(qk_norm="head", v_norm=True, scale=1.0, sliding_window=8, global_head_dim=16,
                                  global_kv_heads=1, k_eq_v=True),
                   moe=dict(n_experts=4, n_experts_per_token=2, d_ff=16, router="gemma4")),
    "llama4": dict(n_layers=4, layer_types=("chunked_attention",) * 3 + (FULL,), rope=dict(nope_layers=(3,)),
                   attention=dict(qk_norm="rms", chunk_size=8, temperature_floor=4.0, temperature_scale=0.5),
                   moe=dict(n_experts=4, n_experts_per_token=1, d_ff=32, shared_d_ff=32, router="llama4", every=2),
                   export_as="llama4_text", scan_layers=True),
    "gemma3n": dict(n_layers=4, head_dim=8, block="gemma3n", norm_placement="sandwich", scale_embedding=True,
                    activation="gelu_tanh", tie_embeddings=True, final_logit_softcap=30.0, export_as="gemma3n_text",
                    layer_types=(SLIDE, FULL) * 2, per_layer_dim=8, per_layer_vocab_size=400, kv_shared_layers=2,
                    laurel_rank=4, activation_sparsity=(0.9, 0.5, 0.0, 0.0), altup=dict(inputs=3), remat="full",
                    rope=dict(theta=1e6, local_theta=1e4),
                    attention=dict(qk_norm="head", v_norm=True, scale=1.0, sliding_window=8)),
    # hybrids: Gated DeltaNet layers and a short convolution around a gated full-attention layer, (1 + w) norms,
    # Qwen3-Next's experts with a gated shared expert, remat and scan_layers over a repeating pair of layer types
    "hybrid": dict(n_layers=4, head_dim=8, norm_unit_offset=True, remat="full", scan_layers=True,
                   layer_types=("linear_attention", FULL) * 2, attention=dict(qk_norm="head", output_gate=True),
                   rope=dict(partial_factor=0.5),
                   linear=dict(key_heads=2, value_heads=4, key_head_dim=8, value_head_dim=8, chunk_size=16),
                   moe=dict(n_experts=4, n_experts_per_token=2, d_ff=16, shared_d_ff=16, shared_gate=True,
                            router="qwen", norm_topk_prob=True), export_as="qwen3_next"),
    "lfm2": dict(layer_types=("conv", FULL), conv=dict(kernel=3, bias=True), attention=dict(qk_norm="head"),
                 tie_embeddings=True, export_as="lfm2"),
}
FAMILY = {"hybrid": "qwen3_next", "lfm2": "lfm2", "gemma3": "gemma3_text", "olmo2": "olmo2", "qwen2": "qwen2", "cohere2": "cohere2", "granite": "granite",
          "gemma4": "gemma4_text", "gemma3n": "gemma3n_text", "llama4": "llama4_text"}
RUN = dict(steps=20, lr=1e-2, warmup_steps=3, eval_every=20, eval_batches=1, ckpt_every=20, async_checkpoint=False)


def _check_trained_and_reloads(run_dir, cfg) -> None:
    """The loss fell; the newest checkpoint rebuilds the same architecture with the exported weights."""
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == RUN["steps"] and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
    saved_cfg, params = load_run_params(run_dir)  # the orbax checkpoint and the config in its meta
    assert saved_cfg.architecture() == cfg.architecture()
    exported = native.load(run_dir / "model")
    assert exported.config.architecture() == cfg.architecture()
    want = to_numpy_state_dict(exported)
    assert sorted(params) == sorted(want)
    assert all(np.array_equal(params[k], want[k]) for k in want)
    from_state_dict(saved_cfg, params, source=f"{run_dir}/checkpoints")  # the model builds from them (shapes checked)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_and_reloads(family, tmp_path, shards_dir):
    cfgs = tiny_run(tmp_path / "run", shards_dir, model=FAMILIES[family], **RUN)
    assert cfgs["model"].family == FAMILY[family]
    out = train(cfgs, progress=False)
    assert np.isfinite(out["val_loss"])
    _check_trained_and_reloads(tmp_path / "run", cfgs["model"])
    if family == "gemma4":  # layer scalars are stored values (buffers in transformers): training leaves them at init
        _, params = load_run_params(tmp_path / "run")
        scalars = [v for k, v in params.items() if k.endswith("layer_scalar")]
        assert len(scalars) == 4 and all(np.array_equal(v, np.ones(1)) for v in scalars)


def test_train_cli_from_a_preset_with_overrides(tmp_path, shards_dir, capsys):
    """`jaxformer train --config llama3.2-1b --model.*=...`: the published shape, shrunk on the command line."""
    from jaxformer.cli import main
    from jaxformer.config import load_config

    run = tmp_path / "run"
    args = ["--model.vocab_size=512", "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=4",
            "--model.n_kv_heads=2", "--model.head_dim=8", "--model.d_ff=64", "--model.max_seq_len=64",
            "--model.param_dtype=float32", "--model.compute_dtype=float32", f"--data.data_dir={shards_dir}",
            "--data.seq_len=32", f"--train.run_dir={run}", "--train.batch_size=4", "--train.sample_tokens=0",
            "--train.peak_tflops=1.0", "--train.log_every=1", *(f"--train.{k}={v}" for k, v in RUN.items())]
    main(["train", "--config", "llama3.2-1b", "--no-progress", *args])
    cfg, preset = load_config("llama3.2-1b", args)["model"], load_config("llama3.2-1b")["model"]
    for kept in ("rope", "tie_embeddings", "norm_eps", "activation"):
        assert getattr(cfg, kept) == getattr(preset, kept), kept  # what the overrides left alone is Llama 3.2's
    assert cfg.rope.scaling.rope_type == "llama3" and cfg.family == "llama" and cfg.d_model == 32
    _check_trained_and_reloads(run, cfg)
    assert "validation: loss" in capsys.readouterr().out
