"""Latent attention's decode cache vs expanded keys and values: bytes per token and decode tokens/s, same run.

One DeepSeek-V3-shaped latent attention layer (C = 512 latent, R = 64 rotated dims, 128 + 64 q/k and 128 value dims
per head; --heads of them, e.g. one GPU's share of V3's 128 under tensor parallelism) decodes one token per sequence
against --context cached tokens, two ways, on the same weights and inputs:

  latent    jaxformer's path (models/latent_attention.py): the cache holds the normed latent and the rotated shared
            key, C + R values per token; queries absorb W_UK, the output W_UV.
  expanded  the cache holds every head's key [N, 192] and value [N, 128] (what a standard MHA cache would), written
            from kv_b_proj(latent) each step; plain attention over it.

Both steps are jitted; repeats interleaved; medians. The two outputs are compared first. Then the bytes per token of
the deepseek-v3 preset (61 layers, 128 heads) both ways. The last line is one JSON object.

    python bench/latent_cache.py [--heads 16] [--context 4096] [--batch 4] [--d-model 2048] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig, load_model_config
from jaxformer.models.attention import NEG_INF
from jaxformer.models.layers import rope_cos_sin
from jaxformer.models.latent_attention import LatentAttention


def layer_config(args) -> ModelConfig:
    return ModelConfig.llama(vocab_size=256, d_model=args.d_model, n_layers=1, n_heads=args.heads, head_dim=192,
                             d_ff=256, max_seq_len=args.context + 1,
                             latent=dict(kv_rank=512, q_rank=1536, rope_dim=64, v_head_dim=128))


def expanded_step(attn: LatentAttention, x, rope, k_cache, v_cache, lengths):
    """One token per row through expanded per-head caches k [B, N, S, 192], v [B, N, S, 128]."""
    B = x.shape[0]
    q_nope, q_pe = attn.project_q(x, rope)  # [B, 1, N, 128], [B, 1, N, 64]
    c, k_pe = attn.project_latent(x, rope)  # [B, 1, 1, 512], [B, 1, 1, 64]
    kv = attn.kv_b_proj(c[:, :, 0]).reshape(B, 1, attn.n_heads, -1)  # [B, 1, N, 256]
    k = jnp.concatenate([kv[..., :attn.nope_dim], jnp.broadcast_to(k_pe, q_pe.shape)], -1)  # [B, 1, N, 192]
    rows = jnp.arange(B)
    k_cache = k_cache.at[rows, :, lengths].set(k[:, 0])
    v_cache = v_cache.at[rows, :, lengths].set(kv[:, 0, :, attn.nope_dim:])
    q = jnp.concatenate([q_nope, q_pe], -1)[:, 0]  # [B, N, 192]
    s = jnp.einsum("bnh,bnsh->bns", q, k_cache, preferred_element_type=jnp.float32) * attn.scale
    s = jnp.where(jnp.arange(k_cache.shape[2])[None, None] <= lengths[:, None, None], s, NEG_INF)
    o = jnp.einsum("bns,bnsh->bnh", jax.nn.softmax(s, -1).astype(v_cache.dtype), v_cache)  # [B, N, 128]
    return attn.o_proj(o.reshape(B, 1, -1)), k_cache, v_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    cfg = layer_config(args)
    B, S, N = args.batch, args.context + 1, args.heads
    attn = LatentAttention(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(attn)
    rng = np.random.default_rng(0)
    lengths = jnp.full((B,), args.context, jnp.int32)  # the new token goes to slot `context`
    x = jnp.asarray(rng.standard_normal((B, 1, cfg.d_model)), jnp.float32)
    rope = rope_cos_sin(lengths[:, None], 64, cfg.rope.theta)
    c0 = jnp.asarray(rng.standard_normal((B, 1, S, 512)), jnp.float32)  # a filled cache
    pe0 = jnp.asarray(rng.standard_normal((B, 1, S, 64)), jnp.float32)
    w = attn.kv_b_proj.weight[...].reshape(N, 256, 512)
    k0 = jnp.concatenate([jnp.einsum("bsc,ndc->bnsd", c0[:, 0], w[:, :128]),
                          jnp.broadcast_to(pe0, (B, N, S, 64))], -1)  # the same cache, expanded: [B, N, S, 192]
    v0 = jnp.einsum("bsc,ndc->bnsd", c0[:, 0], w[:, 128:])  # [B, N, S, 128]

    # caches donated and carried from step to step: each path updates its cache in place, as an engine does
    latent = jax.jit(lambda p, x, c, pe: nnx.merge(graphdef, p)(x, rope, None, (c, pe, lengths)),
                     donate_argnums=(2, 3))
    expanded = jax.jit(lambda p, x, k, v: expanded_step(nnx.merge(graphdef, p), x, rope, k, v, lengths),
                       donate_argnums=(2, 3))
    cache_bytes = {"latent": (c0.nbytes + pe0.nbytes) // (B * S), "expanded": (k0.nbytes + v0.nbytes) // (B * S)}
    out_l, caches = latent(params, x, c0, pe0)
    out_e, *expanded_caches = expanded(params, x, k0, v0)
    diff = float(jnp.abs(out_l - out_e).max() / jnp.abs(out_e).max())
    print(f"latent vs expanded step output: max|diff| {diff:.1e} x max|out|")
    state = {"latent": caches, "expanded": tuple(expanded_caches)}

    def step(name):
        fn = latent if name == "latent" else expanded
        out = jax.block_until_ready(fn(params, x, *state[name]))
        state[name] = out[1] if name == "latent" else out[1:]

    runs = {name: (lambda name=name: step(name)) for name in state}
    times = {k: [] for k in runs}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]
    tok_s = {k: B / statistics.median(v) for k, v in times.items()}
    preset = load_model_config("deepseek-v3")
    itemsize = jnp.dtype(preset.compute_dtype).itemsize
    preset_bytes = {"latent": preset.kv_bytes_per_token(itemsize),
                    "expanded": preset.n_layers * preset.n_heads * (preset.head_dim + preset.v_head_dim) * itemsize}
    for name in runs:
        print(f"{name:9s} {tok_s[name]:9.1f} tokens/s  cache {cache_bytes[name]:7,d} B/token/layer (float32, {N} heads)"
              f"  deepseek-v3 preset {preset_bytes[name]:11,d} B/token (bf16, 61 layers, 128 heads)")
    print(f"1-min load average {load_before:.2f} before, {load_after:.2f} after ({os.cpu_count()} cores)")
    print(json.dumps({"heads": N, "context": args.context, "batch": B, "d_model": cfg.d_model,
                      "tokens_per_s": {k: round(v, 1) for k, v in tok_s.items()},
                      "speedup_latent_vs_expanded": round(tok_s["latent"] / tok_s["expanded"], 3),
                      "cache_bytes_per_token_layer_fp32": cache_bytes,
                      "deepseek_v3_cache_bytes_per_token_bf16": preset_bytes,
                      "cache_ratio": round(preset_bytes["expanded"] / preset_bytes["latent"], 1),
                      "max_rel_diff": diff, "load_before": load_before, "load_after": load_after}))


if __name__ == "__main__":
    main()
