"""LoRA adapters <-> Hugging Face PEFT directories (adapter_config.json + adapter_model.safetensors).

`save_peft` writes what `peft.PeftModel.from_pretrained(base, DIR)` loads onto the base exported
with jaxformer.save_hf; `load_peft` reads such a directory (ours or one peft wrote) onto a jaxformer
model. PEFT keys are the Hugging Face module path under "base_model.model." plus
".lora_A.weight" [r, in] / ".lora_B.weight" [out, r], and the update is
(lora_alpha / r) B A, as in jaxformer.finetune.lora (alpha / sqrt(r) with use_rslora).

Llama: the module paths are ours with a "model." prefix. GPT-2: o/up/down map to the Conv1D
modules attn.c_proj / mlp.c_fc / mlp.c_proj (fan_in_fan_out: PEFT transposes the update, the
factors keep the [r, in] / [out, r] layout); q, k and v share the fused attn.c_attn [3D, D], so
their adapters are written as one of rank m*r (m of q/k/v adapted): A = [A_q; A_k; A_v] and B
block-diagonal, which gives exactly each part's update (rank_pattern / alpha_pattern hold the
fused module's rank and the alpha that keeps the scale).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxformer.finetune.lora import LoRALinear, lora_modules, lora_scaling, module_at

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
GPT2_MODULES = {"self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
GPT2_QKV = ("q_proj", "k_proj", "v_proj")


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x[...]))


def _hf_modules(model: nnx.Module) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(HF module path, A [r, in], B [out, r], scaling) per adapted Hugging Face module."""
    cfg = model.config
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to export")
    family = cfg.family
    if family == "llama":
        return [(f"model.{name}", _np(m.lora_A.weight), _np(m.lora_B.weight), m.scaling) for name, m in mods]
    if family != "gpt2":
        raise ValueError("PEFT export needs a GPT-2 or Llama family model (the Hugging Face architectures "
                         "jaxformer exports); this config is neither")
    out, by_name = [], dict(mods)
    for i in range(cfg.n_layers):
        qkv = [(j, by_name[f"layers.{i}.self_attn.{p}"]) for j, p in enumerate(GPT2_QKV)
               if f"layers.{i}.self_attn.{p}" in by_name]
        if qkv:
            D = cfg.d_model
            scales = {m.scaling for _, m in qkv}
            if len(scales) > 1:
                raise ValueError(f"layer {i}: q/k/v adapters with different scales cannot share GPT-2's fused c_attn")
            a = np.concatenate([_np(m.lora_A.weight) for _, m in qkv], axis=0)  # [m*r, D]
            b = np.zeros((3 * D, a.shape[0]), a.dtype)
            col = 0
            for j, m in qkv:
                r = m.lora_A.weight.shape[0]
                b[j * D:(j + 1) * D, col:col + r] = _np(m.lora_B.weight)
                col += r
            out.append((f"transformer.h.{i}.attn.c_attn", a, b, scales.pop()))
        for ours, theirs in GPT2_MODULES.items():
            m = by_name.get(f"layers.{i}.{ours}")
            if m is not None:
                out.append((f"transformer.h.{i}.{theirs}", _np(m.lora_A.weight), _np(m.lora_B.weight), m.scaling))
    return out


def save_peft(model: nnx.Module, path: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT directory (the base weights are not written)."""
    from safetensors.numpy import save_file

    modules = _hf_modules(model)
    lora = [m for _, m in lora_modules(model)]
    rslora = {m.rslora for m in lora}
    if len(rslora) > 1:
        raise ValueError("adapters mixing rsLoRA and plain LoRA scaling cannot share one PEFT config")
    rslora = rslora.pop()
    rank, alpha = lora[0].rank, lora[0].alpha
    rank_pattern, alpha_pattern = {}, {}
    for name, a, _, scale in modules:
        r = a.shape[0]
        if r != rank or not math.isclose(scale, lora_scaling(rank, alpha, rslora), rel_tol=1e-9):
            rank_pattern[name] = r
            alpha_pattern[name] = scale * (math.sqrt(r) if rslora else r)  # alpha that gives this scale
    targets = sorted({".".join(name.split(".")[-2:]) if model.config.family == "gpt2" else name.split(".")[-1]
                      for name, *_ in modules})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": lora[0].dropout, "use_rslora": rslora,
        "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": model.config.family == "gpt2", "bias": "none", "modules_to_save": None,
        "init_lora_weights": True, "use_dora": False, "inference_mode": True, "revision": None,
        "layers_to_transform": None, "layers_pattern": None,
    }
    weights = {}
    for name, a, b, _ in modules:
        weights[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a)
        weights[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(weights, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def _pattern(patterns: dict, name: str, default):
    """A rank_pattern / alpha_pattern entry for module `name` (keys are regexes over the module path)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):  # as peft.utils.other.get_pattern_key
            return value
    return default


def load_peft(model: nnx.Module, path: str | Path, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Attach the PEFT adapter in `path` to a jaxformer model without adapters (in place; returns it)."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no {CONFIG_FILE}: not a PEFT adapter directory")
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={config.get('peft_type')!r}; jaxformer loads LORA adapters only")
    if config.get("use_dora") or config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ValueError(f"{path}: DoRA, trained biases and modules_to_save are not supported")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge them first")
    weights = {k.removeprefix(PREFIX): v for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
    names = sorted({k.rsplit(".lora_", 1)[0] for k in weights if ".lora_A." in k})
    family = model.config.family
    rngs = rngs or nnx.Rngs(0)
    rslora, dropout = bool(config.get("use_rslora", False)), float(config.get("lora_dropout", 0.0))
    for hf_name in names:
        a = weights[f"{hf_name}.lora_A.weight"]
        b = weights[f"{hf_name}.lora_B.weight"]
        r = int(_pattern(config.get("rank_pattern"), hf_name, config["r"]))
        alpha = float(_pattern(config.get("alpha_pattern"), hf_name, config["lora_alpha"]))
        if a.shape[0] != r:
            raise ValueError(f"{path}: {hf_name} has rank {a.shape[0]} but the config says {r}")
        for ours, b_part in _our_modules(hf_name, b, family, model.config):
            lin = module_at(model, _path(ours))
            lora = LoRALinear(lin, rank=r, alpha=alpha, dropout=dropout, rslora=rslora, rngs=rngs)
            if lora.lora_A.weight.shape != a.shape or lora.lora_B.weight.shape != b_part.shape:
                raise ValueError(f"{path}: {hf_name} adapter shapes {a.shape}, {b_part.shape} do not fit {ours} "
                                 f"({lin.weight.shape})")
            lora.lora_A.weight.set_value(np.asarray(a, lora.lora_A.weight.dtype))
            lora.lora_B.weight.set_value(np.asarray(b_part, lora.lora_B.weight.dtype))
            p = _path(ours)
            setattr(module_at(model, p[:-1]), p[-1], lora)
    return model


def _path(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _our_modules(hf_name: str, b: np.ndarray, family: str | None, cfg) -> list[tuple[str, np.ndarray]]:
    """jaxformer module(s) for one PEFT module, with the rows of B that belong to each."""
    if family == "llama":
        if not hf_name.startswith("model.layers."):
            raise ValueError(f"PEFT module {hf_name} is not a projection of a Llama block")
        return [(hf_name.removeprefix("model."), b)]
    if family == "gpt2":
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)", hf_name)
        if not m:
            raise ValueError(f"PEFT module {hf_name} is not a projection of a GPT-2 block")
        i, mod = m[1], m[2]
        if mod == "attn.c_attn":  # every part sees all of A; its rows of B select its output
            D = cfg.d_model
            return [(f"layers.{i}.self_attn.{p}", b[j * D:(j + 1) * D]) for j, p in enumerate(GPT2_QKV)
                    if np.any(b[j * D:(j + 1) * D])] or [(f"layers.{i}.self_attn.q_proj", b[:D])]
        ours = {v: k for k, v in GPT2_MODULES.items()}[mod]
        return [(f"layers.{i}.{ours}", b)]
    raise ValueError("PEFT adapters load onto GPT-2 or Llama family models only")
