"""PyTorch mirror of jaxformer.models.decoder.DecoderLM; state_dict keys equal jaxformer's parameter paths."""

from __future__ import annotations

import math

import torch
from torch import nn

from jaxformer.config import STATE_LAYER_TYPES, ModelConfig
from torch_ref.attention import Attention
from torch_ref.delta_net import GatedDeltaNet
from torch_ref.latent_attention import LatentAttention
from torch_ref.layers import MLP, Embed, Linear, QueryScale, make_norm, record, rope_cos_sin, sinusoidal_positions
from torch_ref.moe import MoE
from torch_ref.short_conv import ShortConv


class Block(nn.Module):
    """Residual block number `layer`; cfg.norm_placement places its norms (parameter names as Hugging Face's):

    pre (Llama):        x + attn(input_layernorm(x)); x + mlp(post_attention_layernorm(x))
    sandwich (Gemma 2): x + post_attention_layernorm(attn(input_layernorm(x)));
                        x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))
    post (OLMo 2):      x + post_attention_layernorm(attn(x)); x + post_feedforward_layernorm(mlp(x))
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.placement = cfg.norm_placement
        self.residual_scale = cfg.scales.residual  # Granite: each branch's output times it
        self.rope_type = cfg.layer_rope(layer)  # the RoPE table it takes (full / sliding attention's), None: no RoPE
        if self.placement != "post":
            self.input_layernorm = make_norm(cfg)
        kind = cfg.layer_type(layer)  # the token mixer: self_attn, linear_attn (Qwen3.5) or conv (LFM2)
        attention = LatentAttention if cfg.latent.kv_rank else Attention  # DeepSeek's latent attention, or softmax
        self.self_attn = None if kind in STATE_LAYER_TYPES else attention(cfg, window=cfg.layer_window(layer),
                                                                          layer=layer)
        self.linear_attn = GatedDeltaNet(cfg) if kind == "linear_attention" else None
        self.conv = ShortConv(cfg) if kind == "conv" else None
        if self.placement != "parallel":
            self.post_attention_layernorm = make_norm(cfg)
        if self.placement == "sandwich":
            self.pre_feedforward_layernorm = make_norm(cfg)
        if self.placement in ("sandwich", "post"):
            self.post_feedforward_layernorm = make_norm(cfg)
        self.sparse = cfg.is_moe_layer(layer)
        self.mlp = MoE(cfg) if self.sparse else MLP(cfg)

    def mix(self, h, rope, segment_ids):
        if self.self_attn is not None:
            return self.self_attn(h, rope, segment_ids)
        return (self.linear_attn if self.linear_attn is not None else self.conv)(h, segment_ids)

    def forward(self, x, rope=None, segment_ids=None, moe_stats=None):  # [B, T, D] -> [B, T, D]
        mlp = (lambda h: self.mlp(h, moe_stats)) if self.sparse else self.mlp
        s = self.residual_scale
        if self.placement == "pre":
            x = x + s * self.mix(self.input_layernorm(x), rope, segment_ids)
            return x + s * mlp(self.post_attention_layernorm(x))
        if self.placement == "sandwich":
            x = x + s * self.post_attention_layernorm(self.mix(self.input_layernorm(x), rope, segment_ids))
            return x + s * self.post_feedforward_layernorm(mlp(self.pre_feedforward_layernorm(x)))
        if self.placement == "parallel":  # Cohere: one norm feeds both branches
            n = self.input_layernorm(x)
            return x + s * self.mix(n, rope, segment_ids) + s * mlp(n)
        x = x + s * self.post_attention_layernorm(self.mix(x, rope, segment_ids))
        return x + s * self.post_feedforward_layernorm(mlp(x))


class DecoderLM(nn.Module):
    """tokens [B, T] -> float32 logits [B, T, V]; every family of ModelConfig, eager reference math."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.d_model)
        self.embed_positions = Embed(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.layers = nn.ModuleList([Block(cfg, layer=i) for i in range(cfg.n_layers)])
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, capture: dict | None = None,
                moe_stats: list | None = None) -> torch.Tensor:
        """`capture` (a dict) receives the residual stream as jaxformer's DecoderLM records it:
        `embed_tokens`, `layers.{i}`, `norm`; `moe_stats` (a list) each sparse block's router statistics."""
        cfg = self.config
        B, T = tokens.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        x = self.embed_tokens(tokens)  # [B, T, D]
        if cfg.scale_embedding:  # Gemma: the normaliser sqrt(D) in the hidden dtype
            x = x * torch.tensor(math.sqrt(cfg.d_model), dtype=x.dtype)
        if cfg.scales.embedding != 1.0:  # Granite
            x = x * cfg.scales.embedding
        ropes = None
        if cfg.position == "learned":
            x = x + self.embed_positions(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(positions, cfg.d_model).to(x.dtype)
        elif cfg.position == "rope":
            full = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope.theta, cfg.rope.scaling, cfg.max_seq_len)
            # sliding layers: their own base, unscaled (Gemma 3), else the same RoPE as full layers
            local = full if cfg.rope.local_theta is None else rope_cos_sin(positions, cfg.rotary_dim,
                                                                            cfg.rope.local_theta)
            ropes = {"full_attention": full, "sliding_attention": local, "chunked_attention": full}  # [B, T, H] each
            if cfg.attention.temperature_floor is not None:  # Llama 4's NoPE layers: a query temperature
                p = positions.float()
                ropes["nope"] = QueryScale(1.0 + cfg.attention.temperature_scale * torch.log1p(
                    torch.floor((p + 1.0) / cfg.attention.temperature_floor)))
        record(capture, "embed_tokens", x)
        for i, layer in enumerate(self.layers):
            rope = None if ropes is None else ropes.get("nope" if layer.rope_type is None else layer.rope_type)
            x = layer(x, rope, segment_ids, moe_stats)
            record(capture, f"layers.{i}", x)
        x = self.norm(x)
        record(capture, "norm", x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)  # [B, T, V]
        if cfg.scales.logits != 1.0:  # Cohere's logit_scale, Granite's 1 / logits_scaling
            logits = logits * cfg.scales.logits
        if cfg.final_logit_softcap is not None:  # Gemma 2
            logits = cfg.final_logit_softcap * torch.tanh(logits / cfg.final_logit_softcap)
        return logits.float()
