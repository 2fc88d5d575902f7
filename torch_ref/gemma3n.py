"""PyTorch mirror of jaxformer.models.gemma3n (Gemma 3n's AltUp / LAuReL block and model); state_dict keys equal
jaxformer's paths."""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from jaxformer.config import ModelConfig
from torch_ref.gemma4 import Gemma4LM, KVSharingBlock
from torch_ref.layers import ACTIVATIONS, MLP, Linear, make_norm


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


class Gemma3nBlock(KVSharingBlock):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.active, self.correct_scale = cfg.altup.active_idx, cfg.altup.correct_scale
        self.altup = AltUp(cfg)
        self.input_layernorm = make_norm(cfg)
        self.laurel = Laurel(cfg)
        self._init_attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg)
        self.pre_feedforward_layernorm = make_norm(cfg)
        self.mlp = SparseGateMLP(cfg, cfg.activation_sparsity[layer] if cfg.activation_sparsity else 0.0)
        self.post_feedforward_layernorm = make_norm(cfg)
        self._init_per_layer_input(cfg)

    def forward(self, xs, rope, segment_ids, per_layer_input, shared=None, moe_stats=None):
        predictions = self.altup.predict(xs)
        x = predictions[self.active]
        n = self.input_layernorm(x)
        h, kv = self.attend(n, rope, segment_ids, shared)
        h = x + self.post_attention_layernorm(h)
        h = (h + self.laurel(n)) / math.sqrt(2)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        corrected = self.altup.correct(predictions, h)
        first = corrected[self.active]
        if self.correct_scale:
            first = first * self.altup.correct_output_scale
        return torch.cat([corrected[:1], corrected[1:] + self.per_layer_branch(first, per_layer_input)]), kv


def _rescaled(y, like):
    return y * like.pow(2).mean(-1, keepdim=True).sqrt() / y.pow(2).mean(-1, keepdim=True).clamp(min=1e-5).sqrt()


class Gemma3nLM(Gemma4LM):
    """Gemma4LM over AltUp's streams: made from the embedding by altup_projections, averaged back after the
    altup_unembed_projections before the final norm; capture records the active stream."""

    block = Gemma3nBlock

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        D, A = cfg.d_model, cfg.altup.inputs
        self.altup_projections = nn.ModuleList([Linear(D, D, bias=False) for _ in range(A - 1)])
        self.altup_unembed_projections = nn.ModuleList([Linear(D, D, bias=False) for _ in range(A - 1)])

    def streams(self, x):
        return torch.stack([x] + [_rescaled(p(x), x) for p in self.altup_projections])

    def view(self, xs):
        return xs[self.config.altup.active_idx]

    def merge(self, xs):
        return torch.stack([xs[0]] + [_rescaled(p(s), xs[0])
                                      for p, s in zip(self.altup_unembed_projections, xs[1:])]).mean(0)
