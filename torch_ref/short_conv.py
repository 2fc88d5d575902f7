"""PyTorch mirror of jaxformer.models.short_conv: LFM2's gated short convolution (eager math: it is the reference).

The convolution is written out over windows of the state-extended input (one path for plain, packed and
continued sequences); tests prove it against transformers' Lfm2ShortConv, which runs torch's conv1d. The decode
state is a plain tensor [B, K - 1, D] (jaxformer's ConvState.conv).
"""

from __future__ import annotations

import torch
from torch import nn

from jaxformer.config import ModelConfig
from torch_ref.layers import Linear


def document_starts(segment_ids: torch.Tensor, kernel: int) -> torch.Tensor:
    """[B, T] -> [B, T]: each token's document start as an index into the state-extended sequence (token t is
    t + K - 1); 0 for the row's first document, which continues the state."""
    T = segment_ids.shape[1]
    new = torch.zeros_like(segment_ids, dtype=torch.bool)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    at = torch.where(new, torch.arange(T) + kernel - 1, torch.zeros((), dtype=torch.long))
    return torch.cummax(at, dim=1).values


class ShortConv(nn.Module):
    """in_proj -> (b, c, x); c * conv(b * x) -> out_proj; conv is torch's depthwise Conv1d (weight [D, 1, K])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, K = cfg.d_model, cfg.conv.kernel
        self.in_proj = Linear(D, 3 * D, bias=cfg.conv.bias)
        self.conv = nn.Conv1d(D, D, K, groups=D, bias=cfg.conv.bias, padding=K - 1)
        self.out_proj = Linear(D, D, bias=cfg.conv.bias)
        self.kernel = K

    def forward(self, x: torch.Tensor, segment_ids=None, *, state=None, valid=None):
        """x [B, T, D] -> y; with `state` [B, K - 1, D]: (y, new state), taken at each row's last `valid` token."""
        B, T, D = x.shape
        K = self.kernel
        b, c, h = self.in_proj(x).chunk(3, dim=-1)  # 3 x [B, T, D]
        u = b * h
        prev = u.new_zeros(B, K - 1, D) if state is None else state.to(u.dtype)
        u_ext = torch.cat([prev, u], dim=1)  # [B, K - 1 + T, D]
        windows = u_ext.unfold(1, K, 1)  # [B, T, D, K]: window t holds extended indices t .. t + K - 1
        starts = None if segment_ids is None else document_starts(segment_ids, K)
        if starts is not None:  # taps before the token's document start read zeros
            index = torch.arange(T)[:, None] + torch.arange(K)  # [T, K]
            windows = windows * (index >= starts[..., None])[:, :, None, :].to(windows.dtype)
        v = torch.einsum("btdk,dk->btd", windows.float(), self.conv.weight[:, 0].float())
        if self.conv.bias is not None:
            v = v + self.conv.bias.float()
        y = self.out_proj(c * v.to(c.dtype))
        if state is None:
            return y
        n = torch.full((B,), T) if valid is None else valid.long().sum(1)  # [B] valid tokens per row
        idx = n[:, None] + torch.arange(K - 1)  # [B, K - 1]
        new = torch.gather(u_ext, 1, idx[..., None].expand(B, K - 1, D))  # [B, K - 1, D]
        if starts is not None:  # keep only the last document's values (a row without valid tokens keeps its state)
            last = torch.gather(starts, 1, (n - 1).clamp(min=0)[:, None])
            new = new * ((idx >= last) | (n[:, None] == 0))[..., None].to(new.dtype)
        return y, new.to(state.dtype)
