"""PyTorch mirror of jaxformer.models.decoder.DecoderLM; state_dict keys equal jaxformer's parameter paths."""

from __future__ import annotations

import torch
from torch import nn

from jaxformer.config import ModelConfig
from torch_ref.attention import Attention
from torch_ref.layers import MLP, Embed, Linear, make_norm, rope_cos_sin, sinusoidal_positions


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, segment_ids=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, segment_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.d_model)
        self.embed_positions = Embed(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        B, T = tokens.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        x = self.embed_tokens(tokens)
        rope = None
        if cfg.position == "learned":
            x = x + self.embed_positions(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(positions, cfg.d_model).to(x.dtype)
        elif cfg.position == "rope":
            rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        for layer in self.layers:
            x = layer(x, rope, segment_ids)
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.float()
