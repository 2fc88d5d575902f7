"""Gemma 3n text models: Gemma3nForCausalLM (`gemma3n_text`), and the text part of Gemma3nForConditionalGeneration
(`gemma3n`, the published checkpoints: config.json's text_config, weights under model.language_model.; the vision and
audio towers are left out).

transformers' modeling_gemma3n.py, field by field (jaxformer.models.gemma3n computes it):
  altup_num_inputs, altup_active_idx, altup_coef_clip, altup_correct_scale    AltUp (altup.*)
  laurel_rank                                                                 LAuReL
  activation_sparsity_pattern     per layer Gaussian top-k of the MLP gate (activation_sparsity)
  hidden_size_per_layer_input, vocab_size_per_layer_input    per-layer inputs (ids past the table read row 0)
  num_kv_shared_layers            the last N layers reuse earlier layers' keys and values
  intermediate_size               one width for every layer (a list of equal values is read as it)
Scores are scaled by 1 (query_pre_attn_scalar is not read by the model); per-head q/k norms, weightless value norms.
"""

from __future__ import annotations

from typing import Any

from jaxformer.config import ModelConfig
from jaxformer.interop.gemma4 import gemma_text_weights
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         prefixed, require, rope_by_layer_type, rope_to_hf_by_layer_type,
                                         text_model_config, unprefixed)
from jaxformer.interop.state_dict import UnsupportedCheckpointError


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = text_model_config(hf, "gemma3n", "gemma3n_text", tie_default=True)  # a multimodal checkpoint: its text model
    require(hf, "attention_bias", lambda v: not v, False, "Gemma 3n has no attention biases in jaxformer")
    require(hf, "use_bidirectional_attention", lambda v: not v, None, "only causal text attention")
    L = hf["num_hidden_layers"]
    widths = hf.get("intermediate_size", 16384)
    widths = list(widths) if isinstance(widths, (list, tuple)) else [widths] * L
    if len(set(widths)) != 1:
        raise UnsupportedCheckpointError(f"gemma3n_text intermediate_size={widths} is not supported; jaxformer takes "
                                         "one MLP width for every layer")
    layer_types = hf.get("layer_types") or ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention"
                                            for i in range(L)]
    sparsity = hf.get("activation_sparsity_pattern")
    if sparsity is None:
        sparsity = [0.95] * (10 if L > 10 else 0) + [0.0] * (L - (10 if L > 10 else 0))
    theta, scaling, local_theta = rope_by_layer_type(hf, 1_000_000.0, "rope_local_base_freq")
    window = hf.get("sliding_window", 512)
    fields = {**decoder_fields({**hf, "intermediate_size": widths[0]}), "tie_embeddings": hf.get("tie_word_embeddings",
                                                                                                  True)}
    return ModelConfig.llama(
        **fields, activation=activation(hf, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh"),
        export_as="gemma3n_text", block="gemma3n", norm_placement="sandwich", scale_embedding=True,
        final_logit_softcap=hf.get("final_logit_softcapping", 30.0),
        layer_types=layer_types if "sliding_attention" in layer_types else None,
        per_layer_dim=hf.get("hidden_size_per_layer_input", 256),
        per_layer_vocab_size=hf.get("vocab_size_per_layer_input", 262_144),
        kv_shared_layers=hf.get("num_kv_shared_layers", 15), laurel_rank=hf.get("laurel_rank", 64),
        activation_sparsity=tuple(sparsity),
        altup=dict(inputs=hf.get("altup_num_inputs", 4), active_idx=hf.get("altup_active_idx", 0),
                   coef_clip=hf.get("altup_coef_clip", 120.0), correct_scale=bool(hf.get("altup_correct_scale", True))),
        rope=dict(theta=theta, scaling=scaling, local_theta=local_theta),
        attention=dict(qk_norm="head", v_norm=True, scale=1.0,
                       sliding_window=window if "sliding_attention" in layer_types else None))


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    a = cfg.altup
    return {**decoder_to_hf(cfg, FAMILY), "hidden_activation": ACT_TO_HF[cfg.activation], "attention_bias": False,
            "intermediate_size": [cfg.d_ff] * cfg.n_layers, "final_logit_softcapping": cfg.final_logit_softcap,
            "layer_types": [cfg.layer_type(i) for i in range(cfg.n_layers)],
            "sliding_window": cfg.attention.sliding_window or cfg.max_seq_len,
            "rope_parameters": rope_to_hf_by_layer_type(cfg), "hidden_size_per_layer_input": cfg.per_layer_dim,
            "vocab_size_per_layer_input": cfg.per_layer_vocab_size or cfg.vocab_size,
            "num_kv_shared_layers": cfg.kv_shared_layers, "laurel_rank": cfg.laurel_rank,
            "activation_sparsity_pattern": list(cfg.activation_sparsity) or [0.0] * cfg.n_layers,
            "altup_num_inputs": a.inputs, "altup_active_idx": a.active_idx, "altup_coef_clip": a.coef_clip,
            "altup_correct_scale": a.correct_scale}


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    sd = gemma_text_weights(sd)
    return unprefixed(sd, cfg)


FAMILY = Family("gemma3n_text", "Gemma3nForCausalLM", _config_from_hf, _config_to_hf, _from_hf, prefixed)
FAMILIES = {"gemma3n_text": FAMILY, "gemma3n": Family("gemma3n", "Gemma3nForConditionalGeneration", _config_from_hf,
                                                      _config_to_hf, _from_hf, prefixed)}
