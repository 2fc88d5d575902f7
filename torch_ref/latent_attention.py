"""PyTorch mirror of jaxformer.models.latent_attention: multi-head latent attention in its expanded form
(per-head keys and values built from the latent, then plain attention), the reference for both of jaxformer's
forms (expanded in training, absorbed with a cache)."""

from __future__ import annotations

import torch
from torch import nn

from jaxformer.config import ModelConfig
from torch_ref.attention import attend
from torch_ref.layers import Linear, RMSNorm, apply_rope

LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool = True, window: int | None = None, layer: int = 0):
        super().__init__()
        D, N, H, lat = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.latent
        C, R, Dv = lat.kv_rank, lat.rope_dim, cfg.v_head_dim
        if lat.q_rank:
            self.q_a_proj = Linear(D, lat.q_rank, bias=lat.bias)
            self.q_a_layernorm = RMSNorm(lat.q_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(lat.q_rank, N * H, bias=False)
        else:
            self.q_proj = Linear(D, N * H, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, C + R, bias=lat.bias)
        self.kv_a_layernorm = RMSNorm(C, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(C, N * (H - R + Dv), bias=False)
        self.o_proj = Linear(N * Dv, D, bias=lat.bias)
        self.q_rank, self.n_heads, self.nope_dim, self.rope_dim, self.v_dim, self.rank = lat.q_rank, N, H - R, R, Dv, C
        self.causal, self.window, self.scale = causal, window, cfg.layer_attention_scale(layer)

    def forward(self, x: torch.Tensor, rope, segment_ids=None) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        B, T, _ = x.shape
        N, dn, R = self.n_heads, self.nope_dim, self.rope_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_rank else self.q_proj(x)
        q = q.view(B, T, N, dn + R)
        q = torch.cat([q[..., :dn], apply_rope(q[..., dn:], *rope)], -1)  # [B, T, N, H]
        ckv = self.kv_a_proj_with_mqa(x)  # [B, T, C + R]
        c = self.kv_a_layernorm(ckv[..., :self.rank])  # [B, T, C]
        k_pe = apply_rope(ckv[..., None, self.rank:], *rope)  # [B, T, 1, R]
        kv = self.kv_b_proj(c).view(B, T, N, dn + self.v_dim)
        k = torch.cat([kv[..., :dn], k_pe.expand(B, T, N, R)], -1)  # [B, T, N, H]
        seg = None if segment_ids is None else (segment_ids, segment_ids)
        out = attend(q, k, kv[..., dn:], causal=self.causal, segment_ids=seg, scale=self.scale, window=self.window)
        return self.o_proj(out.reshape(B, T, N * self.v_dim))
