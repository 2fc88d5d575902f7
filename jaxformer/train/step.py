"""Pure train and eval step functions over (graphdef, params); the caller jits them.

`params` are what the optimizer updates. Fine-tuning passes the rest of the model (a frozen base,
LoRA dropout keys) as `frozen`, a tuple of nnx States merged with params for the forward pass:
no gradient, optimizer state or donation ever touches them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxformer.sharding import constrain
from jaxformer.train.losses import cross_entropy_sums

Batch = dict[str, jax.Array]  # inputs, targets, positions, segment_ids [B, T] int32; loss_mask [B, T] f32


def _forward_sums(graphdef: nnx.GraphDef, params, batch: Batch, packed: bool, z_loss: float, frozen: tuple = ()):
    model = nnx.merge(graphdef, params, *frozen)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"] if packed else None)  # [B, T, V]
    return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"], z_loss)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, packed: bool,
                    grad_accum: int = 1, z_loss: float = 0.0) -> Callable:
    """step(params, opt_state, batch, frozen=()) -> (params, opt_state, metrics), one optimizer update per call.

    The batch [B, T] is split into grad_accum micro-batches [B/A, T] scanned in sequence; their
    summed gradients are divided once by the total kept-token count, so k x (b/k) equals b.
    """

    def loss_fn(params, mb: Batch, frozen: tuple):
        ce, z, n = _forward_sums(graphdef, params, mb, packed, z_loss, frozen)
        return ce + z, (ce, n)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)  # gradients for params only, never for frozen

    def step(params, opt_state, batch: Batch, frozen: tuple = ()):
        if grad_accum == 1:
            (_, (ce, n)), grads = grad_fn(params, batch, frozen)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def body(carry, mb):
                g_acc, ce_acc, n_acc = carry
                mb = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)
                (_, (ce, n)), g = grad_fn(params, mb, frozen)
                return (jax.tree.map(jnp.add, g_acc, g), ce_acc + ce, n_acc + n), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, ce, n), _ = jax.lax.scan(body, (zeros, jnp.zeros(()), jnp.zeros(())), micro)
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": ce / denom, "grad_norm": optax.global_norm(grads), "tokens": n}
        return params, opt_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, *, packed: bool) -> Callable:
    """eval_step(params, batch, frozen=()) -> (sum of token CE, number of tokens)."""

    def eval_step(params, batch: Batch, frozen: tuple = ()):
        ce, _, n = _forward_sums(graphdef, params, batch, packed, 0.0, frozen)
        return ce, n

    return eval_step
