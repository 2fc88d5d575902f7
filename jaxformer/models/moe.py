"""Mixture-of-Experts MLP slot (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral; Qwen2/3-MoE; gpt-oss).

A router picks k of E SwiGLU experts per token; the experts' weights are stacked [E, ...] in torch's
(out, in) layout, like transformers' fused `experts.gate_up_proj` [E, 2F, D] split in two:
`experts.gate_proj` [E, F, D], `experts.up_proj` [E, F, D], `experts.down_proj` [E, D, F]. Their "expert"
logical axis is the expert-parallel axis of jaxformer.sharding.

Dropless (capacity_factor None, the default): the N*k (token, expert) assignments are sorted by expert
and run as one grouped matmul over the E contiguous groups (MegaBlocks, Gale et al. 2022; models/grouped.py:
`jax.lax.ragged_dot` on TPU; on GPU and CPU, where XLA expands ragged_dot densely, a scan over tiles of one
expert's rows). With a capacity factor each expert takes at
most C = ceil(cf * N * k / E) assignments into a static [E, C, D] buffer (GShard, Lepikhin et al. 2020):
top-1 choices first, then top-2..., earlier tokens first within each; the rest are dropped (their expert
output is zero) and the dropped fraction is reported.

gpt-oss: with use_bias the router and the experts have biases (`experts.gate_bias`, `up_bias` [E, F], `down_bias`
[E, D]; the down bias enters after the experts as sum_k w_k down_bias[e_k], which is what each expert adding it
and the router weighting gives), and moe.swiglu_limit turns act(gate) * up into its clamped GLU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.grouped import (batched_swiglu, capacity_slots, combine, expert_rows, grouped_swiglu,
                                     sort_by_expert, weigh_rows)
from jaxformer.models.layers import ACTIVATIONS, MLP, Linear, dtype_of
from jaxformer.models.moe_parallel import dispatch, expert_parallel_size


def route(logits: jax.Array, cfg: ModelConfig, correction: jax.Array | None = None,
          expert_scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] -> (weights [N, k] float32, expert ids [N, k] int32), as transformers' routers.

    mixtral: softmax over the k largest logits (= softmax over all E, top-k, renormalised). qwen: softmax
    over all E in float32, top-k, renormalised when norm_topk_prob. deepseek (DeepSeek-V3 section 2.1.2, GLM-4.5):
    sigmoid scores plus `correction` [E] (e_score_correction_bias) choose the k experts, only within the topk_group
    groups (of n_group) whose two best corrected scores sum highest; the chosen experts' uncorrected scores,
    renormalised when norm_topk_prob, times routed_scaling_factor, weigh them. Ties go to the lower expert id.
    gemma4: qwen's, then each weight times its expert's `expert_scale` [E] (Gemma 4's per_expert_scale). llama4:
    sigmoid of the top-k logits, which MoE applies to the expert's input instead of its output.
    """
    logits = logits.astype(jnp.float32)
    moe = cfg.moe
    if moe.router == "deepseek":
        N, E = logits.shape
        scores = jax.nn.sigmoid(logits)
        choice = scores + correction.astype(jnp.float32)
        best_two = jax.lax.top_k(choice.reshape(N, moe.n_group, E // moe.n_group), 2)[0].sum(-1)  # [N, groups]
        groups = jax.lax.top_k(best_two, moe.topk_group)[1]  # [N, topk_group]
        allowed = jax.nn.one_hot(groups, moe.n_group, dtype=jnp.bool_).any(1)  # [N, groups]
        choice = jnp.where(jnp.repeat(allowed, E // moe.n_group, axis=1), choice, -jnp.inf)
        idx = jax.lax.top_k(choice, moe.n_experts_per_token)[1]  # [N, k]
        weights = jnp.take_along_axis(scores, idx, axis=-1)
        if moe.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        return weights * moe.routed_scaling_factor, idx
    if cfg.moe.router == "mixtral":
        top, idx = jax.lax.top_k(logits, cfg.moe.n_experts_per_token)  # [N, k]
        return jax.nn.softmax(top, axis=-1), idx
    if cfg.moe.router == "llama4":  # the chosen logits' sigmoids, which scale the experts' inputs (MoE.__call__)
        top, idx = jax.lax.top_k(logits, cfg.moe.n_experts_per_token)  # [N, k]
        return jax.nn.sigmoid(top), idx
    weights, idx = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.moe.n_experts_per_token)  # [N, k]
    if cfg.moe.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    if expert_scale is not None:
        weights = weights * expert_scale.astype(jnp.float32)[idx]
    return weights, idx


def glu(gate: jax.Array, up: jax.Array, *, act, limit: float | None, alpha: float) -> jax.Array:
    """act(gate) * up (SwiGLU), or with a limit gpt-oss's clamped GLU: g = min(gate, limit), u = clip(up, +-limit),
    (u + 1) * g * sigmoid(alpha * g) (transformers' GptOssExperts._apply_gate)."""
    if limit is None:
        return act(gate) * up
    g, u = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return (u + 1) * g * jax.nn.sigmoid(alpha * g)


def capacity(cfg: ModelConfig, n_tokens: int) -> int:
    """Assignments each expert takes under capacity_factor: ceil(cf * N * k / E) (at least 1)."""
    return max(1, math.ceil(cfg.moe.capacity_factor * n_tokens * cfg.moe.n_experts_per_token / cfg.moe.n_experts))


class Experts(nnx.Module):
    """E SwiGLU experts with stacked weights; rows sorted by expert go through `ragged` or `batched`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        E, D, F = cfg.moe.n_experts, cfg.d_model, cfg.expert_d_ff
        dt = dtype_of(cfg.param_dtype)
        std_out = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # residual-branch output, as MLP.down_proj
        self.gate_proj = nnx.Param(cfg.init_std * jax.random.normal(rngs.params(), (E, F, D), dt),
                                   logical_axes=("expert", "mlp", "embed"))
        self.up_proj = nnx.Param(cfg.init_std * jax.random.normal(rngs.params(), (E, F, D), dt),
                                 logical_axes=("expert", "mlp", "embed"))
        self.down_proj = nnx.Param(std_out * jax.random.normal(rngs.params(), (E, D, F), dt),
                                   logical_axes=("expert", "embed", "mlp"))
        bias = lambda n, axes: nnx.Param(jnp.zeros((E, n), dt), logical_axes=axes) if cfg.use_bias else None
        self.gate_bias, self.up_bias = bias(F, ("expert", "mlp")), bias(F, ("expert", "mlp"))  # gpt-oss
        self.down_bias = bias(D, ("expert", "embed"))
        self.act = ACTIVATIONS[cfg.activation]
        self.swiglu_limit, self.swiglu_alpha = cfg.moe.swiglu_limit, cfg.moe.swiglu_alpha
        self.compute_dtype = dtype_of(cfg.compute_dtype)

    def glu(self):
        """The (gate, up) -> hidden combination of these experts (a function of arrays only, for shard_map)."""
        return functools.partial(glu, act=self.act, limit=self.swiglu_limit, alpha=self.swiglu_alpha)

    def biases(self) -> tuple[jax.Array, jax.Array] | None:
        """(gate, up) biases [E, F] in the compute dtype, or None."""
        c = self.compute_dtype
        return None if self.gate_bias is None else (self.gate_bias[...].astype(c), self.up_bias[...].astype(c))

    def _weights(self):
        c = self.compute_dtype
        return self.gate_proj[...].astype(c), self.up_proj[...].astype(c), self.down_proj[...].astype(c)

    def ragged(self, xs: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """Rows [M, D] in expert order, group_sizes [E] summing to M -> [M, D] (dropless; models/grouped.py)."""
        return grouped_swiglu(xs, group_sizes, *self._weights(), self.glu(), self.biases())

    def batched(self, xb: jax.Array) -> jax.Array:
        """A capacity buffer [E, C, D] -> [E, C, D] (each expert on its own C rows)."""
        return batched_swiglu(xb, *self._weights(), self.glu(), self.biases())


class Router(nnx.Module):
    """The deepseek router: logits = x @ weight^T in float32, and e_score_correction_bias [E], which shifts the
    choice of experts but not their weights (DeepSeek-V3's auxiliary-loss-free balancing moves it)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        E, D = cfg.moe.n_experts, cfg.d_model
        self.weight = nnx.Param(cfg.init_std * jax.random.normal(rngs.params(), (E, D), jnp.float32),
                                logical_axes=(None, "embed"))
        self.e_score_correction_bias = nnx.Param(jnp.zeros((E,), jnp.float32), logical_axes=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:  # [N, D] -> [N, E] float32
        return x.astype(jnp.float32) @ self.weight[...].T


def run_experts(experts: Experts, x: jax.Array, logits: jax.Array, cfg: ModelConfig, router
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, D] through the experts its router logits [B*T, E] choose -> (routed output [B*T, D], dropped fraction,
    load [E] assignments): over the mesh's "expert" axis by all-to-all (moe_parallel.py), else locally, dropless or
    with capacity. `router(logits, cfg)` -> (weights, ids), route() with the block's own extras bound."""
    B, T, D = x.shape
    if expert_parallel_size() > 1:
        return dispatch(experts, x, logits, cfg, router, capacity)
    E, N = cfg.moe.n_experts, B * T
    weights, idx = router(logits, cfg)  # [N, k] each
    order, sorted_expert, group_sizes = sort_by_expert(idx, E)  # [k*N], [k*N], [E]
    xs = expert_rows(x.reshape(N, D), order)  # [k*N, D] rows grouped by expert
    if cfg.moe.router == "llama4":  # Llama 4: each row scaled by its weight before its expert, summed plainly after
        xs, weights = weigh_rows(xs, order, weights)
    if cfg.moe.capacity_factor is None:
        ys = experts.ragged(xs, group_sizes)  # [k*N, D]
        dropped = jnp.zeros((), jnp.float32)
    else:
        C = capacity(cfg, N)
        keep, slot = capacity_slots(sorted_expert, group_sizes, C)  # [k*N] each
        buf = jnp.zeros((E * C, D), xs.dtype).at[slot].set(xs, mode="drop")
        out = experts.batched(buf.reshape(E, C, D)).reshape(E * C, D)
        ys = jnp.where(keep[:, None], out.at[slot].get(mode="fill", fill_value=0), 0)  # [k*N, D]
        dropped = 1.0 - keep.mean(dtype=jnp.float32)
    return combine(ys, order, weights), dropped, group_sizes  # [N, D]


class MoE(nnx.Module):
    """x [B, T, D] -> [B, T, D]: sum over the token's k experts of weight * expert(x), plus the shared expert
    (times sigmoid(shared_expert_gate(x)) when gated). Names follow transformers: `gate` is the router."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        kw = dict(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs)
        self.gate = Router(cfg, rngs=rngs) if cfg.moe.router == "deepseek" else Linear(
            cfg.d_model, cfg.moe.n_experts, bias=cfg.use_bias, axes=(None, "embed"), std=cfg.init_std, **kw)
        self.experts = Experts(cfg, rngs=rngs)
        self.shared_expert = MLP(cfg.replace(d_ff=cfg.moe.shared_d_ff), rngs=rngs) if cfg.moe.shared_d_ff \
            else None
        self.shared_expert_gate = (Linear(cfg.d_model, 1, bias=False, axes=(None, "embed"), std=cfg.init_std, **kw)
                                   if cfg.moe.shared_gate else None)

    def __call__(self, x: jax.Array, stats: list | None = None) -> jax.Array:  # [B, T, D] -> [B, T, D]
        """With `stats` (a list), appends {"router_logits" [N, E] f32, "load" [E] assignments per expert,
        "dropped" fraction of assignments dropped}: what the training losses and metrics read."""
        B, T, D = x.shape
        xf = x.reshape(B * T, D)  # [N, D]
        logits = self.gate(xf)  # [N, E]
        return self._finish(xf, *run_experts(self.experts, x, logits, self.config, self.router()), logits, x, stats)

    def router(self):
        """route() with this block's correction bias bound (deepseek), for the local and expert-parallel paths."""
        if isinstance(self.gate, Router):
            return functools.partial(route, correction=self.gate.e_score_correction_bias[...])
        return route

    def _finish(self, xf, y, dropped, load, logits, x, stats):
        """Routed output y [N, D] + the experts' down biases + the shared expert; router logits, load [E] and
        dropped fraction to `stats`."""
        B, T, D = x.shape
        if self.experts.down_bias is not None:  # sum_k w_k b[e_k]: each chosen expert's bias, router-weighted
            weights, idx = self.router()(logits, self.config)  # [N, k]
            bias = self.experts.down_bias[...].astype(y.dtype)[idx]  # [N, k, D]
            y = y + jnp.einsum("nk,nkd->nd", weights.astype(y.dtype), bias)
        if self.shared_expert is not None:
            s = self.shared_expert(xf)  # [N, D]
            if self.shared_expert_gate is not None:
                s = jax.nn.sigmoid(self.shared_expert_gate(xf)) * s
            y = y + s
        if stats is not None:
            stats.append({"router_logits": logits.astype(jnp.float32), "load": load.astype(jnp.float32),
                          "dropped": dropped})
        return y.reshape(B, T, D).astype(x.dtype)


def active_params(cfg: ModelConfig, total: int) -> int:
    """Parameters a token runs through: `total` less the n_experts - k unchosen experts of every sparse layer."""
    per_expert = 3 * cfg.d_model * cfg.expert_d_ff + (2 * cfg.expert_d_ff + cfg.d_model if cfg.use_bias else 0)
    idle = (cfg.moe.n_experts - cfg.moe.n_experts_per_token) * per_expert
    return total - idle * sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
