"""PyTorch mirror of jaxformer.models.layers: same module names, same parameter names and layouts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from jaxformer.config import ModelConfig


class Linear(nn.Linear):
    """torch's Linear already stores weight [out, in], like jaxformer.models.layers.Linear."""


class Embed(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num, dim) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        return F.embedding(ids, self.weight)

    def attend(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, V]
        return x @ self.weight.T


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps)
        return h.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * h.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    norm_cls = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}[cfg.norm]
    return norm_cls(dim or cfg.d_model, cfg.norm_eps)


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, Fd = cfg.d_model, cfg.d_ff
        self.gate_proj = Linear(D, Fd, bias=cfg.use_bias) if cfg.gated_mlp else None
        self.up_proj = Linear(D, Fd, bias=cfg.use_bias)
        self.down_proj = Linear(Fd, D, bias=cfg.use_bias)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        h = self.act(self.gate_proj(x)) * h if self.gate_proj is not None else self.act(h)
        return self.down_proj(h)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, H/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.float()
    x1, x2 = h.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (h * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)


def sinusoidal_positions(positions: torch.Tensor, dim: int, max_timescale: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    inv = 1.0 / (max_timescale ** (torch.arange(half, dtype=torch.float32) / half))
    angles = positions.float()[..., None] * inv
    return torch.cat([angles.sin(), angles.cos()], dim=-1)
