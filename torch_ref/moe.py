"""PyTorch mirror of jaxformer.models.moe: same parameter names and layouts, eager per-expert loops."""

from __future__ import annotations

import math

import torch
from torch import nn

from jaxformer.config import ModelConfig
from torch_ref.layers import ACTIVATIONS, MLP, Linear


def route(logits: torch.Tensor, cfg: ModelConfig, correction: torch.Tensor | None = None,
          expert_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (weights [N, k] float32, expert ids [N, k]): mixtral softmax over the top-k
    logits; qwen softmax over all E, top-k, renormalised when norm_topk_prob; deepseek sigmoid scores + correction
    choose within the best topk_group of n_group groups, the chosen scores weigh (x routed_scaling_factor); gemma4
    is qwen's times `expert_scale` [E] of the chosen experts."""
    logits = logits.float()
    moe = cfg.moe
    if moe.router == "deepseek":
        N, E = logits.shape
        scores = logits.sigmoid()
        choice = scores + correction.float()
        group_score = choice.view(N, moe.n_group, -1).topk(2, dim=-1).values.sum(-1)  # [N, groups]
        groups = group_score.topk(moe.topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, groups, True)
        choice = choice.masked_fill(~allowed.repeat_interleave(E // moe.n_group, dim=1), float("-inf"))
        idx = choice.topk(moe.n_experts_per_token, dim=-1).indices
        weights = scores.gather(1, idx)
        if moe.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * moe.routed_scaling_factor, idx
    if cfg.moe.router == "mixtral":
        top, idx = torch.topk(logits, cfg.moe.n_experts_per_token, dim=-1)
        return torch.softmax(top, dim=-1), idx
    if cfg.moe.router == "llama4":  # sigmoids of the chosen logits, applied to the experts' inputs (MoE.forward)
        top, idx = torch.topk(logits, cfg.moe.n_experts_per_token, dim=-1)
        return torch.sigmoid(top), idx
    weights, idx = torch.topk(torch.softmax(logits, dim=-1), cfg.moe.n_experts_per_token, dim=-1)
    if cfg.moe.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    if expert_scale is not None:
        weights = weights * expert_scale.float()[idx]
    return weights, idx


class Experts(nn.Module):
    """Stacked SwiGLU experts: gate_proj, up_proj [E, F, D], down_proj [E, D, F] (torch's [out, in] per expert)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, F = cfg.moe.n_experts, cfg.d_model, cfg.expert_d_ff
        self.gate_proj = nn.Parameter(torch.randn(E, F, D) * cfg.init_std)
        self.up_proj = nn.Parameter(torch.randn(E, F, D) * cfg.init_std)
        self.down_proj = nn.Parameter(torch.randn(E, D, F) * cfg.init_std)
        if cfg.use_bias:  # gpt-oss
            self.gate_bias, self.up_bias = nn.Parameter(torch.zeros(E, F)), nn.Parameter(torch.zeros(E, F))
            self.down_bias = nn.Parameter(torch.zeros(E, D))
        self.biased = cfg.use_bias
        self.act = ACTIVATIONS[cfg.activation]
        self.limit, self.alpha = cfg.moe.swiglu_limit, cfg.moe.swiglu_alpha

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:  # expert e on rows [M, D] -> [M, D]
        gate, up = x @ self.gate_proj[e].T, x @ self.up_proj[e].T
        if self.biased:
            gate, up = gate + self.gate_bias[e], up + self.up_bias[e]
        if self.limit is None:
            h = self.act(gate) * up
        else:  # gpt-oss's clamped GLU
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            h = (up + 1) * gate * torch.sigmoid(self.alpha * gate)
        out = h @ self.down_proj[e].T
        return out + self.down_bias[e] if self.biased else out


class Router(nn.Module):
    """deepseek router: float32 logits x @ weight^T and the choice-only e_score_correction_bias [E]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cfg.moe.n_experts, cfg.d_model) * cfg.init_std)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.moe.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight.float().T


class MoE(nn.Module):
    """x [B, T, D] -> [B, T, D]: routed experts (+ the optionally gated shared expert)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.gate = Router(cfg) if cfg.moe.router == "deepseek" else Linear(cfg.d_model, cfg.moe.n_experts,
                                                                            bias=cfg.use_bias)
        self.experts = Experts(cfg)
        self.shared_expert = MLP(cfg.replace(d_ff=cfg.moe.shared_d_ff)) if cfg.moe.shared_d_ff else None
        self.shared_expert_gate = Linear(cfg.d_model, 1, bias=False) if cfg.moe.shared_gate else None

    def forward(self, x: torch.Tensor, stats: list | None = None) -> torch.Tensor:
        cfg = self.config
        B, T, D = x.shape
        xf = x.reshape(B * T, D)
        N, k = xf.shape[0], cfg.moe.n_experts_per_token
        logits = self.gate(xf)  # [N, E]
        correction = self.gate.e_score_correction_bias if isinstance(self.gate, Router) else None
        weights, idx = route(logits, cfg, correction)  # [N, k]
        keep = torch.ones(N, k, dtype=torch.bool)
        if cfg.moe.capacity_factor is not None:  # per expert: top-1 choices first, then top-2..., earlier tokens first
            cap = max(1, math.ceil(cfg.moe.capacity_factor * N * k / cfg.moe.n_experts))
            for e in range(cfg.moe.n_experts):
                slot, token = torch.where((idx == e).T)  # slot-major order
                keep[token[cap:], slot[cap:]] = False
        y = torch.zeros_like(xf)
        for e in range(cfg.moe.n_experts):
            token, slot = torch.where((idx == e) & keep)
            if not len(token):
                continue
            w = weights[token, slot, None].to(xf.dtype)
            if cfg.moe.router == "llama4":  # Llama 4 weighs the expert's input, not its output
                y.index_add_(0, token, self.experts(xf[token] * w, e))
            else:
                y.index_add_(0, token, self.experts(xf[token], e) * w)
        if self.shared_expert is not None:
            s = self.shared_expert(xf)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(xf)) * s
            y = y + s
        if stats is not None:
            load = torch.bincount(idx.reshape(-1), minlength=cfg.moe.n_experts).float()
            stats.append({"router_logits": logits.float(), "load": load, "dropped": 1.0 - keep.float().mean()})
        return y.reshape(B, T, D)
