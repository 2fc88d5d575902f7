"""PyTorch mirror of jaxformer.models.gemma3n (Gemma 3n's AltUp / LAuReL block and model); state_dict keys equal
jaxformer's paths."""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from jaxformer.config import ModelConfig
from torch_ref.attention import Attention
from torch_ref.layers import ACTIVATIONS, MLP, Embed, Linear, make_norm, record, rope_cos_sin


class SparseGateMLP(MLP):
    def __init__(self, cfg: ModelConfig, sparsity: float):
        super().__init__(cfg)
        self.std_multiplier = statistics.NormalDist().inv_cdf(sparsity) if sparsity > 0 else None
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x):
        gate = self.gate_proj(x)
        if self.std_multiplier is not None:  # Gaussian top-k: keep what passes mean + std * Phi^-1(s)
            cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * self.std_multiplier
            gate = torch.relu(gate - cutoff)
        return self.down_proj(self.act(gate) * self.up_proj(x))


class Laurel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.linear_left = Linear(cfg.d_model, cfg.laurel_rank, bias=False)
        self.linear_right = Linear(cfg.laurel_rank, cfg.d_model, bias=False)
        self.post_laurel_norm = make_norm(cfg)

    def forward(self, x):
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class AltUp(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        A, D = cfg.altup.inputs, cfg.d_model
        self.correct_output_scale = nn.Parameter(torch.zeros(D))
        self.correction_coefs = Linear(A, A, bias=False)
        self.prediction_coefs = Linear(A, A * A, bias=False)
        self.modality_router = Linear(D, A, bias=False)
        self.router_norm = make_norm(cfg)
        self.A, self.D, self.active, self.clip = A, D, cfg.altup.active_idx, cfg.altup.coef_clip

    def _coefs(self, layer, m):
        w = layer.weight if self.clip is None else layer.weight.clamp(-self.clip, self.clip)
        return m @ w.T

    def modalities(self, x):  # [B, T, D] -> [B, T, A]
        return torch.tanh(self.modality_router(self.router_norm(x) / self.D).float()).to(x.dtype)

    def predict(self, xs):  # [A, B, T, D]
        A = self.A
        coefs = self._coefs(self.prediction_coefs, self.modalities(xs[self.active]))
        coefs = coefs.reshape(*coefs.shape[:-1], A, A)  # [B, T, q, p]
        out = torch.stack([sum(coefs[..., q, p, None] * xs[p] for p in range(A)) for q in range(A)])
        return xs + out

    def correct(self, predictions, activated):
        coefs = self._coefs(self.correction_coefs, self.modalities(activated)) + 1.0  # [B, T, A]
        innovation = activated - predictions[self.active]
        return torch.stack([predictions[q] + coefs[..., q, None] * innovation for q in range(self.A)])


class Gemma3nBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.rope_type = cfg.layer_rope(layer)
        self.kv_source = cfg.kv_source(layer)
        self.shares_kv = self.kv_source != layer
        self.active, self.correct_scale = cfg.altup.active_idx, cfg.altup.correct_scale
        self.altup = AltUp(cfg)
        self.input_layernorm = make_norm(cfg)
        self.laurel = Laurel(cfg)
        self.self_attn = Attention(cfg, window=cfg.layer_window(layer), layer=layer)
        if self.shares_kv:
            del self.self_attn.k_proj, self.self_attn.k_norm
            self.self_attn.v_proj = None
        self.post_attention_layernorm = make_norm(cfg)
        self.pre_feedforward_layernorm = make_norm(cfg)
        self.mlp = SparseGateMLP(cfg, cfg.activation_sparsity[layer] if cfg.activation_sparsity else 0.0)
        self.post_feedforward_layernorm = make_norm(cfg)
        self.act = ACTIVATIONS[cfg.activation]
        self.per_layer_input_gate = Linear(cfg.d_model, cfg.per_layer_dim, bias=False)
        self.per_layer_projection = Linear(cfg.per_layer_dim, cfg.d_model, bias=False)
        self.post_per_layer_input_norm = make_norm(cfg)

    def forward(self, xs, rope, segment_ids, per_layer_input, shared=None, moe_stats=None):
        predictions = self.altup.predict(xs)
        x = predictions[self.active]
        n = self.input_layernorm(x)
        if self.shares_kv:
            h, kv = self.self_attn(n, rope, segment_ids, shared=shared), None
        else:
            h, kv = self.self_attn(n, rope, segment_ids, return_kv=True)
        h = x + self.post_attention_layernorm(h)
        h = (h + self.laurel(n)) / math.sqrt(2)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        corrected = self.altup.correct(predictions, h)
        first = corrected[self.active]
        if self.correct_scale:
            first = first * self.altup.correct_output_scale
        g = self.act(self.per_layer_input_gate(first)) * per_layer_input
        extra = self.post_per_layer_input_norm(self.per_layer_projection(g))
        return torch.cat([corrected[:1], corrected[1:] + extra]), kv


def _rescaled(y, like):
    return y * like.pow(2).mean(-1, keepdim=True).sqrt() / y.pow(2).mean(-1, keepdim=True).clamp(min=1e-5).sqrt()


class Gemma3nLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        L, P, D, A = cfg.n_layers, cfg.per_layer_dim, cfg.d_model, cfg.altup.inputs
        self.embed_tokens = Embed(cfg.vocab_size, D)
        self.embed_tokens_per_layer = Embed(cfg.per_layer_vocab_size or cfg.vocab_size, L * P)
        self.per_layer_model_projection = Linear(D, L * P, bias=False)
        self.per_layer_projection_norm = make_norm(cfg, P)
        self.layers = nn.ModuleList([Gemma3nBlock(cfg, layer=i) for i in range(L)])
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else Linear(D, cfg.vocab_size, bias=False)
        self.altup_projections = nn.ModuleList([Linear(D, D, bias=False) for _ in range(A - 1)])
        self.altup_unembed_projections = nn.ModuleList([Linear(D, D, bias=False) for _ in range(A - 1)])

    def forward(self, tokens, positions=None, segment_ids=None, capture=None, moe_stats=None):
        cfg = self.config
        B, T = tokens.shape
        L, P, active = cfg.n_layers, cfg.per_layer_dim, cfg.altup.active_idx
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        x = self.embed_tokens(tokens) * torch.tensor(math.sqrt(cfg.d_model), dtype=torch.float32)
        ids = torch.where(tokens < (cfg.per_layer_vocab_size or cfg.vocab_size), tokens, 0)
        own = self.embed_tokens_per_layer(ids) * math.sqrt(P)
        projected = self.per_layer_projection_norm((self.per_layer_model_projection(x) * cfg.d_model ** -0.5)
                                                   .reshape(B, T, L, P))
        per_layer = (projected + own.reshape(B, T, L, P)) * 2 ** -0.5
        local_theta = cfg.rope.local_theta or cfg.rope.theta
        full = rope_cos_sin(positions, cfg.head_dim, cfg.rope.theta, cfg.rope.scaling, cfg.max_seq_len)
        ropes = {"full_attention": full,
                 "sliding_attention": full if cfg.rope.local_theta is None else rope_cos_sin(positions, cfg.head_dim,
                                                                                              local_theta)}
        xs = torch.stack([x] + [_rescaled(p(x), x) for p in self.altup_projections])
        record(capture, "embed_tokens", xs[active])
        kvs = {}
        for i, layer in enumerate(self.layers):
            rope = None if layer.rope_type is None else ropes[layer.rope_type]
            xs, kv = layer(xs, rope, segment_ids, per_layer[:, :, i], shared=kvs.get(layer.kv_source))
            if kv is not None:
                kvs[i] = kv
            record(capture, f"layers.{i}", xs[active])
        x = torch.stack([xs[0]] + [_rescaled(p(s), xs[0]) for p, s in zip(self.altup_unembed_projections, xs[1:])])
        x = self.norm(x.mean(0))
        record(capture, "norm", x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        if cfg.final_logit_softcap is not None:
            logits = cfg.final_logit_softcap * torch.tanh(logits / cfg.final_logit_softcap)
        return logits.float()
