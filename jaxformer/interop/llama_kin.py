"""Llama's kin: decoders that are a Llama with one or two twists, each as its transformers modeling file computes it.

- arcee (ArceeForCausalLM, AFM): a non-gated MLP, up_proj -> ReLU squared -> down_proj.
- smollm3 (SmolLM3ForCausalLM): no RoPE on the layers `no_rope_layers` marks 0 (every fourth by default);
  sliding windows on the layers `layer_types` names when `use_sliding_window`.
- helium (HeliumForCausalLM): interleaved RoPE; biases on q/k/v only (`attention_bias`).
- ernie4_5 (Ernie4_5ForCausalLM): interleaved RoPE; `use_bias` on every projection.
- seed_oss (SeedOssForCausalLM): `attention_bias` on q/k/v, `attention_out_bias` on o, `mlp_bias` apart.
- granite (GraniteForCausalLM): muP multipliers on the embedding, each residual branch, the attention scores
  (`attention_multiplier` replaces head_dim ** -0.5) and the logits (divided by `logits_scaling`).
- apertus (ApertusForCausalLM): a non-gated MLP with the learned xIELU activation (mlp.act_fn.alpha_p / alpha_n;
  its fixed beta and eps buffers are checked on import and written on export), per-head q/k RMSNorm.
- hunyuan_v1_dense (HunYuanDenseV1ForCausalLM): per-head q/k RMSNorm after RoPE; `dynamic` RoPE with an `alpha`
  is a fixed base theta * alpha ** (H / (H - 2)) (transformers' ntk_alpha), read as that base.

Interleaved RoPE rotates pairs (2i, 2i+1); jaxformer rotates (i, i + H/2): the import reorders each head's q/k
rows (hf_config.deinterleave_rope), which leaves every score unchanged, and the export restores the order.
Bias switches map onto jaxformer's two (`attention.qkv_bias`: q/k/v only; `use_bias`: every projection); a
combination neither expresses is refused naming its fields.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         deinterleave_rope, layer_types_from_hf, prefixed, renamed, require,
                                         rope_from_hf, rope_to_hf, unprefixed)
from jaxformer.interop.state_dict import UnsupportedCheckpointError
from jaxformer.models.layers import XIELU_BETA, XIELU_EPS

# model_type -> config.json's bias switches, in the order (q/k/v, o, MLP); one name may cover several
BIAS_KEYS = {"arcee": ("attention_bias", "attention_bias", "mlp_bias"),
             "smollm3": ("attention_bias", "attention_bias", "mlp_bias"),
             "helium": ("attention_bias", None, "mlp_bias"),  # o_proj never has a bias
             "ernie4_5": ("use_bias", "use_bias", "use_bias"),
             "seed_oss": ("attention_bias", "attention_out_bias", "mlp_bias"),
             "granite": ("attention_bias", "attention_bias", "mlp_bias"),
             "hunyuan_v1_dense": ("attention_bias", "attention_bias", None),  # None: never a bias
             "apertus": ("attention_bias", "attention_bias", None)}
BIAS_DEFAULTS = {"seed_oss": {"attention_bias": True}}
INTERLEAVED = ("helium", "ernie4_5")
RENAMES = {"hunyuan_v1_dense": {".self_attn.query_layernorm.": ".self_attn.q_norm.",
                                ".self_attn.key_layernorm.": ".self_attn.k_norm."},
           "apertus": {".attention_layernorm.": ".input_layernorm.",
                       ".feedforward_layernorm.": ".post_attention_layernorm."}}  # transformers' -> jaxformer's
ARCHITECTURES = {"arcee": "ArceeForCausalLM", "smollm3": "SmolLM3ForCausalLM", "helium": "HeliumForCausalLM",
                 "ernie4_5": "Ernie4_5ForCausalLM", "seed_oss": "SeedOssForCausalLM", "granite": "GraniteForCausalLM",
                 "hunyuan_v1_dense": "HunYuanDenseV1ForCausalLM", "apertus": "ApertusForCausalLM"}


def _biases(hf: dict[str, Any]) -> dict[str, bool]:
    """use_bias / qkv_bias from the family's switches: (q/k/v, o, MLP) all on, q/k/v only, or none."""
    model_type = hf["model_type"]
    defaults = BIAS_DEFAULTS.get(model_type, {})
    keys = BIAS_KEYS[model_type]
    on = tuple(bool(hf.get(k, defaults.get(k, False))) if k else False for k in keys)
    if on == (True, True, True):
        return dict(use_bias=True, qkv_bias=False)
    if on in ((False, False, False), (True, False, False)):
        return dict(use_bias=False, qkv_bias=on[0])
    named = {k: hf.get(k, defaults.get(k, False)) for k in keys if k}
    never = " (its MLP has none)" if keys[2] is None else ""
    raise UnsupportedCheckpointError(f"{model_type} biases {named}{never} are not supported; jaxformer has biases on "
                                     "every projection (use_bias) or on q/k/v only (attention.qkv_bias)")


def _bias_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, bool]:
    qkv, o = cfg.use_bias or cfg.attention.qkv_bias, cfg.use_bias
    out: dict[str, bool] = {}
    for key, on in zip(BIAS_KEYS[model_type], (qkv, o, cfg.use_bias)):
        if key:
            out[key] = out.get(key, False) or on
    return out


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf["model_type"]
    theta, scaling = rope_from_hf(_ntk_alpha_as_base(hf) if model_type == "hunyuan_v1_dense" else hf)
    rope: dict[str, Any] = dict(theta=theta, scaling=scaling)
    biases = _biases(hf)
    fields: dict[str, Any] = dict(activation=activation(hf, "hidden_act"), use_bias=biases["use_bias"],
                                  export_as=model_type, rope=rope, attention=dict(qkv_bias=biases["qkv_bias"]))
    if model_type == "arcee":
        fields.update(gated_mlp=False)
    if model_type == "helium":
        fields.update(norm_eps=hf.get("rms_norm_eps", 1e-8))
    if model_type == "granite":
        fields.update(scales=dict(embedding=float(hf.get("embedding_multiplier", 1.0)),
                                  residual=float(hf.get("residual_multiplier", 1.0)),
                                  logits=1.0 / float(hf.get("logits_scaling", 1.0))))
        fields["attention"].update(scale=float(hf.get("attention_multiplier", 1.0)))
    if model_type == "hunyuan_v1_dense":
        fields["attention"].update(qk_norm="head", qk_norm_after_rope=True)
    if model_type == "apertus":
        fields.update(gated_mlp=False)
        fields["attention"].update(qk_norm="head")
    if model_type == "smollm3":
        n = hf["num_hidden_layers"]
        use_rope = hf.get("no_rope_layers") or [int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0)
                                                  for i in range(n)]
        types = hf.get("layer_types") or ["full_attention"] * n
        if "sliding_attention" in types and not hf.get("use_sliding_window"):
            raise UnsupportedCheckpointError("smollm3 layer_types has sliding_attention layers but "
                                             "use_sliding_window=false; set one consistent with the other")
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        rope.update(nope_layers=[i for i, r in enumerate(use_rope) if not r])
        fields["attention"].update(sliding_window=window)
        fields.update(layer_types=layer_types_from_hf({"layer_types": types}, window))
    return ModelConfig.llama(**{**decoder_fields(hf), **fields})


def _config_to_hf(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    out = {**decoder_to_hf(cfg, family), "hidden_act": ACT_TO_HF[cfg.activation],
           "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling), **_bias_to_hf(cfg, family.model_type),
           "pad_token_id": None}  # the class defaults (SmolLM3's 128004) may lie outside a smaller vocabulary
    if family.model_type == "granite":
        out.update(embedding_multiplier=cfg.scales.embedding, residual_multiplier=cfg.scales.residual,
                   logits_scaling=1.0 / cfg.scales.logits, attention_multiplier=cfg.layer_attention_scale(0))
    if family.model_type == "smollm3":
        out.update(no_rope_layers=[int(i not in cfg.rope.nope_layers) for i in range(cfg.n_layers)],
                   use_sliding_window=cfg.attention.sliding_window is not None,
                   sliding_window=cfg.attention.sliding_window,
                   layer_types=[cfg.layer_type(i) for i in range(cfg.n_layers)])
    return out


def _ntk_alpha_as_base(hf: dict[str, Any]) -> dict[str, Any]:
    """Hunyuan's `dynamic` RoPE with `alpha` (transformers' ntk_alpha: static) as the default RoPE of its base."""
    rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if rp.get("rope_type", rp.get("type")) != "dynamic" or not rp.get("alpha"):
        return hf
    H = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
    return {**hf, "rope_parameters": {"rope_type": "default", "rope_theta": theta * rp["alpha"] ** (H / (H - 2))}}


def _without_xielu_constants(sd: StateDict) -> StateDict:
    """xIELU's beta / eps buffers dropped, once checked to be the constants jaxformer computes with."""
    out = {}
    for key, v in sd.items():
        name = key.rsplit(".", 1)[-1]
        if ".act_fn." in key and name in ("beta", "eps"):
            want = {"beta": XIELU_BETA, "eps": XIELU_EPS}[name]
            if not np.allclose(np.asarray(v, np.float64), want, rtol=1e-2):
                raise UnsupportedCheckpointError(f"{key}={float(np.asarray(v))} is not supported; jaxformer's xIELU "
                                                 f"has {name}={want}")
            continue
        out[key] = v
    return out


def _family(model_type: str) -> Family:
    interleaved, renames = model_type in INTERLEAVED, RENAMES.get(model_type, {})

    def from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
        sd = _without_xielu_constants(renamed(unprefixed(sd, cfg), renames))
        return deinterleave_rope(sd, cfg) if interleaved else sd

    def to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
        sd = renamed(sd, {b: a for a, b in renames.items()})
        if cfg.activation == "xielu":  # transformers keeps beta and eps as buffers of each act_fn
            for i in range(cfg.n_layers):
                sd[f"layers.{i}.mlp.act_fn.beta"] = np.asarray(XIELU_BETA, np.float32)
                sd[f"layers.{i}.mlp.act_fn.eps"] = np.asarray(XIELU_EPS, np.float32)
        return prefixed(deinterleave_rope(sd, cfg, inverse=True) if interleaved else sd, cfg)

    family = Family(model_type, ARCHITECTURES[model_type], _config_from_hf, lambda cfg: _config_to_hf(cfg, family),
                    from_hf, to_hf)
    return family


FAMILIES = {t: _family(t) for t in ARCHITECTURES}
