"""LoRA adapters <-> Hugging Face PEFT directories (adapter_config.json + adapter_model.safetensors).

`save_peft` writes what `peft.PeftModel.from_pretrained(base, DIR)` loads onto the base exported
with jaxformer.save_hf; `load_peft` reads such a directory (ours or one peft wrote) onto a jaxformer
model. PEFT keys are the Hugging Face module path under "base_model.model." plus
".lora_A.weight" [r, in] / ".lora_B.weight" [out, r], and the update is
(lora_alpha / r) B A, as in jaxformer.finetune.lora (alpha / sqrt(r) with use_rslora).

Which Hugging Face module holds which of our projections is read off the family's own weight exporter
(`hf_projections`), so every family jaxformer exports works the same way:
  * a rename (Llama, Mistral, Qwen2/3, Gemma 1/2/3, OLMo 2: "model." + our path), with the factors as they are;
  * a fused module stacking several projections' rows (Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn):
    written as one adapter of rank m*r (m of its parts adapted), A = [A_1; ...; A_m] and B block-diagonal,
    which gives exactly each part's update; rank_pattern / alpha_pattern hold the fused module's rank and the
    alpha that keeps the scale. Loading splits B's rows back (and, for such a block-diagonal B, A's rows).
    A module interleaving its parts' rows (Qwen3-Next's in_proj_qkvz / in_proj_ba, per key head) takes B's rows
    in its own order (HFProjection.order): the same update, row for row;
  * a Conv1D stored [in, out] (GPT-2): fan_in_fan_out, PEFT transposes the update, the factors keep their layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxformer.finetune.lora import LoRALinear, lora_modules, lora_scaling, module_at
from jaxformer.interop.hf import family_of
from jaxformer.interop.state_dict import expected_shapes
from jaxformer.models.layers import Linear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
ROW_SHIFT, MODULE_SHIFT = 1, 31  # probe code = (module + 1) << 31 | row << 1 | column (two columns: 0, 1)


@dataclasses.dataclass(frozen=True)
class HFProjection:
    """One Hugging Face projection module and the rows of ours it stacks, in order."""

    name: str  # e.g. "model.layers.0.self_attn.qkv_proj"
    parts: tuple[tuple[str, int], ...]  # (our module path, its output rows), top to bottom
    fan_in_fan_out: bool  # stored [in, out] (a GPT-2 Conv1D)
    # the module's row i is row order[i] of the parts stacked top to bottom; None: in that order (a plain stack).
    # Qwen3-Next's in_proj_qkvz / in_proj_ba interleave their parts' rows per key head
    order: tuple[int, ...] | None = None

    def stacked(self, b: np.ndarray) -> np.ndarray:
        """B [module rows, r] -> its rows in the parts' stacked order."""
        if self.order is None:
            return b
        out = np.empty_like(b)
        out[list(self.order)] = b
        return out

    def interleaved(self, b: np.ndarray) -> np.ndarray:
        """The inverse of stacked: B in the parts' stacked order -> the module's row order."""
        return b if self.order is None else b[list(self.order)]


def _block_projections(model: nnx.Module) -> list[tuple[str, int]]:
    """(path, output rows) of every Linear (adapted or not) in the model's blocks."""
    return [(".".join(map(str, p)), m.weight.shape[0]) for p, m in nnx.iter_modules(model)
            if isinstance(m, (Linear, LoRALinear)) and p and p[0] == "layers"]


def hf_projections(model: nnx.Module) -> dict[str, HFProjection]:
    """{Hugging Face module path: HFProjection} for the model's family, read off the family's weight exporter.

    The exporter (interop.hf.family_of(cfg).to_hf: renames, row stacking, transposes) runs on a probe state dict
    whose block projections are int64 codes (module, row, column) [out, 2] and whose other weights are zeros;
    the arrays it returns say which of our rows each Hugging Face module holds and in which layout.
    """
    cfg = model.config
    family = family_of(cfg)
    ours = _block_projections(model)
    probe = {k: np.broadcast_to(np.int64(0), s) for k, s in expected_shapes(cfg).items()}
    for i, (name, rows) in enumerate(ours):
        r = np.arange(rows, dtype=np.int64)[:, None]
        probe[f"{name}.weight"] = (i + 1) << MODULE_SHIFT | r << ROW_SHIFT | np.arange(2, dtype=np.int64)[None, :]
    out: dict[str, HFProjection] = {}
    for key, w in family.to_hf(probe, cfg).items():
        if w.ndim != 2 or not np.any(w):
            continue
        normal = _is_probe(w)
        if not normal and not _is_probe(w.T):
            raise ValueError(f"{family.model_type} export mixes the rows of {key} in a way PEFT adapters cannot "
                             "follow (not a rename, row stack or transpose of jaxformer's projections)")
        code = (w if normal else w.T)[:, 0] >> ROW_SHIFT  # [rows of the Hugging Face module]
        module, row = (code >> (MODULE_SHIFT - ROW_SHIFT)) - 1, code & ((1 << (MODULE_SHIFT - ROW_SHIFT)) - 1)
        if np.any(module < 0):
            raise ValueError(f"{family.model_type} export of {key} holds rows of no jaxformer projection")
        first = sorted(np.unique(module, return_index=True)[1])  # each module's first row: the parts in order
        parts = tuple(ours[int(module[j])] for j in first)
        offset = dict(zip((int(module[j]) for j in first), np.cumsum([0] + [rows for _, rows in parts])))
        for m, (_, rows) in zip((int(module[j]) for j in first), parts):
            if not np.array_equal(np.sort(row[module == m]), np.arange(rows)):
                raise ValueError(f"{family.model_type} export of {key} does not hold whole projections")
        order = np.asarray([offset[int(m)] for m in module]) + row  # [module rows] -> stacked row
        plain = np.array_equal(order, np.arange(len(order)))
        out[key.removesuffix(".weight")] = HFProjection(key.removesuffix(".weight"), parts, not normal,
                                                        None if plain else tuple(int(i) for i in order))
    return out


def _is_probe(w: np.ndarray) -> bool:
    """True if w [rows, 2] holds probe codes laid out [out, in] (columns 0 and 1 of the same rows)."""
    return w.shape[1] == 2 and bool(np.all(w[:, 0] & 1 == 0) and np.all(w[:, 1] == w[:, 0] | 1))


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x[...]))


def _hf_modules(model: nnx.Module) -> tuple[list[tuple[str, np.ndarray, np.ndarray, float]], dict]:
    """((HF module path, A [r, in], B [out, r], scaling) per adapted Hugging Face module, the projections)."""
    mods = dict(lora_modules(model))
    if not mods:
        raise ValueError("the model has no LoRA adapters to export")
    projections = hf_projections(model)
    out, exported = [], set()
    for hf in projections.values():
        adapted = [(name, mods[name]) for name, _ in hf.parts if name in mods]
        if not adapted:
            continue
        if len(hf.parts) == 1:
            [(name, m)] = adapted
            out.append((hf.name, _np(m.lora_A.weight), hf.interleaved(_np(m.lora_B.weight)), m.scaling))
        else:  # one adapter for the fused module: A stacked, B block-diagonal
            scales = {m.scaling for _, m in adapted}
            if len(scales) > 1:
                raise ValueError(f"{hf.name} fuses {[n for n, _ in hf.parts]} into one Hugging Face module: their "
                                 f"adapters need one scale (lora alpha / rank), got {sorted(scales)}")
            a = np.concatenate([_np(m.lora_A.weight) for _, m in adapted], axis=0)  # [m*r, in]
            b = np.zeros((sum(rows for _, rows in hf.parts), a.shape[0]), a.dtype)  # [out, m*r]
            row, col = 0, 0
            for name, rows in hf.parts:
                if name in mods:
                    r = mods[name].rank
                    b[row:row + rows, col:col + r] = _np(mods[name].lora_B.weight)
                    col += r
                row += rows
            out.append((hf.name, a, hf.interleaved(b), scales.pop()))
        exported.update(name for name, _ in adapted)
    missing = sorted(set(mods) - exported)
    if missing:
        raise ValueError(f"adapters on {missing} have no Hugging Face module in the {model.config.family} export")
    return out, projections


def _targets(names: list[str], projections: dict[str, HFProjection]) -> list[str]:
    """The shortest module-name suffixes that select exactly `names` among the family's projections."""
    for k in range(1, max(len(n.split(".")) for n in names) + 1):
        suffixes = {".".join(n.split(".")[-k:]) for n in names}
        chosen = {p for p in projections if any(p == s or p.endswith("." + s) for s in suffixes)}
        if chosen == set(names):
            return sorted(suffixes)
    return sorted(names)


def save_peft(model: nnx.Module, path: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT directory (the base weights are not written)."""
    from safetensors.numpy import save_file

    modules, projections = _hf_modules(model)
    lora = [m for _, m in lora_modules(model)]
    rslora = {m.rslora for m in lora}
    if len(rslora) > 1:
        raise ValueError("adapters mixing rsLoRA and plain LoRA scaling cannot share one PEFT config")
    rslora = rslora.pop()
    fan_in_fan_out = {projections[name].fan_in_fan_out for name, *_ in modules}
    if len(fan_in_fan_out) > 1:
        raise ValueError("PEFT's fan_in_fan_out is one setting: adapters on both [out, in] and [in, out] modules "
                         "cannot share one config")
    rank, alpha = lora[0].rank, lora[0].alpha
    targets = _targets([name for name, *_ in modules], projections)
    default = lora_scaling(rank, alpha, rslora)
    rank_pattern, alpha_pattern = {}, {}
    for target in targets:  # modules off (rank, scale): one pattern per target when its modules agree
        group = [(n, a.shape[0], s) for n, a, _, s in modules if n == target or n.endswith("." + target)]
        odd = [(n, r, s) for n, r, s in group if r != rank or not math.isclose(s, default, rel_tol=1e-9)]
        if odd and len({(r, s) for _, r, s in group}) == 1:
            odd = [(target, *odd[0][1:])]
        for key, r, s in odd:
            rank_pattern[key] = r
            alpha_pattern[key] = s * (math.sqrt(r) if rslora else r)  # the alpha that gives this scale
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "lora_dropout": lora[0].dropout, "use_rslora": rslora,
        "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": fan_in_fan_out.pop(), "bias": "none", "modules_to_save": None,
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
    projections = hf_projections(model)
    rngs = rngs or nnx.Rngs(0)
    rslora, dropout = bool(config.get("use_rslora", False)), float(config.get("lora_dropout", 0.0))
    for hf_name in names:
        if hf_name not in projections:
            raise ValueError(f"{path}: PEFT module {hf_name} is not a projection of this {model.config.family} "
                             f"model's blocks (they are e.g. {sorted(projections)[:4]})")
        a = weights[f"{hf_name}.lora_A.weight"]
        b = weights[f"{hf_name}.lora_B.weight"]
        r = int(_pattern(config.get("rank_pattern"), hf_name, config["r"]))
        alpha = float(_pattern(config.get("alpha_pattern"), hf_name, config["lora_alpha"]))
        if a.shape[0] != r:
            raise ValueError(f"{path}: {hf_name} has rank {a.shape[0]} but the config says {r}")
        scale = lora_scaling(r, alpha, rslora)
        for ours, cols, b_part in _split(projections[hf_name], b):
            lin = module_at(model, _path(ours))
            r_part = len(cols)  # a fused module's part may keep fewer of A's rows: the alpha keeps the scale
            alpha_part = alpha if r_part == r else scale * (math.sqrt(r_part) if rslora else r_part)
            lora = LoRALinear(lin, rank=r_part, alpha=alpha_part, dropout=dropout, rslora=rslora, rngs=rngs)
            a_part = a[cols]
            if lora.lora_A.weight.shape != a_part.shape or lora.lora_B.weight.shape != b_part.shape:
                raise ValueError(f"{path}: {hf_name} adapter shapes {a.shape}, {b.shape} do not fit {ours} "
                                 f"({lin.weight.shape})")
            lora.lora_A.weight.set_value(np.asarray(a_part, lora.lora_A.weight.dtype))
            lora.lora_B.weight.set_value(np.asarray(b_part, lora.lora_B.weight.dtype))
            p = _path(ours)
            setattr(module_at(model, p[:-1]), p[-1], lora)
    return model


def _split(hf: HFProjection, b: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(our module, the rows of A it takes, its B [rows, those]) for one PEFT adapter on `hf`.

    A plain module takes the whole adapter. A fused one splits B by rows: each part sees all of A, except
    that when the parts' nonzero columns of B are disjoint (the block-diagonal B save_peft writes) each
    part keeps only its own columns; parts whose rows of B are all zero get no adapter, unless all are.
    """
    every = np.arange(b.shape[1])
    if len(hf.parts) == 1 and hf.order is None:
        return [(hf.parts[0][0], every, b)]
    bounds = np.cumsum([0] + [rows for _, rows in hf.parts])
    if bounds[-1] != b.shape[0]:
        raise ValueError(f"PEFT module {hf.name}: lora_B has {b.shape[0]} rows, the module {bounds[-1]}")
    b = hf.stacked(b)
    if len(hf.parts) == 1:
        return [(hf.parts[0][0], every, b)]
    rows = [b[bounds[j]:bounds[j + 1]] for j in range(len(hf.parts))]
    cols = [np.flatnonzero(np.any(x != 0, axis=0)) for x in rows]
    if not any(len(c) for c in cols):  # an untrained adapter: every part, all of A
        return [(name, every, x) for (name, _), x in zip(hf.parts, rows)]
    disjoint = sum(len(c) for c in cols) == len(np.unique(np.concatenate(cols)))
    return [(name, c if disjoint else every, x[:, c] if disjoint else x)
            for (name, _), c, x in zip(hf.parts, cols, rows) if len(c)]


def _path(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]
