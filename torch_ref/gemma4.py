"""PyTorch mirror of jaxformer.models.gemma4 (Gemma 4's block and model); state_dict keys equal jaxformer's paths."""

from __future__ import annotations

import math

import torch
from torch import nn

from jaxformer.config import ModelConfig
from torch_ref.attention import Attention
from torch_ref.layers import ACTIVATIONS, MLP, Embed, Linear, make_norm, record, rope_cos_sin
from torch_ref.moe import Experts, route


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Gemma4Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, E = cfg.d_model, cfg.moe.n_experts
        self.proj = Linear(D, E, bias=False)
        self.scale = nn.Parameter(torch.ones(D))
        self.per_expert_scale = nn.Parameter(torch.ones(E))
        self.eps = cfg.norm_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, E] float32
        h = rms_normalize(x, self.eps) * self.scale * x.shape[-1] ** -0.5
        return self.proj(h).float()


class KVSharingBlock(nn.Module):
    """What Gemma 4's and Gemma 3n's blocks share: attention that may reuse its source block's keys and values (and
    then has no k/v projections), and the per-layer input's gated branch."""

    def _init_attention(self, cfg: ModelConfig, layer: int) -> None:
        self.rope_type = cfg.layer_rope(layer)
        self.kv_source = cfg.kv_source(layer)
        self.shares_kv = self.kv_source != layer
        self.self_attn = Attention(cfg, window=cfg.layer_window(layer), layer=layer)
        if self.shares_kv:
            del self.self_attn.k_proj, self.self_attn.k_norm
            self.self_attn.v_proj = None

    def _init_per_layer_input(self, cfg: ModelConfig) -> None:
        self.act = ACTIVATIONS[cfg.activation]
        self.per_layer_input_gate = Linear(cfg.d_model, cfg.per_layer_dim, bias=False)
        self.per_layer_projection = Linear(cfg.per_layer_dim, cfg.d_model, bias=False)
        self.post_per_layer_input_norm = make_norm(cfg)

    def attend(self, h, rope, segment_ids, shared):
        """(attention of h, this block's rotated (k, v) or None for a kv-shared block, which reads `shared`)."""
        if self.shares_kv:
            return self.self_attn(h, rope, segment_ids, shared=shared), None
        return self.self_attn(h, rope, segment_ids, return_kv=True)

    def per_layer_branch(self, x, per_layer_input):
        g = self.act(self.per_layer_input_gate(x)) * per_layer_input
        return self.post_per_layer_input_norm(self.per_layer_projection(g))


class Gemma4Block(KVSharingBlock):
    """Sandwich-normed attention and MLP (with experts beside the MLP), the per-layer input's gated residual, times
    layer_scalar; a kv-shared block (cfg.kv_source(layer) != layer) attends to its source block's keys and values."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.config = cfg
        self.input_layernorm = make_norm(cfg)
        self._init_attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg)
        self.pre_feedforward_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg.replace(d_ff=cfg.layer_d_ff(layer)))
        self.post_feedforward_layernorm = make_norm(cfg)
        self.sparse = cfg.moe.n_experts > 0
        if self.sparse:
            self.router = Gemma4Router(cfg)
            self.experts = Experts(cfg)
            self.post_feedforward_layernorm_1 = make_norm(cfg)
            self.pre_feedforward_layernorm_2 = make_norm(cfg)
            self.post_feedforward_layernorm_2 = make_norm(cfg)
        if cfg.per_layer_dim:
            self._init_per_layer_input(cfg)
        self.layer_scalar = nn.Parameter(torch.ones(1))

    def forward(self, x, rope, segment_ids, per_layer_input, shared=None, moe_stats=None):
        """-> (x, this block's rotated (k, v), or None for a kv-shared block)."""
        h, kv = self.attend(self.input_layernorm(x), rope, segment_ids, shared)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.sparse:
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(self._experts(x, moe_stats))
        x = x + self.post_feedforward_layernorm(h)
        if per_layer_input is not None:
            x = x + self.per_layer_branch(x, per_layer_input)
        return x * self.layer_scalar.detach(), kv

    def _experts(self, x: torch.Tensor, stats: list | None) -> torch.Tensor:
        cfg = self.config
        B, T, D = x.shape
        logits = self.router(x.reshape(B * T, D))  # [N, E]
        weights, idx = route(logits, cfg, expert_scale=self.router.per_expert_scale)  # [N, k]
        h = self.pre_feedforward_layernorm_2(x).reshape(B * T, D)
        y = torch.zeros_like(h)
        for e in range(cfg.moe.n_experts):
            token, slot = torch.where(idx == e)
            if len(token):
                y.index_add_(0, token, self.experts(h[token], e) * weights[token, slot, None].to(h.dtype))
        if stats is not None:
            load = torch.bincount(idx.reshape(-1), minlength=cfg.moe.n_experts).float()
            stats.append({"router_logits": logits, "load": load, "dropped": torch.zeros(())})
        return y.reshape(B, T, D)


class Gemma4LM(nn.Module):
    """tokens [B, T] -> float32 logits [B, T, V], as jaxformer's Gemma4LM computes them. Gemma 3n's model overrides
    the residual stream's hooks: `streams` (from the embedding), `view` (what capture records), `merge` (to the head)."""

    block = Gemma4Block

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        L, P = cfg.n_layers, cfg.per_layer_dim
        self.embed_tokens = Embed(cfg.vocab_size, cfg.d_model)
        if P:
            self.embed_tokens_per_layer = Embed(cfg.per_layer_vocab_size or cfg.vocab_size, L * P)
            self.per_layer_model_projection = Linear(cfg.d_model, L * P, bias=False)
            self.per_layer_projection_norm = make_norm(cfg, P)
        self.layers = nn.ModuleList([self.block(cfg, layer=i) for i in range(L)])
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, capture: dict | None = None,
                moe_stats: list | None = None) -> torch.Tensor:
        cfg = self.config
        B, T = tokens.shape
        L, P = cfg.n_layers, cfg.per_layer_dim
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        x = self.embed_tokens(tokens) * torch.tensor(math.sqrt(cfg.d_model), dtype=torch.float32)  # [B, T, D]
        per_layer = None
        if P:  # ids past the per-layer table read its row 0 (Gemma 3n's table is shorter than its vocabulary)
            own = self.embed_tokens_per_layer(torch.where(tokens < (cfg.per_layer_vocab_size or cfg.vocab_size),
                                                          tokens, 0)) * math.sqrt(P)
            projected = self.per_layer_model_projection(x) * cfg.d_model ** -0.5
            projected = self.per_layer_projection_norm(projected.reshape(B, T, L, P))
            per_layer = (projected + own.reshape(B, T, L, P)) * 2 ** -0.5  # [B, T, L, P]
        full_dim, local_dim = cfg.type_rotary_dim("full_attention"), cfg.type_rotary_dim("sliding_attention")
        full = rope_cos_sin(positions, full_dim, cfg.rope.theta, cfg.rope.scaling, cfg.max_seq_len)
        # sliding layers: their own base (and head size), unscaled; else the full layers' RoPE
        local = full if cfg.rope.local_theta is None and local_dim == full_dim else rope_cos_sin(
            positions, local_dim, cfg.rope.local_theta or cfg.rope.theta)
        ropes = {"full_attention": full, "sliding_attention": local}
        x = self.streams(x)
        record(capture, "embed_tokens", self.view(x))
        kvs = {}
        for i, layer in enumerate(self.layers):
            rope = None if layer.rope_type is None else ropes[layer.rope_type]
            x, kv = layer(x, rope, segment_ids, None if per_layer is None else per_layer[:, :, i],
                          shared=kvs.get(layer.kv_source), moe_stats=moe_stats)
            if kv is not None:
                kvs[i] = kv
            record(capture, f"layers.{i}", self.view(x))
        x = self.norm(self.merge(x))
        record(capture, "norm", x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        if cfg.final_logit_softcap is not None:
            logits = cfg.final_logit_softcap * torch.tanh(logits / cfg.final_logit_softcap)
        return logits.float()

    def streams(self, x):
        return x

    def view(self, x):
        return x

    def merge(self, x):
        return x

