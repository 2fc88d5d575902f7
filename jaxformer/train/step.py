"""Pure train and eval step functions; the caller jits them.

`make_train_step` is the one optimizer step every task uses: gradients of a task's loss, accumulated
over micro-batches, divided once by the token count, then AdamW. A task's loss is

    loss_fn(params, batch, extra, micro) -> (objective_sum, (reported_sum, n_tokens))

where `extra` is what the step passes through untouched (fine-tuning's frozen states, seq2seq's dropout
key) and `micro` the micro-batch index (None without accumulation). Sums, not means: k micro-batches
of b/k rows then give exactly the update of one batch of b rows. A loss may report a third element, a
dict of extra metrics (Mixture-of-Experts aux losses, per-expert load), averaged over micro-batches.

Spike skipping (train.spike_threshold): called with `limits` (float32 [2]: the largest loss and
gradient norm to accept, traced, so new limits never recompile), the step returns params and
optimizer state unchanged, bitwise, when its loss or gradient norm is over its limit or not finite,
and reports metrics["skipped"] = 1.0. Called without (None), it is the plain update, compiled as if
the option did not exist.

`lm_loss` is the language-model loss (pretraining, fine-tuning). `params` are what the optimizer
updates; fine-tuning passes the rest of the model (a frozen base, LoRA dropout keys) as `frozen`, a
tuple of nnx States merged with params for the forward pass: no gradient, optimizer state or
donation ever touches them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxformer.models.ring_attention import to_context_layout
from jaxformer.sharding import constrain, sequence_is_split
from jaxformer.train.chunked_ce import chunked_cross_entropy_sums
from jaxformer.train.losses import cross_entropy_sums, load_balancing_loss, router_z_loss
from jaxformer.train.optim import path_names

Batch = dict[str, jax.Array]  # inputs, targets, positions, segment_ids [B, T] int32; loss_mask [B, T] f32
LossFn = Callable[[Any, Batch, Any, Any], tuple[jax.Array, tuple[jax.Array, jax.Array]]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    after_update: Callable | None = None) -> Callable:
    """step(params, opt_state, batch, extra=(), limits=None) -> (params, opt_state, metrics), one optimizer update
    per call (skipped when `limits` are given and the step is over them: see the module doc).

    The batch [B, ...] is split into grad_accum micro-batches [B/A, ...] scanned in sequence; their
    summed gradients are divided once by the total token count, so k x (b/k) equals b. `after_update(params,
    metrics) -> (params, metrics)` changes the updated parameters outside the gradient (the deepseek router's
    bias balancing: balance_router_biases).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)  # gradients for params only, never for `extra`

    def step(params, opt_state, batch: Batch, extra: Any = (), limits: jax.Array | None = None):
        if grad_accum == 1:
            (_, aux), grads = grad_fn(params, batch, extra, None)
            reported, n, more = aux if len(aux) == 3 else (*aux, {})
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def body(carry, xs):
                g_acc, r_acc, n_acc = carry
                i, mb = xs
                mb = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)
                (_, aux), g = grad_fn(params, mb, extra, i)
                r, n, m = aux if len(aux) == 3 else (*aux, {})
                return (jax.tree.map(jnp.add, g_acc, g), r_acc + r, n_acc + n), m

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, reported, n), more = jax.lax.scan(body, (zeros, jnp.zeros(()), jnp.zeros(())),
                                                      (jnp.arange(grad_accum), micro))
            more = jax.tree.map(lambda v: v.mean(0), more)
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)  # bf16 params keep bf16 moments
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = {"loss": reported / denom, "grad_norm": optax.global_norm(grads), "tokens": n, **more}
        if after_update is not None:
            new_params, metrics = after_update(new_params, metrics)
        if limits is None:
            return new_params, new_opt_state, metrics
        return skip_if_over(limits, (params, opt_state), (new_params, new_opt_state), metrics)

    return step


def skip_if_over(limits: jax.Array, old: Any, new: Any, metrics: dict) -> tuple:
    """(*old, metrics + skipped=1.0) when the loss or gradient norm is non-finite or over limits [max loss, max grad
    norm], else (*new, metrics + skipped=0.0); selected elementwise, so the kept arrays are bitwise the old ones."""
    loss, norm = metrics["loss"], metrics["grad_norm"]
    ok = jnp.isfinite(loss) & jnp.isfinite(norm) & (loss <= limits[0]) & (norm <= limits[1])
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    return *kept, {**metrics, "skipped": 1.0 - ok.astype(jnp.float32)}


def make_eval_step(loss_fn: LossFn) -> Callable:
    """eval_step(params, batch, extra=()) -> (reported sum, number of tokens), e.g. summed token CE."""

    def eval_step(params, batch: Batch, extra: Any = ()):
        _, aux = loss_fn(params, batch, extra, None)
        return aux[0], aux[1]

    return eval_step


def lm_loss(graphdef: nnx.GraphDef, *, packed: bool, z_loss: float = 0.0, loss_chunk: int = 0) -> LossFn:
    """Next-token cross-entropy (+ PaLM's z-loss) of a DecoderLM; `extra` is the frozen states tuple.

    `loss_chunk` > 0 computes it from the final hidden states about that many tokens at a time
    (train/chunked_ce.py: the [B, T, V] logits never exist); 0 takes the model's whole logits. Where the mesh
    splits the sequence (context parallelism) the chunks would cut across its shards: the whole logits are taken.

    A Mixture-of-Experts model adds router_aux_loss_coef * load-balancing loss + router_z_loss_coef *
    router z-loss (per token, over the loss mask's tokens) and reports them, the fraction of routed
    assignments per expert (`moe_load` [E], pooled over sparse layers) and the dropped fraction.
    """

    def loss_fn(params, batch: Batch, frozen: tuple, micro):
        model = nnx.merge(graphdef, params, *frozen)
        batch = to_context_layout(batch)  # context parallelism: ring order for every [B, T] entry (no-op without)
        stats: list = []  # each sparse block's router statistics (none for a dense model)
        kw = dict(moe_stats=stats) if model.config.moe.n_experts else {}
        segments = batch["segment_ids"] if packed else None
        if loss_chunk and not sequence_is_split():
            h = model.hidden(batch["inputs"], batch["positions"], segments, **kw)  # [B, T, D]
            objective, ce, n = chunked_cross_entropy_sums(h, model.output_head(), batch["targets"],
                                                          batch["loss_mask"], z_loss, loss_chunk)
        else:
            logits = model(batch["inputs"], batch["positions"], segments, **kw)  # [B, T, V]
            ce, z, n = cross_entropy_sums(logits, batch["targets"], batch["loss_mask"], z_loss)
            objective = ce + z
        if not stats:
            return objective, (ce, n)
        return moe_objective(model.config, stats, objective, ce, n, batch["loss_mask"])

    return loss_fn


def moe_objective(cfg, stats: list[dict], objective, ce, n, mask):
    """(objective + n * (aux and z terms), (ce, n, MoE metrics)) from a model's `moe_stats` list."""
    router = jnp.stack([s["router_logits"] for s in stats])  # [L, N, E]
    aux = load_balancing_loss(router, cfg.moe.n_experts_per_token, mask)
    rz = router_z_loss(router, mask)
    objective = objective + n * (cfg.moe.aux_loss_coef * aux + cfg.moe.z_loss_coef * rz)
    load = sum(s["load"] for s in stats)  # [E] assignments per expert over all sparse layers
    metrics = {"moe_aux_loss": aux, "moe_z_loss": rz, "moe_load": load / jnp.maximum(load.sum(), 1.0),
               "moe_dropped": jnp.mean(jnp.stack([s["dropped"] for s in stats]))}
    if cfg.moe.bias_update_rate:  # per sparse layer, for balance_router_biases (taken out of the metrics there)
        metrics[LAYER_LOAD] = jnp.stack([s["load"] for s in stats])  # [sparse layers, E]
    return objective, (ce, n, metrics)


LAYER_LOAD = "router_layer_load"


def balance_router_biases(cfg) -> Callable:
    """DeepSeek-V3's auxiliary-loss-free balancing (section 2.1.2) as make_train_step's after_update: each sparse
    layer's e_score_correction_bias moves by moe.bias_update_rate, up for experts that took fewer than the mean
    number of this step's assignments, down for those that took more. Gradients never reach the bias (it only
    picks experts); this rule is what moves it."""
    sparse = {i: j for j, i in enumerate(i for i in range(cfg.n_layers) if cfg.is_moe_layer(i))}
    rate = cfg.moe.bias_update_rate

    def after_update(params, metrics):
        metrics = dict(metrics)
        loads = metrics.pop(LAYER_LOAD)  # [sparse layers, E]
        step = rate * jnp.sign(loads.mean(-1, keepdims=True) - loads)  # [sparse layers, E]

        def move(path, leaf):
            names = path_names(path)
            if names[-1] != "e_score_correction_bias":
                return leaf
            return leaf + step[sparse[int(names[names.index("layers") + 1])]].astype(leaf.dtype)

        return jax.tree_util.tree_map_with_path(move, params), metrics

    return after_update
