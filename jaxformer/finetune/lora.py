"""LoRA (Hu et al. 2021, arXiv:2106.09685) for jaxformer models: adapters, trainable split, merge.

A targeted projection W [out, in] becomes y = x W^T + b + s * dropout(x) A^T B^T with A [r, in],
B [out, r] and s = alpha / r (alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023). A starts
uniform in +-1/sqrt(in) (PEFT's kaiming_uniform(a=sqrt(5))), B at zero: the adapted model starts
equal to its base. Parameter paths follow PEFT: `layers.{i}.self_attn.q_proj.lora_A.weight`, so the
PEFT export (jaxformer.finetune.peft) is a rename. The adapters are `nnx.LoRAParam`s: the train
step differentiates and optimizes only them, the base is passed in frozen.

Adapters carry logical axes derived from their base weight's: A (None, in_axis), B (out_axis, None),
so a column-parallel q_proj ("heads", "embed") gets A FSDP-split over "embed" and B tensor-split
over "heads", exactly like the base weight's rows and columns.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.interop.state_dict import from_state_dict, to_numpy_state_dict
from jaxformer.models.layers import Linear, project

# short names users write -> the projection attribute they mean
TARGET_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                "up": "up_proj", "down": "down_proj",
                # latent attention's (DeepSeek-V3): the query bottleneck and the latent's down/up projections
                "q_a": "q_a_proj", "q_b": "q_b_proj", "kv_a": "kv_a_proj_with_mqa", "kv_b": "kv_b_proj",
                # Gated DeltaNet's (linear_attn: Qwen3.5, Qwen3-Next): q/k/v into the conv, the output gate z, the
                # per-head write strength b (beta) and decay input a; short convolution's (conv: LFM2): in_proj
                # (b, c, x); both mixers' output projection out_proj
                "in_qkv": "in_proj_qkv", "in_z": "in_proj_z", "in_b": "in_proj_b", "in_a": "in_proj_a",
                "in": "in_proj", "out": "out_proj"}
ALL_TARGETS = tuple(TARGET_NAMES)
# the default: every mixer's input and output projections (as q k v o) and the MLP's. Not in_b / in_a: one row per
# value head (beta and the decay's input), rank r would be near full rank there, and like MoE routers they are
# gates whose small changes move the recurrent state a lot; name them to adapt them
DEFAULT_TARGETS = tuple(t for t in ALL_TARGETS if t not in ("in_b", "in_a"))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters, their rank, scale and dropout."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # any of ALL_TARGETS (or the attribute names: q_proj, in_proj_qkv, ...)
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank

    def __post_init__(self) -> None:
        if isinstance(self.targets, (str, list)):
            t = [x.strip() for x in self.targets.split(",")] if isinstance(self.targets, str) else self.targets
            object.__setattr__(self, "targets", tuple(t))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError(f"lora.targets is empty; choose from {list(ALL_TARGETS)}")
        bad = [t for t in self.targets if t not in TARGET_NAMES and t not in TARGET_NAMES.values()]
        if bad:
            raise ValueError(f"unknown lora.targets {bad}; choose from {list(ALL_TARGETS)}")

    @property
    def modules(self) -> tuple[str, ...]:
        """Attribute names of the targeted projections (q_proj, ...)."""
        return tuple(dict.fromkeys(TARGET_NAMES.get(t, t) for t in self.targets))

    @property
    def scaling(self) -> float:
        return lora_scaling(self.rank, self.alpha, self.rslora)


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


class LoRADropoutKey(nnx.Variable):
    """Raw PRNG key data (uint32 [2]) of one adapter's dropout; the trainer folds in the step number."""


class _Adapter(nnx.Module):
    """One low-rank factor; `weight` is an nnx.LoRAParam (the only trainable leaves under LoRA)."""

    def __init__(self, value: jax.Array, axes: tuple[str | None, str | None]):
        self.weight = nnx.LoRAParam(value, logical_axes=axes)


class LoRALinear(nnx.Module):
    """A Linear (weight [out, in], bias) plus a low-rank update s * B A; the base stays as it was."""

    def __init__(self, base: Linear, *, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 rngs: nnx.Rngs):
        d_out, d_in = base.weight.shape
        out_axis, in_axis = base.weight.get_metadata().get("logical_axes") or (None, None)
        dtype = base.weight[...].dtype
        self.weight, self.bias, self.compute_dtype = base.weight, base.bias, base.compute_dtype
        bound = 1.0 / math.sqrt(d_in)
        key = rngs.params()  # one draw per adapter: A does not depend on whether dropout is on
        a = jax.random.uniform(key, (rank, d_in), jnp.float32, -bound, bound).astype(dtype)
        self.lora_A = _Adapter(a, (None, in_axis))  # [r, in]
        self.lora_B = _Adapter(jnp.zeros((d_out, rank), dtype), (out_axis, None))  # [out, r]
        self.rank, self.alpha, self.rslora = rank, float(alpha), rslora
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.dropout = float(dropout)
        self.dropout_key = (LoRADropoutKey(jax.random.key_data(jax.random.fold_in(key, 1))) if dropout > 0 else None)
        self.deterministic = False  # True: no dropout (evaluation, inference)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        cd = self.compute_dtype
        x = x.astype(cd)
        y = project(x, self.weight[...].astype(cd))
        if self.bias is not None:
            y = y + self.bias[...].astype(cd)
        h = x
        if self.dropout_key is not None and not self.deterministic:
            keep = jax.random.bernoulli(jax.random.wrap_key_data(self.dropout_key[...]), 1.0 - self.dropout, x.shape)
            h = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros((), cd))
        a = project(h, self.lora_A.weight[...].astype(cd))  # [..., r]
        return y + project(a, self.lora_B.weight[...].astype(cd)) * jnp.asarray(self.scaling, cd)

    def dense_weight(self) -> jax.Array:
        """W + s B A [out, in] in the compute dtype: the matrix this projection applies without dropout."""
        return (self.weight[...].astype(jnp.float32) + self.delta()).astype(self.compute_dtype)

    def delta(self) -> jax.Array:
        """s * B @ A [out, in] in float32: what merging adds to the base weight."""
        a = self.lora_A.weight[...].astype(jnp.float32)
        b = self.lora_B.weight[...].astype(jnp.float32)
        return self.scaling * (b @ a)


def module_at(model: nnx.Module, path: Sequence[Any]) -> nnx.Module:
    """The submodule at an attribute path such as ("layers", 0, "self_attn")."""
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def apply_lora(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Wrap the targeted projections of every block in LoRALinear (in place; returns `model`)."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge them first (jaxformer.finetune.merge_lora)")
    targets = [(path, m) for path, m in nnx.iter_modules(model)
               if isinstance(m, Linear) and path and path[0] == "layers" and path[-1] in cfg.modules]
    if not targets:
        raise ValueError(f"no projection named {list(cfg.modules)} in the model's blocks (a GPT-2 family model "
                         "has no gate_proj)")
    for path, lin in targets:
        lora = LoRALinear(lin, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora, rngs=rngs)
        setattr(module_at(model, path[:-1]), path[-1], lora)
    return model


def lora_modules(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    """(dotted path, module) of every adapted projection, in model order."""
    return [(".".join(map(str, p)), m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]


def set_dropout(model: nnx.Module, enabled: bool) -> nnx.Module:
    """Turn LoRA dropout on (training) or off (evaluation, inference) in place."""
    for _, m in lora_modules(model):
        m.deterministic = not enabled
    return model


def split_trainable(model: nnx.Module, method: str) -> tuple[nnx.GraphDef, nnx.State, tuple[nnx.State, ...]]:
    """(graphdef, trainable params, frozen states) for method "lora" (adapters only) or "full" (all Params).

    The frozen tuple is (dropout keys, everything else): what make_train_step takes as `frozen`.
    """
    if method == "lora":
        graphdef, params, keys, rest = nnx.split(model, nnx.LoRAParam, LoRADropoutKey, ...)
    elif method == "full":
        graphdef, params, keys, rest = nnx.split(model, nnx.Param, LoRADropoutKey, ...)
    else:
        raise ValueError(f"fine-tuning method {method!r} is not supported; choose lora or full")
    return graphdef, params, (keys, rest)


def step_dropout_keys(keys: nnx.State, step: jax.Array) -> nnx.State:
    """Each adapter's dropout key for one optimizer step: fold_in(its key, step)."""
    return jax.tree.map(lambda k: jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k), step)), keys)


def merge_lora(model: nnx.Module):
    """A plain DecoderLM whose projections hold W + s * B A (exports to Hugging Face / torch like any model)."""
    sd = to_numpy_state_dict(model)
    for name, m in lora_modules(model):
        w = sd[f"{name}.weight"]
        sd[f"{name}.weight"] = (w.astype(np.float32) + np.asarray(jax.device_get(m.delta()))).astype(w.dtype)
        del sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"]
    return from_state_dict(model.config, sd, source="the merged LoRA model")


def _nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def trainable_report(model: nnx.Module, trainable: nnx.State, tx) -> dict[str, float]:
    """Trainable parameters and optimizer-state bytes, against full fine-tuning of the same base."""
    base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    total = _count(base) + _count(nnx.state(model, nnx.LoRAParam))
    n = _count(trainable)
    return {"trainable_params": n, "total_params": total, "trainable_fraction": n / total,
            "optimizer_bytes": _nbytes(jax.eval_shape(tx.init, trainable)),
            "full_finetune_trainable_params": _count(base),
            "full_finetune_optimizer_bytes": _nbytes(jax.eval_shape(tx.init, base))}
