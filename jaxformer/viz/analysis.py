"""The numbers behind the figures, computed by the model's own modules from its captured residual stream.

    trace = capture(model, tokens)                # the decoder's `capture`: embed_tokens, layers.{i}, norm
    attention_probs(model, trace, positions)      # [L, B, N, T, T]: each layer's softmax, as its attention sees it
    logit_lens(model, trace)                      # the final norm and head applied after every layer
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.models.attention import make_mask
from jaxformer.models.decoder import DecoderLM, rope_for, rope_tables
from jaxformer.models.layers import apply_rope, rope_inv_freq

NEG_INF = -1e30


def capture(model: DecoderLM, tokens: np.ndarray) -> tuple[dict[str, jax.Array], jax.Array]:
    """(residual stream {name: [B, T, D]} in forward order, logits [B, T, V]) of tokens [B, T]."""
    hidden: dict[str, jax.Array] = {}
    logits = model(jnp.asarray(tokens, jnp.int32), capture=hidden)
    return hidden, logits


def block_inputs(model: DecoderLM, hidden: dict[str, jax.Array]) -> list[jax.Array]:
    """What each block reads: the embedding for block 0, block i-1's output for block i."""
    return [hidden["embed_tokens"]] + [hidden[f"layers.{i}"] for i in range(len(model.layers) - 1)]


def attention_probs(model: DecoderLM, hidden: dict[str, jax.Array], positions: jax.Array) -> np.ndarray:
    """Each layer's attention weights [L, B, N, T, T] (float32), recomputed from its input as Attention computes
    them: the block's input norm, q/k projections (and q/k norms), RoPE, scale, soft-cap, causal/window mask."""
    ropes = rope_tables(model.config, positions)
    out = []
    for layer, x in zip(model.layers, block_inputs(model, hidden)):
        attn = layer.self_attn
        h = x if layer.input_layernorm is None else layer.input_layernorm(x)  # OLMo 2's post-norm blocks: x itself
        q, (k, _) = attn.project_q(h), attn.project_kv(h)  # [B, T, N, H], [B, T, K, H]
        rope = rope_for(layer, ropes)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k = jnp.repeat(k, attn.n_heads // attn.n_kv_heads, axis=2)  # GQA: each kv head serves N / K query heads
        scores = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) * attn.scale
        if attn.softcap is not None:
            scores = attn.softcap * jnp.tanh(scores / attn.softcap)
        T = x.shape[1]
        mask = make_mask(T, T, causal=attn.causal, segment_ids=None, window=attn.window)  # [1, T, T]
        scores = jnp.where(mask[:, None], scores, NEG_INF)
        out.append(jax.nn.softmax(scores, axis=-1))  # [B, N, T, T]
    return np.asarray(jnp.stack(out))


def lens_logits(model: DecoderLM, x: jax.Array) -> jax.Array:
    """The model's final norm and output head (and soft-cap) applied to a residual stream [B, T, D]."""
    h = model.norm(x)
    logits = (model.embed_tokens.attend(h) if model.lm_head is None else model.lm_head(h)).astype(jnp.float32)
    cap = model.config.final_logit_softcap
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def logit_lens(model: DecoderLM, hidden: dict[str, jax.Array]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(stage names, top token ids [S, B, T], their probabilities [S, B, T]) after the embedding and each block
    (nostalgebraist 2020, "interpreting GPT: the logit lens"); the last stage is the model's own prediction."""
    names = ["embed_tokens"] + [f"layers.{i}" for i in range(len(model.layers))]
    probs = [jax.nn.softmax(lens_logits(model, hidden[n]), axis=-1) for n in names]  # S x [B, T, V]
    return names, np.stack([np.asarray(p.argmax(-1)) for p in probs]), np.stack([np.asarray(p.max(-1)) for p in probs])


def residual_norms(hidden: dict[str, jax.Array]) -> tuple[list[str], np.ndarray]:
    """(stage names, L2 norm of every position's residual vector [S, B, T])."""
    return list(hidden), np.stack([np.linalg.norm(np.asarray(v, np.float32), axis=-1) for v in hidden.values()])


def rope_frequencies(cfg, seq_len: int) -> dict[str, np.ndarray]:
    """RoPE's rotation frequencies [H/2] (radians per position): first those of full-attention layers (scaled as
    the config says), then the unscaled base and the sliding layers' own base where they differ."""
    freq = lambda theta, scaling: np.asarray(rope_inv_freq(cfg.head_dim, theta, scaling, cfg.max_seq_len,  # noqa: E731
                                                           seq_len)[0])
    scaled = "" if cfg.rope_scaling is None else f", {cfg.rope_scaling.rope_type} scaling"
    out = {f"full layers (base {cfg.rope_theta:g}{scaled})": freq(cfg.rope_theta, cfg.rope_scaling)}
    if cfg.rope_scaling is not None:
        out["without scaling"] = freq(cfg.rope_theta, None)
    if cfg.rope_local_theta is not None:
        out[f"sliding layers (base {cfg.rope_local_theta:g})"] = freq(cfg.rope_local_theta, None)
    return out
