"""PyTorch mirror of jaxformer.models.attention (eager math, no fused kernels: it is the reference)."""

from __future__ import annotations

import torch
from torch import nn

from jaxformer.config import ModelConfig
from torch_ref.layers import Linear, QueryScale, apply_rope, make_norm


def make_mask(q_len: int, kv_len: int, *, causal: bool, segment_ids=None, window: int | None = None,
              chunk: int | None = None):
    """Boolean [B or 1, T, S], True where attention is allowed; causal aligned bottom-right.

    With `window`, query t sees keys t - window < s <= t (itself and the window - 1 before it).
    """
    mask = None
    if causal:
        t = torch.arange(q_len)[:, None] + (kv_len - q_len)
        s = torch.arange(kv_len)[None, :]
        mask = t >= s
        if window is not None:
            mask = mask & (t - s < window)
        if chunk is not None:  # Llama 4: only the keys of the query's own chunk
            mask = mask & (torch.div(t, chunk, rounding_mode="floor") == torch.div(s, chunk, rounding_mode="floor"))
        mask = mask[None]
    elif window is not None:
        raise ValueError("a sliding window needs causal attention")
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids
        same = q_seg[:, :, None] == kv_seg[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def attend(q, k, v, *, causal: bool, segment_ids=None, scale: float | None = None, window: int | None = None,
           softcap: float | None = None, sinks: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]; kv heads repeated explicitly for clarity.

    Scores are q·k * scale (default H ** -0.5), then softcap * tanh(scores / softcap) when set (Gemma 2),
    then the causal / window / segment mask; `sinks` [N] join each head's softmax as one more column that is
    dropped after it (gpt-oss).
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = H ** -0.5 if scale is None else scale
    k = k.repeat_interleave(N // K, dim=2)
    v = v.repeat_interleave(N // K, dim=2)
    scores = torch.einsum("btnh,bsnh->bnts", q.float(), k.float()) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = make_mask(T, S, causal=causal, segment_ids=segment_ids, window=window, chunk=chunk)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], -1e30)
    if sinks is not None:
        column = sinks.float().reshape(1, N, 1, 1).expand(B, N, T, 1)
        probs = torch.cat([scores, column], -1).softmax(-1)[..., :-1].to(v.dtype)
    else:
        probs = scores.softmax(-1).to(v.dtype)
    return torch.einsum("bnts,bsnh->btnh", probs, v)


class Attention(nn.Module):
    """Self-attention (causal or bidirectional), or cross-attention when `kv` comes from another sequence.

    `window`: this layer's sliding window (ModelConfig.layer_window(i)), None for full attention.
    """

    def __init__(self, cfg: ModelConfig, causal: bool = True, window: int | None = None, layer: int = 0):
        super().__init__()
        D, N = cfg.d_model, cfg.n_heads
        K, H = cfg.layer_kv_heads(layer), cfg.layer_head_dim(layer)  # Gemma 4's full layers: their own sizes
        qkv_bias = cfg.use_bias or cfg.attention.qkv_bias  # Qwen2: biases on q/k/v only
        # Qwen3-Next / Qwen3.5: q_proj also emits an output gate, per head [query_h | gate_h]
        self.output_gate = cfg.attention.output_gate
        self.q_proj = Linear(D, N * H * (2 if self.output_gate else 1), bias=qkv_bias)
        self.k_proj = Linear(D, K * H, bias=qkv_bias)
        # Gemma 4: full layers' values are the key projection
        k_eq_v = cfg.attention.k_eq_v and cfg.layer_type(layer) == "full_attention"
        self.v_proj = None if k_eq_v else Linear(D, K * H, bias=qkv_bias)
        self.v_norm_eps = cfg.norm_eps if cfg.attention.v_norm else None
        self.o_proj = Linear(N * H, D, bias=cfg.use_bias)
        # q/k RMSNorm: per head over H (Qwen3, Gemma 3) or over the whole projection N*H / K*H (OLMo 2)
        self.qk_norm = cfg.attention.qk_norm
        self.qk_norm_after_rope = cfg.attention.qk_norm_after_rope
        if cfg.attention.qk_norm in ("head", "proj"):
            self.q_norm = make_norm(cfg, H if cfg.attention.qk_norm == "head" else N * H)
            self.k_norm = make_norm(cfg, H if cfg.attention.qk_norm == "head" else K * H)
        # Llama 4: per-head RMS without weight, after RoPE, on RoPE layers
        self.qk_rms_eps = cfg.norm_eps if cfg.attention.qk_norm == "rms" and cfg.layer_rope(layer) else None
        self.chunk = cfg.layer_chunk(layer)
        self.n_heads, self.n_kv_heads, self.head_dim = N, K, H
        self.causal, self.window = causal, window
        self.scale, self.softcap = cfg.layer_attention_scale(layer), cfg.attention.logit_softcap
        self.sinks = nn.Parameter(torch.zeros(N)) if cfg.attention.sinks else None

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, S, K, H] of x [B, S, D] (k normalised when qk_norm is set)."""
        B, S, _ = x.shape
        k = self.k_proj(x)  # [B, S, K*H]
        v = k if self.v_proj is None else self.v_proj(x)
        if self.qk_norm == "proj":
            k = self.k_norm(k)
        k, v = (t.view(B, S, self.n_kv_heads, self.head_dim) for t in (k, v))
        if self.qk_norm == "head" and not self.qk_norm_after_rope:
            k = self.k_norm(k)
        if self.v_norm_eps is not None:  # Gemma 4: x / rms(x), no weight
            v = (v.float() * torch.rsqrt(v.float().pow(2).mean(-1, keepdim=True) + self.v_norm_eps)).to(v.dtype)
        return k, v

    def forward(self, x: torch.Tensor, rope=None, segment_ids=None, kv=None, *, return_kv: bool = False,
                shared=None) -> torch.Tensor:
        """`kv`: cross-attention to another sequence's (k, v). `shared`: a kv-shared layer's source layer's rotated
        (k, v) of the same tokens (Gemma 4). `return_kv`: also return this layer's rotated (k, v)."""
        B, T, _ = x.shape
        q, gate = self.q_proj(x), None  # [B, T, N*H], or [B, T, N*2H] with a gate
        if self.output_gate:  # norms and RoPE touch the query half only
            q, gate = (t.reshape(B, T, -1) for t in q.view(B, T, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1))
        if self.qk_norm == "proj":
            q = self.q_norm(q)
        q = q.view(B, T, self.n_heads, self.head_dim)
        if self.qk_norm == "head" and not self.qk_norm_after_rope:
            q = self.q_norm(q)
        temperature = None
        if isinstance(rope, QueryScale):  # a NoPE layer's query temperature (Llama 4)
            rope, temperature = None, rope.scale
        if shared is not None:
            k, v = shared
            q = apply_rope(q, *rope) if rope is not None else q
        elif kv is None:
            k, v = self.project_kv(x)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if self.qk_norm_after_rope:  # Hunyuan
                q, k = self.q_norm(q), self.k_norm(k)
            if self.qk_rms_eps is not None:  # Llama 4
                q, k = (t.float() * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + self.qk_rms_eps) for t in (q, k))
        else:
            k, v = kv
        if temperature is not None:
            q = q * temperature[:, :, None, None]
        seg = segment_ids if segment_ids is None or isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        out = attend(q, k, v, causal=self.causal, segment_ids=seg, scale=self.scale, window=self.window,
                     softcap=self.softcap, sinks=self.sinks, chunk=self.chunk)
        out = out.reshape(B, T, self.n_heads * self.head_dim)  # [B, T, N*H]
        if gate is not None:
            out = out * torch.sigmoid(gate)
        out = self.o_proj(out)
        return (out, (k, v)) if return_kv else out
