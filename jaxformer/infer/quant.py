"""int8 weight-only quantization of the linear layers (per output channel, symmetric).

Each Linear weight W [out, in] becomes q = round(W / s) clipped to [-127, 127] (int8) with one
float32 scale per output row, s = max|W_row| / 127; y = (x @ q^T) * s + b. Embeddings and norms
stay in their dtype (a tied LM head is the embedding, so it stays too). Parameter names are
kept: `...q_proj.weight` holds int8, `...q_proj.scale` sits beside it.

Saved models are jaxformer directories whose config.json adds "quantization"; `load_model`
opens them (and any other checkpoint, quantizing on load when asked).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.data.shards import open_split
from jaxformer.data.tokenizer import copy_tokenizer_files, tokenizer_candidates
from jaxformer.interop.auto import load_any
from jaxformer.interop.native import FORMAT, WEIGHTS
from jaxformer.interop.state_dict import check_shapes, param_shapes, to_numpy_state_dict
from jaxformer.models import DecoderLM
from jaxformer.models.layers import Linear

METHOD = {"method": "int8-weight-only", "granularity": "per-output-channel", "symmetric": True}


def quantize_weight(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """W [out, in] -> (int8 [out, in], float32 scale [out]) with W ~= q * scale[:, None]."""
    w = w.astype(jnp.float32)
    amax = jnp.abs(w).max(axis=1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale[:, None]), -127, 127).astype(jnp.int8)
    return q, scale


class QuantLinear(nnx.Module):
    """y = (x @ weight^T) * scale + bias with weight int8 [out, in] and scale float32 [out]."""

    def __init__(self, weight: jax.Array, scale: jax.Array, bias: jax.Array | None, *,
                 axes: tuple[str | None, str | None] = (None, None), compute_dtype: str = "float32"):
        self.weight = nnx.Param(weight, logical_axes=axes)
        self.scale = nnx.Param(scale, logical_axes=axes[:1])
        self.bias = None if bias is None else nnx.Param(bias, logical_axes=axes[:1])
        self.compute_dtype = jnp.dtype(compute_dtype)

    @classmethod
    def from_linear(cls, lin: Linear) -> "QuantLinear":
        q, scale = quantize_weight(lin.weight[...])
        axes = lin.weight.get_metadata().get("logical_axes", (None, None))
        bias = None if lin.bias is None else lin.bias[...]
        return cls(q, scale, bias, axes=axes, compute_dtype=lin.compute_dtype.name)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        cd = self.compute_dtype
        y = jnp.einsum("...i,oi->...o", x.astype(cd), self.weight[...].astype(cd)) * self.scale[...].astype(cd)
        if self.bias is not None:
            y = y + self.bias[...].astype(cd)
        return y


def quantize(model: DecoderLM) -> DecoderLM:
    """A copy of `model` whose Linear layers are QuantLinear (the original is left as it was)."""
    model = nnx.clone(model)
    targets = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, Linear)]
    for path, lin in targets:
        parent = model
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        setattr(parent, path[-1], QuantLinear.from_linear(lin))
    return model


def is_quantized(model: nnx.Module) -> bool:
    return any(isinstance(m, QuantLinear) for _, m in nnx.iter_modules(model))


def weight_bytes(model: nnx.Module) -> dict[str, int]:
    """Bytes of all parameters and of the linear layers' parameters."""
    total = linear = 0
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(v[...].size) * v[...].dtype.itemsize
        total += n
        if path[-1] in ("weight", "scale", "bias") and any(str(p).endswith("_proj") or p == "lm_head" for p in path):
            linear += n
    return {"total": total, "linear": linear}


# ----------------------------------------------------------------------------- files

def save_quantized(model: DecoderLM, path: str | Path, *, tokenizer_from: str | Path | None = None) -> Path:
    """Write a quantized model as a jaxformer directory (config.json carries "quantization")."""
    from safetensors.numpy import save_file

    if not is_quantized(model):
        raise ValueError("the model is not quantized: call jaxformer.infer.quant.quantize(model) first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "model_config": json.dumps(model.config.to_dict()), "quantization": json.dumps(METHOD)}
    save_file(to_numpy_state_dict(model), str(path / WEIGHTS), metadata=meta)
    (path / "config.json").write_text(json.dumps({"format": FORMAT, "model": model.config.to_dict(),
                                                  "quantization": METHOD}, indent=2))
    if tokenizer_from is not None:
        found = next((p for p in tokenizer_candidates(tokenizer_from) if p.is_file()), None)
        if found is not None:
            copy_tokenizer_files(found.parent, path)
    return path


def quantization_of(path: str | Path) -> dict | None:
    """The "quantization" entry of a jaxformer directory's config.json, or None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except ValueError:
        return None
    return data.get("quantization") if isinstance(data, dict) and data.get("format") == FORMAT else None


def load_quantized(path: str | Path, **config_overrides) -> DecoderLM:
    """Read a directory written by save_quantized."""
    from safetensors.numpy import load_file

    path = Path(path)
    method = quantization_of(path)
    if method != METHOD:
        raise ValueError(f"{path} holds no {METHOD['method']} model (config.json quantization: {method!r})")
    cfg = ModelConfig.from_dict(json.loads((path / "config.json").read_text())["model"]).replace(**config_overrides)
    abstract = nnx.eval_shape(lambda: quantize(DecoderLM(cfg, rngs=nnx.Rngs(0))))
    weights = load_file(str(path / WEIGHTS))
    check_shapes(param_shapes(abstract), {k: v.shape for k, v in weights.items()}, str(path / WEIGHTS))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    for p, var in nnx.to_flat_state(params):
        var.set_value(jnp.asarray(weights[".".join(map(str, p))], dtype=var.dtype))
    return nnx.merge(graphdef, params, rest)


def load_model(src: str | Path, *, quantize_to: str | None = None, **config_overrides) -> DecoderLM:
    """Any checkpoint jaxformer reads (interop.auto.load_any) or a quantized directory; int8 on load if asked."""
    if quantize_to not in (None, "int8"):
        raise ValueError(f"quantize={quantize_to!r} is not supported; choose int8")
    if Path(src).is_dir() and quantization_of(src) is not None:
        return load_quantized(src, **config_overrides)
    model = load_any(src, **config_overrides)
    return quantize(model) if quantize_to == "int8" else model


# ----------------------------------------------------------------------------- quality report

def held_out_windows(data_dir: str | Path, *, seq_len: int, n: int = 32, split: str = "val") -> np.ndarray:
    """Up to n consecutive windows of seq_len + 1 tokens from a split's shards, int32 [n, seq_len + 1]."""
    need, parts = n * (seq_len + 1), []
    for shard in open_split(data_dir, split).shards:
        parts.append(np.asarray(shard[: need - sum(len(p) for p in parts)]))
        if sum(len(p) for p in parts) >= need:
            break
    ids = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    n = len(ids) // (seq_len + 1)
    if n == 0:  # a split shorter than one window: the whole split as one shorter window
        if len(ids) < 2:
            raise ValueError(f"the {split} split of {data_dir} has fewer than 2 tokens")
        return ids[None].astype(np.int32)
    return ids[: n * (seq_len + 1)].reshape(n, seq_len + 1).astype(np.int32)


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def perplexity(model: nnx.Module, windows: np.ndarray, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over windows [N, T + 1] (inputs [:, :-1], targets [:, 1:])."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = jnp.asarray(windows[i:i + batch_size])
        logp = jax.nn.log_softmax(_logits(model, w[:, :-1]), axis=-1)
        total += float(-jnp.take_along_axis(logp, w[:, 1:, None], axis=-1).sum())
        count += w[:, 1:].size
    return float(np.exp(total / count))


def top1_agreement(model_a: nnx.Module, model_b: nnx.Module, windows: np.ndarray, batch_size: int = 8) -> float:
    """Fraction of positions where both models' greedy (argmax) next token agree, teacher-forced on windows."""
    same = count = 0
    for i in range(0, len(windows), batch_size):
        w = jnp.asarray(windows[i:i + batch_size, :-1])
        same += int(jnp.sum(jnp.argmax(_logits(model_a, w), -1) == jnp.argmax(_logits(model_b, w), -1)))
        count += w.size
    return same / count


def report(fp32: DecoderLM, int8: DecoderLM, *, data_dir: str | Path | None = None, seq_len: int | None = None,
           windows: int = 32, tokens: np.ndarray | None = None) -> dict:
    """Weight memory of both models; with held-out data (the val split of shards in `data_dir`, or
    `tokens` windows [N, T + 1]), both perplexities and their greedy agreement."""
    mem_a, mem_b = weight_bytes(fp32), weight_bytes(int8)
    out = {"weight_bytes_fp32": mem_a["total"], "weight_bytes_int8": mem_b["total"],
           "linear_bytes_fp32": mem_a["linear"], "linear_bytes_int8": mem_b["linear"],
           "weight_memory_ratio": mem_b["total"] / mem_a["total"]}
    if tokens is None and data_dir is not None:
        seq_len = min(seq_len or fp32.config.max_seq_len, fp32.config.max_seq_len)
        tokens = held_out_windows(data_dir, seq_len=seq_len, n=windows)
    if tokens is not None:
        w = np.asarray(tokens, np.int32)
        ppl_a, ppl_b = perplexity(fp32, w), perplexity(int8, w)
        out.update(eval_tokens=int(w[:, 1:].size), ppl_fp32=ppl_a, ppl_int8=ppl_b, ppl_increase=ppl_b / ppl_a - 1.0,
                   greedy_agreement=top1_agreement(fp32, int8, w))
    return out
