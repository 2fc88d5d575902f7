"""PyTorch mirror of jaxformer.models.attention (eager math, no fused kernels: it is the reference)."""

from __future__ import annotations

import torch
from torch import nn

from jaxformer.config import ModelConfig
from torch_ref.layers import Linear, apply_rope


def make_mask(q_len: int, kv_len: int, *, causal: bool, segment_ids=None) -> torch.Tensor | None:
    """Boolean [B or 1, T, S], True where attention is allowed; causal aligned bottom-right."""
    mask = None
    if causal:
        t = torch.arange(q_len)[:, None] + (kv_len - q_len)
        mask = (t >= torch.arange(kv_len)[None, :])[None]
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids
        same = q_seg[:, :, None] == kv_seg[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def attend(q, k, v, *, causal: bool, segment_ids=None, scale: float | None = None) -> torch.Tensor:
    """q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]; kv heads repeated explicitly for clarity."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = H ** -0.5 if scale is None else scale
    k = k.repeat_interleave(N // K, dim=2)
    v = v.repeat_interleave(N // K, dim=2)
    scores = torch.einsum("btnh,bsnh->bnts", q.float(), k.float()) * scale
    mask = make_mask(T, S, causal=causal, segment_ids=segment_ids)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], -1e30)
    probs = scores.softmax(-1).to(v.dtype)
    return torch.einsum("bnts,bsnh->btnh", probs, v)


class Attention(nn.Module):
    """Self-attention (causal or bidirectional), or cross-attention when `kv` comes from another sequence."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(D, N * H, bias=cfg.use_bias)
        self.k_proj = Linear(D, K * H, bias=cfg.use_bias)
        self.v_proj = Linear(D, K * H, bias=cfg.use_bias)
        self.o_proj = Linear(N * H, D, bias=cfg.use_bias)
        self.n_heads, self.n_kv_heads, self.head_dim = N, K, H
        self.causal = causal

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = x.shape
        return (self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim),
                self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim))

    def forward(self, x: torch.Tensor, rope=None, segment_ids=None, kv=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        if kv is None:
            k, v = self.project_kv(x)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        else:
            k, v = kv
        seg = segment_ids if segment_ids is None or isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        out = attend(q, k, v, causal=self.causal, segment_ids=seg)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))
