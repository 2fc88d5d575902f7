"""PyTorch mirror of jaxformer.models.layers: same module names, same parameter names and layouts."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from jaxformer.config import ModelConfig, RopeScaling


def record(capture: dict | None, name: str, x):
    """capture[name] = x when capturing (jaxformer parity / viz read the residual stream this way)."""
    if capture is not None:
        capture[name] = x


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
    def __init__(self, dim: int, eps: float, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        h = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), bias, self.eps)
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
    if cfg.norm in ("layernorm", "layernorm_nobias"):
        if cfg.norm_unit_offset:
            raise ValueError("norm_unit_offset=true needs norm='rmsnorm' (Gemma's RMSNorm); set one or the other")
        return LayerNorm(dim or cfg.d_model, cfg.norm_eps, bias=cfg.norm == "layernorm")
    return RMSNorm(dim or cfg.d_model, cfg.norm_eps, unit_offset=cfg.norm_unit_offset)


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
}


class XIELU(nn.Module):
    """xIELU with learned alpha_p, alpha_n (transformers' XIELUActivation, its Python path)."""

    def __init__(self, beta: float = 0.5, eps: float = -1e-6):
        super().__init__()
        self.alpha_p = nn.Parameter(torch.tensor([math.log(math.expm1(0.8))]))
        self.alpha_n = nn.Parameter(torch.tensor([math.log(math.expm1(0.8 - beta))]))
        self.beta, self.eps = beta, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_p = F.softplus(self.alpha_p)
        a_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, a_p * x * x + self.beta * x,
                           (torch.expm1(torch.clamp(x, max=self.eps)) - x) * a_n + self.beta * x)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, Fd = cfg.d_model, cfg.d_ff
        self.gate_proj = Linear(D, Fd, bias=cfg.use_bias) if cfg.gated_mlp else None
        self.up_proj = Linear(D, Fd, bias=cfg.use_bias)
        self.down_proj = Linear(Fd, D, bias=cfg.use_bias)
        self.act_fn = XIELU() if cfg.activation == "xielu" else None
        self.act = ACTIVATIONS.get(cfg.activation)  # None: the learned act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        act = self.act_fn if self.act_fn is not None else self.act
        h = act(self.gate_proj(x)) * h if self.gate_proj is not None else act(h)
        return self.down_proj(h)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None, max_seq_len: int,
                  seq_len: torch.Tensor | int) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies [H/2] and the factor on cos/sin, written from transformers' modeling_rope_utils.

    `seq_len` (max position + 1 of the call) matters to dynamic and longrope only, as in transformers'
    dynamic_rope_update; original_max_position_embeddings defaults to `max_seq_len`.
    """
    H = head_dim
    exponent = torch.arange(0, H, 2, dtype=torch.int64).float() / H  # [H/2]
    inv_freq = 1.0 / (theta ** exponent)
    if scaling is None or scaling.rope_type == "default":
        return inv_freq, 1.0
    kind, factor = scaling.rope_type, scaling.factor
    orig = scaling.original_max_position_embeddings or max_seq_len
    if not orig and kind != "linear":
        raise ValueError(f"rope_scaling type {kind!r} needs an original context: set "
                         "rope_scaling.original_max_position_embeddings or pass max_seq_len")
    seq_len = torch.as_tensor(seq_len)
    if kind == "proportional":  # Gemma 4: rope_angles pairs at the default rates, the others zero
        rope_angles = int(scaling.partial_rotary_factor * H // 2)
        inv_freq = torch.cat([inv_freq[:rope_angles], torch.zeros(H // 2 - rope_angles)])
        return inv_freq / factor, 1.0
    if kind == "linear":  # positions / factor
        return inv_freq / factor, 1.0
    if kind == "dynamic":  # NTK-aware: the base grows once the sequence passes `orig`
        grown = theta * ((factor * torch.clamp(seq_len, min=orig) / orig) - (factor - 1)) ** (H / (H - 2))
        return torch.where(seq_len > orig, 1.0 / (grown ** exponent), inv_freq), 1.0
    if kind == "llama3":  # Llama 3.1: long wavelengths / factor, short ones kept, medium ones blended
        lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig / lo, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < orig / hi) * ~(wavelen > orig / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    attention = scaling.attention_factor
    if kind == "longrope":  # Phi-3: per-frequency factors, the long ones past the original context
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = torch.where(seq_len > orig, torch.tensor(scaling.long_factor), torch.tensor(scaling.short_factor))
        return 1.0 / (ext * theta ** exponent), attention

    # yarn (Peng et al. 2023): NTK-by-parts, frequencies between the beta_fast / beta_slow rotation counts blended
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times in `orig`
        return H * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    if attention is None:
        m, m_all = scaling.mscale, scaling.mscale_all_dim
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    low, high = correction_dim(scaling.beta_fast or 32), correction_dim(scaling.beta_slow or 1)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, H - 1)
    ramp = torch.clamp((torch.arange(H // 2, dtype=torch.float32) - low) / ((high - low) or 0.001), 0, 1)
    pos_freqs = theta ** exponent
    extrapolate = 1 - ramp  # 1: keep the frequency, 0: interpolate it by 1 / factor
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate, attention


class QueryScale(NamedTuple):
    """A NoPE layer's query temperature (Llama 4), passed where RoPE's (cos, sin) would be: queries times scale [B, T]."""

    scale: torch.Tensor


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, scaling: RopeScaling | None = None,
                 max_seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, H] of positions [B, T] for rotate-half RoPE, scaled as `scaling` says (times its
    attention factor, as transformers)."""
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling, max_seq_len or 0, positions.max() + 1)
    freqs = positions.float()[..., None] * inv_freq  # [B, T, H/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, H]
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R = cos.shape[-1] dims of [B, T, N, H] (all of them unless partial), pass the rest."""
    R = cos.shape[-1]
    h = x[..., :R].float()
    x1, x2 = h.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = (h * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)
    return torch.cat([out, x[..., R:]], dim=-1)


def sinusoidal_positions(positions: torch.Tensor, dim: int, max_timescale: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    inv = 1.0 / (max_timescale ** (torch.arange(half, dtype=torch.float32) / half))
    angles = positions.float()[..., None] * inv
    return torch.cat([angles.sin(), angles.cos()], dim=-1)
