"""What every Hugging Face decoder family shares: the Family record, common config.json fields, RoPE settings.

A family module (gpt2, llama, gemma, phi3, olmo2) maps one or more transformers `model_type`s onto
ModelConfig fields and parameter names. `check_expressible` proves an export loses nothing: the config
written for a model_type, read back, must equal the model's architecture field by field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import numpy as np

from jaxformer.config import ModelConfig, RopeScaling
from jaxformer.interop.state_dict import UnsupportedCheckpointError

StateDict = dict[str, np.ndarray]
ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu", "relu": "relu", "relu2": "relu2", "xielu": "xielu"}
ACT_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu", "relu2": "relu2",
             "xielu": "xielu"}
# not written to (or read from) config.json as architecture: how a model was initialised, stored, labelled
NOT_COMPARED = ("init_std", "param_dtype", "export_as", "moe.z_loss_coef")  # + a training loss weight
ROPE_FIELDS = [f.name for f in dataclasses.fields(RopeScaling) if f.name != "rope_type"]


@dataclasses.dataclass(frozen=True)
class Family:
    """One transformers model_type: config.json <-> ModelConfig, and state-dict names both ways."""

    model_type: str
    architecture: str  # the class transformers' AutoModelForCausalLM builds, e.g. "Qwen2ForCausalLM"
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    from_hf: Callable[[StateDict, ModelConfig], StateDict]
    to_hf: Callable[[StateDict, ModelConfig], StateDict]


def llama_style_family(model_type: str, architecture: str, config_from_hf: Callable[[dict[str, Any]], ModelConfig],
                       config_to_hf: Callable[[ModelConfig, Family], dict[str, Any]]) -> Family:
    """A Family whose weights are jaxformer's names under "model."; config_to_hf is told which family it writes."""
    family = Family(model_type, architecture, config_from_hf, lambda cfg: config_to_hf(cfg, family), unprefixed,
                    prefixed)
    return family


def check_expressible(cfg: ModelConfig, family: Family, written: dict[str, Any]) -> None:
    """Raise UnsupportedCheckpointError naming each field that `written` (family's config.json) loses."""
    back = family.config_from_hf(written).architecture()
    # RoPE models have no hard length limit in transformers: max_position_embeddings is not compared
    skip = NOT_COMPARED + (("max_seq_len",) if cfg.position == "rope" else ())
    lost = {k: v for k, v in cfg.architecture().items() if k not in skip and not _same(back.get(k), v)}
    if lost:
        shown = ", ".join(f"{k}={v!r} (reads back as {back.get(k)!r})" for k, v in sorted(lost.items()))
        raise UnsupportedCheckpointError(f"Hugging Face model_type {family.model_type!r} cannot express {shown}; "
                                         "choose another export_as or change these fields")


def _same(a: Any, b: Any) -> bool:
    """Equal, floats to 1e-12 relative: a multiplier written as its reciprocal (Granite's logits_scaling) may read
    back an ulp away."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def require(hf: dict[str, Any], name: str, ok: Callable[[Any], bool], default: Any, supported: str) -> Any:
    """hf[name] (or default) when ok(value), else UnsupportedCheckpointError naming the field and its value."""
    value = hf.get(name, default)
    if not ok(value):
        raise UnsupportedCheckpointError(f"{hf.get('model_type')} {name}={value!r} is not supported; {supported}")
    return value


def activation(hf: dict[str, Any], *keys: str, default: str = "silu") -> str:
    """jaxformer's activation for the first of `keys` present (hidden_act, hidden_activation...)."""
    name = next((hf[k] for k in keys if hf.get(k) is not None), default)
    if name not in ACT_FROM_HF:
        raise UnsupportedCheckpointError(f"{hf.get('model_type')} activation {name!r} is not supported; "
                                         f"supported: {sorted(ACT_FROM_HF)}")
    return ACT_FROM_HF[name]


def decoder_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields every Llama-style config.json spells the same way."""
    n_heads = hf["num_attention_heads"]
    return dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                tie_embeddings=hf.get("tie_word_embeddings", False), init_std=hf.get("initializer_range", 0.02))


def decoder_to_hf(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    """The config.json fields decoder_fields reads, plus the architecture's name. Dynamic NTK RoPE grows
    past max_position_embeddings in transformers: that is where it must say the original context ends."""
    max_pos = cfg.max_seq_len
    if cfg.rope.scaling is not None and cfg.rope.scaling.rope_type == "dynamic":
        max_pos = cfg.rope.scaling.original_max_position_embeddings or max_pos
    return {"architectures": [family.architecture], "model_type": family.model_type, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
            "max_position_embeddings": max_pos, "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "dtype": cfg.param_dtype}


def partial_rotary_factor(hf: dict[str, Any]) -> float:
    """The rotated share of each head (`partial_rotary_factor`, in rope_parameters or beside it); 1.0 when unset."""
    rp = hf.get("rope_parameters") or {}
    return float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0)


def rope_from_hf(hf: dict[str, Any], params: dict[str, Any] | None = None, partial_ok: bool = False
                 ) -> tuple[float, RopeScaling | None]:
    """(rope_theta, RopeScaling or None) from transformers 5's `rope_parameters` or the older
    `rope_scaling` + `rope_theta` (`params` overrides both: one layer type's entry, as Gemma 3 writes). A partial
    rotary factor is refused unless the family reads it (`partial_ok`, then partial_rotary_factor(hf))."""
    rp = dict(params if params is not None else (hf.get("rope_parameters") or hf.get("rope_scaling") or {}))
    theta = float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind in ("su", "yarn") and hf.get("model_type") == "phi3":
        kind = "longrope"  # transformers reads Phi-3's older names as longrope
    if not partial_ok and rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedCheckpointError(f"{hf.get('model_type')} partial_rotary_factor="
                                         f"{rp.get('partial_rotary_factor', hf.get('partial_rotary_factor'))} is not "
                                         "supported; jaxformer rotates whole heads")
    if kind == "default":
        return theta, None
    if kind not in ("linear", "dynamic", "llama3", "yarn", "longrope"):
        raise UnsupportedCheckpointError(f"{hf.get('model_type')} rope_type={kind!r} is not supported; supported: "
                                         "default, linear, dynamic, llama3, yarn, longrope")
    max_pos = hf.get("max_position_embeddings", 2048)
    fields = {k: rp[k] for k in ROPE_FIELDS if rp.get(k) is not None}
    if kind == "dynamic":  # transformers grows the base past max_position_embeddings itself
        fields["original_max_position_embeddings"] = max_pos
    original = fields.setdefault("original_max_position_embeddings",
                                 hf.get("original_max_position_embeddings") or max_pos)
    if kind in ("yarn", "longrope") and "factor" not in fields:
        fields["factor"] = max_pos / original
    return theta, RopeScaling(rope_type=kind, **fields)


ROPE_TYPE_FIELDS = {  # what each rope_type reads (modeling_rope_utils.py)
    "linear": ("factor",), "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
    "longrope": ("factor", "original_max_position_embeddings", "attention_factor", "short_factor", "long_factor"),
}


def rope_to_hf(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
    """A `rope_parameters` entry for transformers 5: rope_type, rope_theta and what that type reads."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    out: dict[str, Any] = {"rope_type": scaling.rope_type, "rope_theta": theta}
    for k in ROPE_TYPE_FIELDS[scaling.rope_type]:
        v = getattr(scaling, k)
        if v is not None:
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def layer_types_from_hf(hf: dict[str, Any], sliding_window: int | None) -> tuple[str, ...] | None:
    """config.json's layer_types (ModelConfig folds uniform ones into sliding_window); None without a window."""
    types = hf.get("layer_types")
    return tuple(types) if types and sliding_window is not None else None


def prefixed(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """jaxformer names -> transformers' Llama-style names: "model." before all but lm_head."""
    return {(k if k == "lm_head.weight" else f"model.{k}"): v for k, v in sd.items()}


def unprefixed(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """transformers' Llama-style names -> jaxformer's; a stored copy of a tied lm_head is dropped."""
    out = {(k if k == "lm_head.weight" else k.removeprefix("model.")): v for k, v in sd.items()}
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def rope_by_layer_type(hf: dict[str, Any], default_theta: float = 10000.0, legacy_local_key: str | None = None,
                       legacy_local_theta: float = 10000.0) -> tuple[float, RopeScaling | None, float | None]:
    """(full layers' theta, their scaling, sliding layers' theta or None when they rotate as full layers do), from
    transformers 5's per-layer-type `rope_parameters` (Gemma 3, OLMo 3) or an older flat entry: the scaling is the
    full layers' only, and sliding layers take the default RoPE of `legacy_local_key`'s base (Gemma 3's
    rope_local_base_freq) or `legacy_local_theta` (OLMo 3's config class fills the sliding entry with its default
    base, 500000, whatever rope_theta says)."""
    rp = hf.get("rope_parameters") or {}
    if "full_attention" in rp:  # one entry per layer type
        theta, scaling = rope_from_hf(hf, rp["full_attention"])
        local = rp.get("sliding_attention") or {"rope_type": "default", "rope_theta": 10000.0}
    else:
        theta, scaling = rope_from_hf({**hf, "rope_theta": hf.get("rope_theta", default_theta)})
        local_base = hf.get(legacy_local_key, legacy_local_theta) if legacy_local_key else legacy_local_theta
        local = {"rope_type": "default", "rope_theta": local_base}
    local_theta, local_scaling = rope_from_hf(hf, local)
    if local_scaling is not None:
        raise UnsupportedCheckpointError(f"{hf.get('model_type')} sliding layers with rope_type="
                                         f"{local_scaling.rope_type!r} are not supported; only the default RoPE on "
                                         "sliding layers")
    return theta, scaling, None if (local_theta == theta and scaling is None) else local_theta


def rope_to_hf_by_layer_type(cfg: ModelConfig) -> dict[str, Any]:
    """`rope_parameters` with one entry per layer type: full layers' (scaled) RoPE, sliding layers' own base."""
    local = rope_to_hf(cfg.rope.local_theta or cfg.rope.theta, None)
    return {"full_attention": rope_to_hf(cfg.rope.theta, cfg.rope.scaling), "sliding_attention": local}


def deinterleave_rope(sd: StateDict, cfg: ModelConfig, inverse: bool = False) -> StateDict:
    """Interleaved RoPE (pairs 2i, 2i+1 rotate together: GPT-J, Helium, ERNIE 4.5, GLM, Cohere) as jaxformer's
    rotate-half RoPE (pairs i, i + R/2): each head's first R = rotary_dim q and k rows reordered evens first, then
    odds, the rest kept. Scores are unchanged since q and k move alike; v and o are untouched. `inverse` writes the
    interleaved order back."""
    H, R = cfg.head_dim, cfg.rotary_dim
    order = np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2), np.arange(R, H)])
    if inverse:
        order = np.argsort(order)
    out = dict(sd)
    for key, v in sd.items():
        if re.search(r"\.self_attn\.[qk]_proj\.(weight|bias)$", key):
            heads = v.reshape(-1, H, *v.shape[1:])  # [heads, H, (D)]
            out[key] = heads[:, order].reshape(v.shape)
    return out


def text_model_config(hf: dict[str, Any], wrapper: str, text_type: str, tie_default: bool) -> dict[str, Any]:
    """The text model's config.json fields of a multimodal checkpoint (model_type `wrapper`: its `text_config`, as
    `text_type`; the wrapper's tie_word_embeddings decides, as in transformers); any other config as it is."""
    if hf.get("model_type") != wrapper:
        return hf
    text = hf["text_config"]
    return {**text, "model_type": text_type,
            "tie_word_embeddings": hf.get("tie_word_embeddings", text.get("tie_word_embeddings", tie_default))}


def renamed(sd: StateDict, renames: dict[str, str]) -> StateDict:
    """Keys with each `old` substring of renames replaced by its `new` (applied in order), values untouched."""
    out = {}
    for key, v in sd.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = v
    return out
