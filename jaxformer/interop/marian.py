"""transformers' MarianMTModel <-> jaxformer's EncoderDecoder: the config map and the weight-name table.

Marian is the Vaswani et al. architecture: post-LN blocks, sinusoidal positions (sin in the first half of
each vector, cos in the second, as jaxformer.models.layers.sinusoidal_positions), embeddings scaled by
sqrt(d_model) when `scale_embedding`, biases everywhere, a `final_logits_bias` buffer, and the pad id as
the decoder's start token. Names differ from ours only by a table (out_proj -> o_proj, fc1/fc2 ->
mlp.up_proj/down_proj, encoder_attn -> cross_attn, *_layer_norm -> *_norm); the sinusoid tables
(`embed_positions.weight`) hold no learned values and are not stored by transformers.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxformer.config import EncDecConfig
from jaxformer.interop.state_dict import UnsupportedCheckpointError

ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "swish": "silu", "silu": "silu"}
ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "swish"}
LAYER_RENAMES = [  # (Marian layer suffix, jaxformer layer suffix), leaves weight/bias alike
    ("self_attn.q_proj", "self_attn.q_proj"), ("self_attn.k_proj", "self_attn.k_proj"),
    ("self_attn.v_proj", "self_attn.v_proj"), ("self_attn.out_proj", "self_attn.o_proj"),
    ("self_attn_layer_norm", "self_attn_norm"),
    ("encoder_attn.q_proj", "cross_attn.q_proj"), ("encoder_attn.k_proj", "cross_attn.k_proj"),
    ("encoder_attn.v_proj", "cross_attn.v_proj"), ("encoder_attn.out_proj", "cross_attn.o_proj"),
    ("encoder_attn_layer_norm", "cross_attn_norm"),
    ("fc1", "mlp.up_proj"), ("fc2", "mlp.down_proj"), ("final_layer_norm", "mlp_norm"),
]
_FROM = dict(LAYER_RENAMES)
_TO = {ours: hf for hf, ours in LAYER_RENAMES}
_LAYER_KEY = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)")


def config_from_hf(hf: dict[str, Any], overrides: dict[str, Any]) -> EncDecConfig:
    """The EncDecConfig of a MarianConfig dict (config.json)."""
    V = hf.get("vocab_size", 58101)
    if (hf.get("decoder_vocab_size") or V) != V:
        raise UnsupportedCheckpointError(f"Marian decoder_vocab_size={hf['decoder_vocab_size']} differs from "
                                         f"vocab_size={V}; jaxformer's encoder-decoder has one vocabulary")
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(enc, 16 if "heads" in enc else 4096) != hf.get(dec, 16 if "heads" in dec else 4096):
            raise UnsupportedCheckpointError(f"Marian {enc}={hf.get(enc)} differs from {dec}={hf.get(dec)}; "
                                             "jaxformer uses one value for encoder and decoder")
    act = hf.get("activation_function", "gelu")
    if act not in ACT_FROM_HF:
        raise UnsupportedCheckpointError(f"Marian activation_function={act!r} is not supported; "
                                         f"supported: {sorted(ACT_FROM_HF)}")
    eos = hf.get("eos_token_id", 0)
    eos = eos[0] if isinstance(eos, list) else eos
    pad = hf.get("pad_token_id", 58100)
    start = hf.get("decoder_start_token_id", pad)
    return EncDecConfig(
        vocab_size=V, d_model=hf.get("d_model", 1024), n_encoder_layers=hf.get("encoder_layers", 12),
        n_layers=hf.get("decoder_layers", 12), n_heads=hf.get("decoder_attention_heads", 16),
        d_ff=hf.get("decoder_ffn_dim", 4096), max_seq_len=hf.get("max_position_embeddings", 1024),
        position="sinusoidal", norm="layernorm", norm_eps=1e-5, activation=ACT_FROM_HF[act], gated_mlp=False,
        use_bias=True, post_norm=True, scale_embedding=bool(hf.get("scale_embedding", False)),
        share_embeddings=bool(hf.get("share_encoder_decoder_embeddings", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), logits_bias=True,
        dropout=float(hf.get("dropout", 0.0)), init_std=hf.get("init_std", 0.02),
        pad_id=pad, decoder_start_id=start, eos_id=eos, **overrides)


def config_to_hf(cfg: EncDecConfig, *, eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json contents of the MarianMTModel matching `cfg`."""
    differ, wants = cfg.marian_mismatches()
    if differ:
        raise UnsupportedCheckpointError(f"this encoder-decoder has no MarianMTModel equivalent: {differ} "
                                         f"(Marian needs {wants})")
    eos = cfg.eos_id if eos_token_id is None else eos_token_id
    return {
        "architectures": ["MarianMTModel"], "model_type": "marian", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "decoder_vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
        "encoder_layers": cfg.n_encoder_layers, "decoder_layers": cfg.n_layers,
        "encoder_attention_heads": cfg.n_heads, "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len,
        "activation_function": ACT_TO_HF[cfg.activation], "scale_embedding": cfg.scale_embedding,
        "share_encoder_decoder_embeddings": cfg.share_embeddings, "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": cfg.pad_id, "decoder_start_token_id": cfg.decoder_start_id, "eos_token_id": eos,
        "forced_eos_token_id": eos, "dropout": cfg.dropout, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "init_std": cfg.init_std, "dtype": cfg.param_dtype,
    }


def from_hf(sd: dict[str, np.ndarray], cfg: EncDecConfig) -> dict[str, np.ndarray]:
    """Marian weight names -> jaxformer's (unknown keys pass through so the mismatch report names them)."""
    out: dict[str, np.ndarray] = {}
    for key, v in sd.items():
        k = key.removeprefix("model.")
        if k.endswith("embed_positions.weight"):
            continue  # the fixed sinusoid table
        m = _LAYER_KEY.fullmatch(k)
        if m and m[3] in _FROM:
            out[f"{m[1]}.layers.{m[2]}.{_FROM[m[3]]}.{m[4]}"] = v
        elif k == "final_logits_bias":
            out[k] = v.reshape(-1)  # [1, V] buffer -> [V]
        elif k == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[k] = v
        elif cfg.share_embeddings and k in ("shared.weight", "encoder.embed_tokens.weight",
                                            "decoder.embed_tokens.weight"):
            out["embed_tokens.weight"] = v  # one table, stored under one or more of these names
        elif k == "encoder.embed_tokens.weight":
            out["embed_source_tokens.weight"] = v
        elif k == "decoder.embed_tokens.weight":
            out["embed_tokens.weight"] = v
        else:
            out[key] = v
    return out


def to_hf(sd: dict[str, np.ndarray], cfg: EncDecConfig) -> dict[str, np.ndarray]:
    """jaxformer weight names -> Marian's (transformers ties the shared copies itself on load)."""
    out: dict[str, np.ndarray] = {"final_logits_bias": np.zeros((1, cfg.vocab_size), np.float32)}
    for key, v in sd.items():
        m = _LAYER_KEY.fullmatch(key)
        if m:
            out[f"model.{m[1]}.layers.{m[2]}.{_TO[m[3]]}.{m[4]}"] = v
        elif key == "final_logits_bias":
            out[key] = v.reshape(1, -1)
        elif key == "lm_head.weight":
            out[key] = v
        elif key == "embed_source_tokens.weight":
            out["model.encoder.embed_tokens.weight"] = v
        elif key == "embed_tokens.weight":
            out["model.shared.weight" if cfg.share_embeddings else "model.decoder.embed_tokens.weight"] = v
        else:
            raise UnsupportedCheckpointError(f"no Marian name for parameter {key!r}")
    return out
