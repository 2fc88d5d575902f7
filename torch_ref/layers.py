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
    """RMSNorm in float32; `unit_offset` scales by (1 + weight) in float32 with weights from 0 (Gemma)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma: (x * (1 + w)) in float32, then cast
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight.to(x.dtype) * h.to(x.dtype)  # Llama: cast, then scale


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The norm the config names over `dim` (default d_model); reads cfg.norm and cfg.norm_unit_offset."""
    if cfg.norm == "layernorm":
        if cfg.norm_unit_offset:
            raise ValueError("norm_unit_offset=true needs norm='rmsnorm' (Gemma's RMSNorm); set one or the other")
        return LayerNorm(dim or cfg.d_model, cfg.norm_eps)
    return RMSNorm(dim or cfg.d_model, cfg.norm_eps, unit_offset=cfg.norm_unit_offset)


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


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """RoPE inverse frequencies theta ** (-2i / H), i < H/2 (Su et al. 2021), in float32 as transformers."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_inv_freq(cfg: ModelConfig, positions: torch.Tensor,
                  layer_type: str = "full_attention") -> tuple[torch.Tensor, float]:
    """A layer type's RoPE inverse frequencies [H/2] and cos/sin factor (transformers' modeling_rope_utils.py).

    Sliding-window layers take the default RoPE at rope_local_theta when it is set (Gemma 3). dynamic and
    longrope read the sequence length max(positions) + 1, as transformers' dynamic_rope_update does.
    """
    H, theta, rs = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    if layer_type == "sliding_attention" and cfg.rope_local_theta is not None:
        return default_inv_freq(H, cfg.rope_local_theta), 1.0
    inv_freq = default_inv_freq(H, theta)  # [H/2]
    if rs is None or rs.rope_type == "default":
        return inv_freq, 1.0
    factor, orig = rs.factor, rs.original_max_position_embeddings or cfg.max_seq_len
    seq_len = positions.max() + 1
    exponent = torch.arange(0, H, 2, dtype=torch.int64).float() / H  # [H/2]
    if rs.rope_type == "linear":  # positions / factor
        return inv_freq / factor, 1.0
    if rs.rope_type == "dynamic":  # NTK-aware: the base grows once the sequence passes `orig`
        grown = theta * ((factor * torch.clamp(seq_len, min=orig) / orig) - (factor - 1)) ** (H / (H - 2))
        return torch.where(seq_len > orig, 1.0 / (grown ** exponent), inv_freq), 1.0
    if rs.rope_type == "llama3":  # Llama 3.1: long wavelengths / factor, medium ones blended
        low_wavelen, high_wavelen = orig / rs.low_freq_factor, orig / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rs.rope_type == "longrope":  # Phi-3: per-frequency factors, the long ones past the original context
        attention = rs.attention_factor
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = torch.where(seq_len > orig, torch.tensor(rs.long_factor), torch.tensor(rs.short_factor))  # [H/2]
        return 1.0 / (ext * theta ** exponent), attention
    # yarn (Peng et al. 2023): NTK-by-parts between the beta_fast / beta_slow rotation counts
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rs.attention_factor
    if attention is None:
        attention = (mscale(factor, rs.mscale) / mscale(factor, rs.mscale_all_dim) if rs.mscale and rs.mscale_all_dim
                     else mscale(factor))

    def correction_dim(rotations: float) -> float:
        return H * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rs.beta_fast or 32), correction_dim(rs.beta_slow or 1)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, H - 1)
    ramp = torch.clamp((torch.arange(H // 2, dtype=torch.float32) - low) / ((high - low) or 0.001), 0, 1)
    pos_freqs = theta ** exponent
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate it by 1 / factor
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate, attention


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                   attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, H] of positions [B, T] at inverse frequencies [H/2], times the attention factor."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, H/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Default (unscaled) RoPE cos, sin [B, T, H]."""
    return rotary_cos_sin(positions, default_inv_freq(head_dim, theta))


def layer_rope(cfg: ModelConfig, positions: torch.Tensor,
               layer_type: str = "full_attention") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, H] for the layers of `layer_type`, with the config's RoPE scaling."""
    return rotary_cos_sin(positions, *rope_inv_freq(cfg, positions, layer_type))


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
