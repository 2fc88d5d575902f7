"""Weight-only quantization for inference: quantize a model, save / load it, and measure what it costs.

    qmodel = quantize(model)                          # int8, one scale per output channel
    qmodel = quantize(model, bits=4, group_size=64)   # int4, asymmetric, one scale and zero per 64 inputs
    save_quantized(qmodel, "out/", tokenizer_from=src); load_model("out/")   # or interop.auto.load_any

Every Linear and the token embedding (a tied LM head is read in full every token) are quantized; norms,
biases and position tables stay float. The matmuls read the narrow weights and widen them inside the
fused dot (XLA:CPU) or in registers (the Pallas kernel on GPUs): jaxformer.models.quant. `report`
measures memory, held-out perplexity, greedy agreement and logits against a plain-jnp dequantized
reference, and the cost of an int8 KV cache.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.data.shards import open_split
from jaxformer.data.tokenizer import copy_tokenizer_files, tokenizer_candidates
from jaxformer.interop.auto import load_any
from jaxformer.interop.quantized import load_quantized, quantization_of
from jaxformer.interop.quantized import save_quantized as _save_dir
from jaxformer.models import DecoderLM
from jaxformer.models.cache import KVCache
from jaxformer.models.quant import QuantSpec, quantize_int8
from jaxformer.models.quant_layers import (QuantEmbed, QuantLinear, dequantized_model, is_quantized, quant_spec_of,
                                           quantize_model)

__all__ = ["QuantEmbed", "QuantLinear", "QuantSpec", "dequantized_model", "is_quantized", "load_model",
           "load_quantized", "perplexity", "quantization_of", "quantize", "quantize_weight", "report",
           "save_quantized", "top1_agreement", "weight_bytes"]

quantize_weight = quantize_int8  # W [out, in] -> (int8 [out, in], float32 scale [out])


def quantize(model: DecoderLM, bits: int = 8, group_size: int | None = None, *, embeddings: bool = True,
             impl: str = "auto") -> DecoderLM:
    """A quantized copy of `model` (the original is left as it was); int4 groups default to 64 inputs."""
    return quantize_model(model, QuantSpec.of(bits, group_size, embeddings), impl)


def save_quantized(model: DecoderLM, path: str | Path, *, tokenizer_from: str | Path | None = None) -> Path:
    """Write a quantized model as a jaxformer directory (config.json carries "quantization"), with the
    tokenizer found beside `tokenizer_from` when there is one."""
    path = _save_dir(model, path)
    if tokenizer_from is not None:
        found = next((p for p in tokenizer_candidates(tokenizer_from) if p.is_file()), None)
        if found is not None:
            copy_tokenizer_files(found.parent, path)
    return path


def load_model(src: str | Path, *, quantize_to: str | None = None, group_size: int | None = None,
               **config_overrides) -> DecoderLM:
    """Any checkpoint jaxformer reads (a quantized directory included); quantize_to "int8" / "int4" on load."""
    bits = {None: None, "int8": 8, "int4": 4}.get(quantize_to, 0)
    if bits == 0:
        raise ValueError(f"quantize={quantize_to!r} is not supported; choose int8 or int4")
    model = load_any(src, **config_overrides)
    if bits is None or is_quantized(model):
        if bits is not None and quant_spec_of(model).bits != bits:
            raise ValueError(f"{src} is already quantized to int{quant_spec_of(model).bits}; load it without "
                             f"quantize={quantize_to!r}, or quantize its float checkpoint")
        return model
    return quantize(model, bits, group_size)


def weight_bytes(model: nnx.Module) -> dict[str, int]:
    """Bytes of all parameters, and of the quantizable ones (linear layers and the token table)."""
    total = narrow = 0
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(v[...].size) * v[...].dtype.itemsize
        total += n
        if any(str(p).endswith("_proj") or p in ("lm_head", "embed_tokens") for p in path):
            narrow += n
    return {"total": total, "linear": narrow}


def decode_bytes_per_token(model: nnx.Module) -> int:
    """Weight bytes one decode step reads: every parameter except the rows of embedding tables it does not
    look up (all of the token table when it is also the LM head)."""
    total = 0
    cfg = model.config
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(v[...].size) * v[...].dtype.itemsize
        if path[0] == "embed_positions" or (path[0] == "embed_tokens" and not cfg.tie_embeddings):
            n = n // v[...].shape[0] if v[...].ndim == 2 else 0  # one row (int4 scale/zero rows likewise)
        total += n
    return total


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


@nnx.jit(static_argnames=("kv_dtype",))
def _logits(model, tokens, kv_dtype=None):
    if kv_dtype is None:
        return model(tokens)
    # through the cache: every query attends to keys / values stored (and read back) as kv_dtype
    cache = KVCache.init(model.config, tokens.shape[0], tokens.shape[1], dtype=kv_dtype)
    return model.extend(tokens, cache).logits


def perplexity(model: nnx.Module, windows: np.ndarray, batch_size: int = 8, *, kv_dtype: str | None = None) -> float:
    """exp(mean next-token cross-entropy) over windows [N, T + 1] (inputs [:, :-1], targets [:, 1:]);
    with kv_dtype ("int8") the attention reads keys and values from a cache of that type."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = jnp.asarray(windows[i:i + batch_size])
        logp = jax.nn.log_softmax(_logits(model, w[:, :-1], kv_dtype), axis=-1)
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


@nnx.jit
def _decode_logits(model, tokens):  # [B, T] -> [B, T, V]: one token a step through the KV cache, as decoding runs
    def step(cache, tok):  # tok [B]
        out = model.extend(tok[:, None], cache)
        return out.cache, out.logits[:, 0]

    _, logits = jax.lax.scan(step, KVCache.init(model.config, *tokens.shape), tokens.T)
    return logits.transpose(1, 0, 2)


def logits_error(qmodel: DecoderLM, tokens: np.ndarray) -> float:
    """max |quantized logits - reference logits| / max |reference logits| on tokens [B, T]: the quantized model
    decodes them one at a time (its decode-path matmuls), the reference is the dequantized float model."""
    tokens = jnp.asarray(tokens)
    ref = _logits(dequantized_model(qmodel), tokens)
    return float(jnp.abs(_decode_logits(qmodel, tokens) - ref).max() / jnp.abs(ref).max())


def report(fp: DecoderLM, qmodel: DecoderLM, *, data_dir: str | Path | None = None, seq_len: int | None = None,
           windows: int = 32, tokens: np.ndarray | None = None) -> dict:
    """Weight memory and bytes read per decoded token of both models; with held-out data (the val split of
    shards in `data_dir`, or `tokens` windows [N, T + 1]) both perplexities, greedy agreement, the logits'
    error against the dequantized reference, and the perplexity with an int8 KV cache."""
    name = f"int{quant_spec_of(qmodel).bits}"
    mem_a, mem_b = weight_bytes(fp), weight_bytes(qmodel)
    out = {"method": quant_spec_of(qmodel).to_dict(), "weight_bytes_fp32": mem_a["total"],
           f"weight_bytes_{name}": mem_b["total"], "linear_bytes_fp32": mem_a["linear"],
           f"linear_bytes_{name}": mem_b["linear"], "weight_memory_ratio": mem_b["total"] / mem_a["total"],
           "decode_bytes_per_token_fp32": decode_bytes_per_token(fp),
           f"decode_bytes_per_token_{name}": decode_bytes_per_token(qmodel)}
    if tokens is None and data_dir is not None:
        seq_len = min(seq_len or fp.config.max_seq_len, fp.config.max_seq_len)
        tokens = held_out_windows(data_dir, seq_len=seq_len, n=windows)
    if tokens is not None:
        w = np.asarray(tokens, np.int32)
        ppl_a, ppl_b = perplexity(fp, w), perplexity(qmodel, w)
        ppl_kv = perplexity(fp, w, kv_dtype="int8")
        out.update(eval_tokens=int(w[:, 1:].size), ppl_fp32=ppl_a, **{f"ppl_{name}": ppl_b},
                   ppl_increase=ppl_b / ppl_a - 1.0, greedy_agreement=top1_agreement(fp, qmodel, w),
                   logits_error_vs_dequantized=logits_error(qmodel, w[:2, :min(w.shape[1] - 1, 64)]),
                   ppl_fp32_kv_int8=ppl_kv, kv_int8_ppl_increase=ppl_kv / ppl_a - 1.0)
    return out


# ----------------------------------------------------------------------------- what XLA made of it

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\]")


def hlo_weight_reads(hlo: str, model: nnx.Module) -> dict:
    """How an optimized HLO module (e.g. Engine.decode_hlo()) reads `model`'s quantized weights.

    narrow_dot_fusions: fusions holding a dot whose operands include an int8 / uint8 parameter (the widening
    happens inside the dot's loop). widened_weight_copies: float arrays, outside any fusion, shaped like a
    quantized weight (or its transpose, or int4's unpacked forms): materialised float copies.
    """
    shapes = set()  # a weight's float forms: [n, k], [k, n], and int4's unpacked [2h, Kp] and [2h, groups, G]
    for _, m in nnx.iter_modules(model):
        if isinstance(m, (QuantLinear, QuantEmbed)):
            shapes |= {(m.n, m.k), (m.k, m.n)}
            if m.bits == 4:
                (h, kp), groups = m.weight[...].shape, m.group_scale[...].shape[1]
                shapes |= {(2 * h, kp), (kp, 2 * h), (2 * h, groups, kp // groups)}
    blocks, name = {}, None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            name = head.group(1)
            blocks[name] = []
        elif name is not None:
            blocks[name].append(line)
    fused = set(re.findall(r"fusion\(.*?calls=%?([\w.\-]+)", hlo))
    narrow = sum(1 for n in fused if n in blocks and any(" dot(" in ln for ln in blocks[n])
                 and any(re.search(r"= (s8|u8)\[[\d,]+\]\S* parameter\(", ln) for ln in blocks[n]))
    widened = 0
    for n, lines in blocks.items():
        if n in fused:
            continue
        for ln in lines:
            inst = _INSTRUCTION.match(ln)
            if inst and inst.group(1) in ("f32", "bf16", "f16") and inst.group(2):
                widened += tuple(int(d) for d in inst.group(2).split(",")) in shapes
    return {"narrow_dot_fusions": narrow, "widened_weight_copies": widened}
