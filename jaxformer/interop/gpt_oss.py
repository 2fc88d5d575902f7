"""gpt-oss (GptOssForCausalLM): attention sinks, biases everywhere, alternating windows, biased experts with a
clamped GLU.

transformers' modeling_gpt_oss.py: every attention projection has a bias (`attention_bias`) and each head a
learned sink logit (`self_attn.sinks`: attention.sinks); layers alternate sliding (`sliding_window`, 128) and full
attention (`layer_types`); RoPE is yarn. The MLP slot is a Mixture of Experts only: the router `mlp.router` (weight
and bias; jaxformer's `mlp.gate`) takes the top-k logits and softmaxes them (the mixtral router); each expert is
(clip(up, +-limit) + 1) * g * sigmoid(alpha g), g = min(gate, limit) (moe.swiglu_limit / swiglu_alpha), with
biases. Checkpoints store the experts fused and transposed: `experts.gate_up_proj` [E, D, 2F] with gate and up
interleaved column by column (gate = [..., ::2], up = [..., 1::2]) and its bias [E, 2F], `experts.down_proj`
[E, F, D] and its bias [E, D]; jaxformer's are torch-layout [E, F, D] / [E, D, F], split, renamed both ways.

The published checkpoints hold the expert matrices in MXFP4 (`quantization_config.quant_method: mxfp4`):
`<proj>_blocks` [E, R, G, 16] bytes, two E2M1 values each (low nibble first), and `<proj>_scales` [E, R, G] E8M0
exponents (bias 127), one per 32 values. They are dequantized on import (exactly: every value is a float32) into
the dense [E, in, R] tensors the rest of this module reads; exports are dense.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.interop.hf_config import (ACT_TO_HF, Family, StateDict, activation, decoder_fields, decoder_to_hf,
                                         layer_types_from_hf, prefixed, require, rope_from_hf, rope_to_hf, unprefixed)
from jaxformer.interop.state_dict import UnsupportedCheckpointError

FP4_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    np.float32)  # the 16 codes of MXFP4's elements (OCP Microscaling spec, E2M1)
_EXPERTS = re.compile(r"(layers\.\d+\.mlp)\.(experts\.gate_up_proj|experts\.gate_up_proj_bias|experts\.down_proj|"
                      r"experts\.down_proj_bias|router\.weight|router\.bias)")


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 blocks [..., R, G, B] (uint8, two codes a byte, low nibble first) and scales [..., R, G] (uint8, 2 **
    (s - 127)) -> float32 [..., G * 2B, R]: the checkpoint's rows of R outputs as transformers lays the dense
    expert tensor out (in, out)."""
    blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
    if blocks.shape[:-1] != scales.shape:
        raise UnsupportedCheckpointError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair up: "
                                         "the scales must have the blocks' shape without its last axis")
    values = np.stack([FP4_E2M1[blocks & 0x0F], FP4_E2M1[blocks >> 4]], axis=-1)  # [..., R, G, B, 2]
    values = np.ldexp(values.reshape(*blocks.shape[:-1], -1), scales.astype(np.int32)[..., None] - 127)
    return np.swapaxes(values.reshape(*blocks.shape[:-2], -1), -1, -2)  # [..., in, R]


def _dense(sd: StateDict) -> StateDict:
    """Each `<name>_blocks` / `<name>_scales` pair (MXFP4) replaced by the dense `<name>`."""
    out = {k: v for k, v in sd.items() if not k.endswith(("_blocks", "_scales"))}
    for key in (k for k in sd if k.endswith("_blocks")):
        base = key.removesuffix("_blocks")
        if base + "_scales" not in sd:
            raise UnsupportedCheckpointError(f"{key} has no {base}_scales beside it: an MXFP4 tensor needs both")
        out[base] = dequantize_mxfp4(sd[key], sd[base + "_scales"])
    return out


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    quant = (hf.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise UnsupportedCheckpointError(f"gpt_oss quantization_config.quant_method={quant!r} is not supported; "
                                         "jaxformer reads mxfp4 (dequantized on import) or unquantized weights")
    require(hf, "attention_bias", lambda v: bool(v), True, "gpt-oss's experts always have biases, and jaxformer "
            "biases every projection or none (use_bias)")
    theta, scaling = rope_from_hf(hf)
    window = hf.get("sliding_window")
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                      for i in range(hf["num_hidden_layers"])]
    return ModelConfig.llama(
        **decoder_fields(hf), activation=activation(hf, "hidden_act"), use_bias=True, export_as="gpt_oss",
        rope=dict(theta=theta, scaling=scaling), layer_types=layer_types_from_hf({"layer_types": types}, window),
        attention=dict(sinks=True, sliding_window=window if "sliding_attention" in types else None),
        moe=dict(n_experts=hf["num_local_experts"], n_experts_per_token=hf["num_experts_per_tok"], router="mixtral",
                 swiglu_limit=float(hf.get("swiglu_limit", 7.0)), swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                 aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001))))


def _config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**decoder_to_hf(cfg, FAMILY), "hidden_act": ACT_TO_HF[cfg.activation],
            "rope_parameters": rope_to_hf(cfg.rope.theta, cfg.rope.scaling), "attention_bias": True,
            "sliding_window": cfg.attention.sliding_window or cfg.max_seq_len,  # transformers always builds the mask
            "layer_types": [cfg.layer_type(i) for i in range(cfg.n_layers)],
            "num_local_experts": cfg.moe.n_experts, "num_experts_per_tok": cfg.moe.n_experts_per_token,
            "swiglu_limit": cfg.moe.swiglu_limit, "swiglu_alpha": cfg.moe.swiglu_alpha,
            "router_aux_loss_coef": cfg.moe.aux_loss_coef}


def _from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    out = {}
    for key, v in unprefixed(_dense(sd), cfg).items():
        m = _EXPERTS.fullmatch(key)
        if m is None:
            out[key] = v
            continue
        p, name = m[1], m[2]
        if name == "experts.gate_up_proj":  # [E, D, 2F], gate / up interleaved by column
            out[f"{p}.experts.gate_proj"] = np.ascontiguousarray(v[:, :, 0::2].transpose(0, 2, 1))
            out[f"{p}.experts.up_proj"] = np.ascontiguousarray(v[:, :, 1::2].transpose(0, 2, 1))
        elif name == "experts.gate_up_proj_bias":  # [E, 2F]
            out[f"{p}.experts.gate_bias"], out[f"{p}.experts.up_bias"] = v[:, 0::2], v[:, 1::2]
        elif name == "experts.down_proj":  # [E, F, D]
            out[f"{p}.experts.down_proj"] = np.ascontiguousarray(v.transpose(0, 2, 1))
        elif name == "experts.down_proj_bias":
            out[f"{p}.experts.down_bias"] = v
        else:  # the router is jaxformer's mlp.gate
            out[f"{p}.gate.{name.split('.')[1]}"] = v
    return out


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[..., F] gate and up -> [..., 2F] with gate in the even columns, up in the odd ones."""
    out = np.empty((*gate.shape[:-1], 2 * gate.shape[-1]), gate.dtype)
    out[..., 0::2], out[..., 1::2] = gate, up
    return out


def _to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    sd = dict(sd)
    for i in range(cfg.n_layers):
        p = f"layers.{i}.mlp."
        gate, up = sd.pop(p + "experts.gate_proj"), sd.pop(p + "experts.up_proj")  # [E, F, D]
        sd[p + "experts.gate_up_proj"] = _interleave(gate.transpose(0, 2, 1), up.transpose(0, 2, 1))  # [E, D, 2F]
        sd[p + "experts.gate_up_proj_bias"] = _interleave(sd.pop(p + "experts.gate_bias"), sd.pop(p + "experts.up_bias"))
        sd[p + "experts.down_proj"] = sd.pop(p + "experts.down_proj").transpose(0, 2, 1)  # [E, F, D]
        sd[p + "experts.down_proj_bias"] = sd.pop(p + "experts.down_bias")
        sd[p + "router.weight"], sd[p + "router.bias"] = sd.pop(p + "gate.weight"), sd.pop(p + "gate.bias")
    return prefixed(sd, cfg)


FAMILY = Family("gpt_oss", "GptOssForCausalLM", _config_from_hf, _config_to_hf, _from_hf, _to_hf)
FAMILIES = {"gpt_oss": FAMILY}
