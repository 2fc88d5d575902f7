"""Next-token sampling (temperature, top-k, top-p) and a cache-free generation loop."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """One token id per row of logits [B, V]; temperature 0 is greedy."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate_uncached(model: nnx.Module, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                      stop_ids: Sequence[int] = ()) -> list[int]:
    """Continue `prompt` by re-running the full forward each step (no KV cache); returns new ids."""
    cfg = model.config
    P = len(prompt)
    if P == 0:
        raise ValueError("prompt is empty: give at least one token")
    if P >= cfg.max_seq_len:
        raise ValueError(f"prompt of {P} tokens leaves no room in the context of {cfg.max_seq_len}")
    total = min(cfg.max_seq_len, P + max_new_tokens)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, buf, key):
        m = nnx.merge(graphdef, state)

        def body(t, carry):
            buf, key = carry
            key, sub = jax.random.split(key)
            logits = jax.lax.dynamic_index_in_dim(m(buf), t - 1, axis=1, keepdims=False)  # [1, V]
            nxt = sample_logits(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
            return buf.at[:, t].set(nxt), key

        return jax.lax.fori_loop(P, total, body, (buf, key))[0]

    buf = jnp.zeros((1, total), jnp.int32).at[0, :P].set(jnp.asarray(prompt, jnp.int32))
    out = [int(t) for t in jax.device_get(run(state, buf, jax.random.key(seed)))[0, P:]]
    for i, t in enumerate(out):
        if t in stop_ids:
            return out[:i]
    return out
