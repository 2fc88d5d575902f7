"""PyTorch mirror of jaxformer.models.delta_net: the Gated DeltaNet token mixer with the gated delta rule as a plain
token-by-token loop (transformers' torch_recurrent_gated_delta_rule), float32. Same module and parameter names as
jaxformer and transformers' Qwen3_5GatedDeltaNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jaxformer.config import ModelConfig
from torch_ref.layers import Linear

L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class CausalConv1d(nn.Module):
    """Depthwise causal conv + SiLU, weight [C, 1, W]; taps reaching into an earlier segment read zeros."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, 1, kernel) * 0.02)
        self.kernel = kernel

    def forward(self, x, tail, segment=None):  # x [B,T,C], tail [B,W-1,C], segment [B,T] int -> [B,T,C]
        B, T, C = x.shape
        W = self.kernel
        full = torch.cat([tail.to(x.dtype), x], 1)  # [B, W-1+T, C]
        out = torch.zeros(B, T, C, dtype=torch.float32)
        for j in range(W):
            s = W - 1 - j
            xs = full[:, j:j + T].float()
            if segment is not None and s > 0:
                earlier = F.pad(segment, (s, 0))[:, :T]  # segment of position t - s (0 before position 0)
                xs = torch.where((earlier == segment)[..., None], xs, 0.0)
            out = out + xs * self.weight[:, 0, j].float()
        return F.silu(out).to(x.dtype)


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, gate):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(x.dtype)
        return (h * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        lin = cfg.linear
        D, K, H, Dk, Dv = cfg.d_model, lin.key_heads, lin.value_heads, lin.key_head_dim, lin.value_head_dim
        C = 2 * K * Dk + H * Dv
        self.in_proj_qkv = Linear(D, C, bias=False)
        self.in_proj_z = Linear(D, H * Dv, bias=False)
        self.in_proj_b = Linear(D, H, bias=False)
        self.in_proj_a = Linear(D, H, bias=False)
        self.conv1d = CausalConv1d(C, lin.conv_kernel)
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.empty(H).uniform_(0.01, 16).log())
        self.norm = GatedRMSNorm(Dv, cfg.norm_eps)
        self.out_proj = Linear(H * Dv, D, bias=False)
        self.key_heads, self.value_heads, self.key_dim, self.value_dim = K, H, Dk, Dv

    def forward(self, x, segment_ids=None, state=None, valid=None):
        """x [B,T,D] -> y, or (y, (conv [B,W-1,C], recurrent [B,H,Dk,Dv])) when given a state (a pair)."""
        B, T, _ = x.shape
        K, H, Dk, Dv = self.key_heads, self.value_heads, self.key_dim, self.value_dim
        qkv = self.in_proj_qkv(x)  # [B, T, C]
        if valid is not None:
            qkv = torch.where(valid[..., None], qkv, 0.0)
        z = self.in_proj_z(x).view(B, T, H, Dv)
        b, a = self.in_proj_b(x), self.in_proj_a(x)  # [B, T, H]
        W = self.conv1d.kernel
        tail = torch.zeros(B, W - 1, qkv.shape[-1], dtype=qkv.dtype) if state is None else state[0]
        segment = None
        if segment_ids is not None:
            starts = F.pad((segment_ids[:, 1:] != segment_ids[:, :-1]).long(), (1, 0))  # [B, T]
            segment = starts.cumsum(1)
        mixed = self.conv1d(qkv, tail, segment)  # [B, T, C]
        q, k, v = mixed.split([K * Dk, K * Dk, H * Dv], -1)
        q = l2norm(q.reshape(B, T, K, Dk).float()).repeat_interleave(H // K, 2) * Dk ** -0.5  # [B, T, H, Dk]
        k = l2norm(k.reshape(B, T, K, Dk).float()).repeat_interleave(H // K, 2)  # [B, T, H, Dk]
        v = v.reshape(B, T, H, Dv).float()
        beta = b.sigmoid().float()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [B, T, H]
        if valid is not None:
            g, beta = torch.where(valid[..., None], g, 0.0), torch.where(valid[..., None], beta, 0.0)

        S = torch.zeros(B, H, Dk, Dv) if state is None else state[1].float()
        outs = []
        for t in range(T):
            if segment is not None and t > 0:
                S = torch.where((segment[:, t] != segment[:, t - 1])[:, None, None, None], 0.0, S)
            S = S * g[:, t].exp()[..., None, None]
            kv_mem = torch.einsum("bhkv,bhk->bhv", S, k[:, t])
            delta = (v[:, t] - kv_mem) * beta[:, t, :, None]
            S = S + k[:, t, :, :, None] * delta[:, :, None, :]
            outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
        core = torch.stack(outs, 1).to(x.dtype)  # [B, T, H, Dv]
        y = self.out_proj(self.norm(core, z).reshape(B, T, H * Dv))
        if state is None:
            return y
        full = torch.cat([tail, qkv], 1)  # [B, W-1+T, C]
        if valid is None:
            conv = full[:, T:]
        else:
            pos = torch.arange(1, T + 1)
            last = torch.where(valid, pos, 0).max(1).values  # [B] positions up to each row's last valid one
            conv = torch.stack([full[i, int(last[i]):int(last[i]) + W - 1] for i in range(B)])
        return y, (conv, S)
