"""PyTorch mirror of jaxformer.models.encdec; state_dict keys equal jaxformer's parameter paths (no dropout)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from jaxformer.config import EncDecConfig
from torch_ref.attention import Attention
from torch_ref.layers import MLP, Embed, Linear, make_norm, record, sinusoidal_positions


class _Residual(nn.Module):
    post_norm: bool

    def _pre(self, norm, x):
        return x if self.post_norm else norm(x)

    def _post(self, norm, x, fx):
        return norm(x + fx) if self.post_norm else x + fx


class EncoderLayer(_Residual):
    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.self_attn = Attention(cfg, causal=False)
        self.self_attn_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.mlp_norm = make_norm(cfg)
        self.post_norm = cfg.post_norm

    def forward(self, x, segment_ids=None):
        x = self._post(self.self_attn_norm, x, self.self_attn(self._pre(self.self_attn_norm, x),
                                                              segment_ids=segment_ids))
        return self._post(self.mlp_norm, x, self.mlp(self._pre(self.mlp_norm, x)))


class DecoderLayer(_Residual):
    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.self_attn = Attention(cfg, causal=True)
        self.self_attn_norm = make_norm(cfg)
        self.cross_attn = Attention(cfg, causal=False)
        self.cross_attn_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.mlp_norm = make_norm(cfg)
        self.post_norm = cfg.post_norm

    def forward(self, y, memory, cross_segment_ids=None):
        y = self._post(self.self_attn_norm, y, self.self_attn(self._pre(self.self_attn_norm, y)))
        kv = self.cross_attn.project_kv(memory)
        y = self._post(self.cross_attn_norm, y, self.cross_attn(self._pre(self.cross_attn_norm, y),
                                                                segment_ids=cross_segment_ids, kv=kv))
        return self._post(self.mlp_norm, y, self.mlp(self._pre(self.mlp_norm, y)))


class PointerGenerator(nn.Module):
    """log(g * softmax(logits) + (1 - g) * copy attention scattered onto the source ids); see models/encdec.py."""

    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        D = cfg.d_model
        self.q_proj = Linear(D, D, bias=False)
        self.k_proj = Linear(D, D, bias=False)
        self.gate = Linear(2 * D, 1, bias=True)

    def forward(self, y, logits, memory, src_tokens, src_mask=None):
        B, T, D = y.shape
        scores = self.q_proj(y) @ self.k_proj(memory).transpose(1, 2) / math.sqrt(D)  # [B, T, S]
        if src_mask is not None:
            scores = scores.masked_fill(src_mask[:, None, :] == 0, float("-inf"))
        attn = scores.softmax(-1)
        g = torch.sigmoid(self.gate(torch.cat([y, attn @ memory], dim=-1)))  # [B, T, 1]
        index = src_tokens[:, None, :].expand(B, T, src_tokens.shape[1]).long()
        copy = torch.zeros(B, T, logits.shape[-1], dtype=attn.dtype).scatter_add_(2, index, attn)
        return torch.log((g * logits.softmax(-1) + (1 - g) * copy).clamp_min(1e-30))


class Encoder(nn.Module):
    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers)])
        self.norm = None if cfg.post_norm else make_norm(cfg)

    def forward(self, x, segment_ids=None, capture=None):
        for i, layer in enumerate(self.layers):
            x = layer(x, segment_ids)
            record(capture, f"encoder.layers.{i}", x)
        if self.norm is not None:
            x = self.norm(x)
            record(capture, "encoder.norm", x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.n_layers)])
        self.norm = None if cfg.post_norm else make_norm(cfg)

    def forward(self, y, memory, cross_segment_ids=None, capture=None):
        for i, layer in enumerate(self.layers):
            y = layer(y, memory, cross_segment_ids)
            record(capture, f"decoder.layers.{i}", y)
        if self.norm is not None:
            y = self.norm(y)
            record(capture, "decoder.norm", y)
        return y


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.config = cfg
        V, D, P = cfg.vocab_size, cfg.d_model, cfg.max_seq_len
        self.embed_tokens = Embed(V, D)
        self.embed_source_tokens = None if cfg.share_embeddings else Embed(V, D)
        learned = cfg.position == "learned"
        self.embed_positions = Embed(P, D) if learned else None
        self.embed_source_positions = Embed(P, D) if learned else None
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.lm_head = None if cfg.tie_embeddings else Linear(D, V, bias=False)
        self.final_logits_bias = nn.Parameter(torch.zeros(V)) if cfg.logits_bias else None
        self.pointer = PointerGenerator(cfg) if cfg.pointer_generator else None

    def forward(self, src_tokens, tgt_tokens, src_mask=None, capture=None):
        """`capture` (a dict) receives the residual streams as jaxformer's EncoderDecoder records them."""
        return self.decode(tgt_tokens, self.encode(src_tokens, src_mask, capture), src_mask, src_tokens, capture)

    def encode(self, src_tokens, src_mask=None, capture=None):
        table = self.embed_tokens if self.embed_source_tokens is None else self.embed_source_tokens
        x = self._embed(src_tokens, table, self.embed_source_positions)
        record(capture, "embed_source_tokens", x)
        seg = None if src_mask is None else (torch.ones_like(src_mask, dtype=torch.int32), src_mask.to(torch.int32))
        return self.encoder(x, seg, capture)

    def decode(self, tgt_tokens, memory, src_mask=None, src_tokens=None, capture=None):
        B, T = tgt_tokens.shape
        y = self._embed(tgt_tokens, self.embed_tokens, self.embed_positions)
        record(capture, "embed_tokens", y)
        seg = None if src_mask is None else (torch.ones(B, T, dtype=torch.int32), src_mask.to(torch.int32))
        y = self.decoder(y, memory, seg, capture)
        logits = self.embed_tokens.attend(y) if self.lm_head is None else self.lm_head(y)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        if self.pointer is not None:
            logits = self.pointer(y, logits.float(), memory, src_tokens, src_mask)
        return logits.float()

    def _embed(self, tokens, table, pos_table):
        cfg = self.config
        B, T = tokens.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
        positions = torch.arange(T).expand(B, T)
        x = table(tokens)
        if cfg.scale_embedding:
            x = x * math.sqrt(cfg.d_model)
        pos = pos_table(positions) if pos_table is not None else sinusoidal_positions(positions, cfg.d_model)
        return x + pos.to(x.dtype)


def label_smoothed_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, smoothing: float):
    """Mean over kept tokens of torch's own label-smoothed cross-entropy."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long(), reduction="none",
                                label_smoothing=smoothing)
    m = mask.flatten().float()
    return (per_token * m).sum() / m.sum()
