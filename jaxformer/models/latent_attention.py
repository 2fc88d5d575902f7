"""Multi-head latent attention (DeepSeek-AI 2024, "DeepSeek-V2", section 2.1; DeepSeek-V3, Kimi-K2).

Keys and values come from one low-rank latent per token, c = norm(x W_DKV) [C = latent.kv_rank], shared by all
heads; each head's key is [c W_UK ; k_pe] and its value c W_UV, where k_pe [R = latent.rope_dim] is one rotated key
shared by all heads. Queries are [q_nope ; q_pe] per head, through a rank latent.q_rank bottleneck (with its own
RMSNorm) or one q_proj. Parameter names are transformers' (modeling_deepseek_v3.py):

  q_a_proj [Q, D], q_a_layernorm [Q], q_b_proj [N*H, Q]    (or q_proj [N*H, D])     H = head_dim = dn + R
  kv_a_proj_with_mqa [C + R, D], kv_a_layernorm [C], kv_b_proj [N*(dn + dv), C], o_proj [D, N*dv]

Training (no cache) expands the keys and values and runs any attention implementation. Decoding caches only
(c, k_pe): C + R values per token and layer instead of N*(H + dv), and attends in the absorbed form: W_UK folded
into the query, q_lat = q_nope W_UK [B, T, N, C], scores q_lat . c + q_pe . k_pe, the attention output o_lat
[B, T, N, C] taken through W_UV afterwards (the same function, by associativity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.attention import PagedLayer, attend, attend_latent, write_cache, write_paged
from jaxformer.models.layers import Linear, RMSNorm, apply_rope

LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm keep transformers' default, whatever rms_norm_eps says


class LatentAttention(nnx.Module):
    """Causal multi-head latent attention; called as Attention is: (x, rope, segment_ids, cache)."""

    def __init__(self, cfg: ModelConfig, *, causal: bool = True, window: int | None = None, layer: int = 0,
                 rngs: nnx.Rngs):
        D, N, H, lat = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.latent
        C, R, Dv = lat.kv_rank, lat.rope_dim, cfg.v_head_dim
        kw = dict(std=cfg.init_std, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs)
        if lat.q_rank:
            self.q_a_proj = Linear(D, lat.q_rank, bias=lat.bias, axes=(None, "embed"), **kw)
            self.q_a_layernorm = RMSNorm(lat.q_rank, eps=LATENT_NORM_EPS, param_dtype=cfg.param_dtype)
            self.q_b_proj = Linear(lat.q_rank, N * H, bias=False, axes=("heads", "embed"), **kw)
            self.q_proj = None
        else:
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
            self.q_proj = Linear(D, N * H, bias=False, axes=("heads", "embed"), **kw)
        self.kv_a_proj_with_mqa = Linear(D, C + R, bias=lat.bias, axes=(None, "embed"), **kw)
        self.kv_a_layernorm = RMSNorm(C, eps=LATENT_NORM_EPS, param_dtype=cfg.param_dtype)
        self.kv_b_proj = Linear(C, N * (H - R + Dv), bias=False, axes=("heads", "embed"), **kw)
        kw.update(std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)  # residual output (GPT-2 init)
        self.o_proj = Linear(N * Dv, D, bias=lat.bias, axes=("embed", "heads"), **kw)
        self.n_heads, self.nope_dim, self.rope_dim, self.v_dim, self.rank = N, H - R, R, Dv, C
        self.causal, self.window = causal, window
        self.scale = cfg.layer_attention_scale(layer)
        self.impl = cfg.attention_impl

    def project_q(self, x: jax.Array, rope) -> tuple[jax.Array, jax.Array]:
        """Each head's query parts of [B, T, D]: q_nope [B, T, N, dn] and rotated q_pe [B, T, N, R]."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, T, self.n_heads, self.nope_dim + self.rope_dim)  # [B, T, N, H]
        return q[..., :self.nope_dim], apply_rope(q[..., self.nope_dim:], *rope)

    def project_latent(self, x: jax.Array, rope) -> tuple[jax.Array, jax.Array]:
        """What decoding caches for [B, T, D]: the normed latent c [B, T, 1, C] and the rotated shared key
        k_pe [B, T, 1, R] (one "kv head" each)."""
        ckv = self.kv_a_proj_with_mqa(x)  # [B, T, C + R]
        c = self.kv_a_layernorm(ckv[..., :self.rank])[:, :, None]  # [B, T, 1, C]
        return c, apply_rope(ckv[..., None, self.rank:], *rope)  # [B, T, 1, R]

    def up_weights(self) -> tuple[jax.Array, jax.Array]:
        """kv_b_proj split per head: W_UK [N, dn, C] (latent -> key) and W_UV [N, dv, C] (latent -> value)."""
        w = self.kv_b_proj.dense_weight().reshape(self.n_heads, self.nope_dim + self.v_dim, self.rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], segment_ids=None, cache=None):
        """[B, T, D] -> [B, T, D]; with `cache` (c_cache, pe_cache, start) or a PagedLayer holding (c, k_pe) in its
        two entries, the new tokens' latents are written first and (out, (c_cache, pe_cache)) returned."""
        B, T, _ = x.shape
        q_nope, q_pe = self.project_q(x, rope)  # [B, T, N, dn], [B, T, N, R]
        c, k_pe = self.project_latent(x, rope)  # [B, T, 1, C], [B, T, 1, R]
        if cache is None:
            return self.o_proj(self._expanded(q_nope, q_pe, c, k_pe, segment_ids).reshape(B, T, -1))
        w_uk, w_uv = self.up_weights()
        q_lat = jnp.einsum("btnd,ndc->btnc", q_nope, w_uk)  # [B, T, N, C]
        kw = dict(impl=self.impl, scale=self.scale, window=self.window)
        if isinstance(cache, PagedLayer):
            c_pages, pe_pages = write_paged(cache.k_pages, cache.v_pages, c, k_pe, cache.page_table, cache.start)
            o_lat = attend_latent(q_lat, q_pe, c_pages, pe_pages, cache.start + T, page_table=cache.page_table, **kw)
            new = (c_pages, pe_pages)
        else:
            c_cache, pe_cache, start = cache
            new = write_cache(c_cache, pe_cache, c, k_pe, start, self.impl)
            o_lat = attend_latent(q_lat, q_pe, *new, start + T, **kw)  # [B, T, N, C]
        out = jnp.einsum("btnc,nvc->btnv", o_lat, w_uv)  # [B, T, N, dv]
        return self.o_proj(out.reshape(B, T, -1)), new

    def query_key_value(self, x: jax.Array, rope) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The expanded form of [B, T, D]: each head's rotated query and key [B, T, N, H] and value [B, T, N, dv]
        (training attends with them; viz reads its attention maps from them)."""
        q_nope, q_pe = self.project_q(x, rope)
        return self._expand(q_nope, q_pe, *self.project_latent(x, rope))

    def _expand(self, q_nope, q_pe, c, k_pe) -> tuple[jax.Array, jax.Array, jax.Array]:
        B, T, N = q_nope.shape[:3]
        kv = self.kv_b_proj(c[:, :, 0]).reshape(B, T, N, self.nope_dim + self.v_dim)  # [B, T, N, dn + dv]
        k = jnp.concatenate([kv[..., :self.nope_dim], jnp.broadcast_to(k_pe, (B, T, N, self.rope_dim))], -1)
        return jnp.concatenate([q_nope, q_pe], -1), k, kv[..., self.nope_dim:]

    def _expanded(self, q_nope, q_pe, c, k_pe, segment_ids) -> jax.Array:
        """Training's form: per-head keys [k_nope ; k_pe] and values from the latent, then attention [B, T, N, dv]."""
        seg = segment_ids if segment_ids is None or isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        return attend(*self._expand(q_nope, q_pe, c, k_pe), causal=self.causal, segment_ids=seg, impl=self.impl,
                      scale=self.scale, window=self.window)
