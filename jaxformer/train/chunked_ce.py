"""Cross-entropy straight from the final hidden states, a chunk of positions at a time: the [B, T, V] logits are
never whole, forward or backward.

A 128k-entry vocabulary at 8k tokens a row makes 4 GiB of float32 logits per row, and the plain loss keeps them
(and their softmax) alive from the forward into the backward. Here the sequence is cut into chunks of about
`chunk` tokens (all rows together): each chunk's logits [B, c, V] give its loss and, in the same pass, the
gradient of the loss with respect to them (softmax - one-hot, plus the z-loss's and the soft-cap's terms), which
two matmuls turn into the chunk's hidden-state gradient [B, c, D] and its share of the head's weight gradient
[V, D] (summed in float32 over the chunks). The backward then only scales those by the incoming cotangent: the
head's three matmuls are the plain loss's, nothing is recomputed, and the largest temporary is one chunk's logits.
(Liger Kernel's fused linear cross-entropy does the same in Triton; levanter and MaxText tile the vocabulary
loss too.) Without differentiation (evaluation) only the loss is computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformer.models.layers import OutputHead, project, scaled_logits
from jaxformer.sharding import constrain

LOGITS = ("batch", "seq", "act_vocab")  # a chunk's logits, laid out as the model lays out its [B, T, V]


def chunked_cross_entropy_sums(h: jax.Array, head: OutputHead, targets: jax.Array, mask: jax.Array | None = None,
                               z_loss: float = 0.0, chunk: int = 4096) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of CE + z_loss * logsumexp^2 over kept tokens, sum of CE over kept tokens, number kept) from final
    hidden states h [B, T, D], targets [B, T] and mask [B, T]: losses.cross_entropy_sums of head.logits(h) (its
    first two results added), without the [B, T, V] logits.

    Positions go `chunk // B` at a time (at least one), the last chunk padded with masked positions. Gradients
    flow through the first result alone: the second, a metric, is stop_gradient'ed."""
    B, T, D = h.shape
    mask = jnp.ones((B, T), jnp.float32) if mask is None else mask.astype(jnp.float32)
    c = min(T, max(1, chunk // B))  # positions per chunk
    n = -(-T // c)
    pad = n * c - T
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    chunks = lambda a: jnp.moveaxis(a.reshape(B, n, c, *a.shape[2:]), 1, 0)  # noqa: E731 - [n, B, c, ...]
    fused = _fused(head.scale, head.softcap, float(z_loss))
    objective, ce = fused(chunks(h), head.weight, chunks(targets), chunks(mask))
    return objective, jax.lax.stop_gradient(ce), jnp.sum(mask)


def _chunk_logits(hc, w, scale, softcap):
    """One chunk's hidden states [B, c, D] -> logits [B, c, V] float32, as OutputHead.logits computes them."""
    return constrain(scaled_logits(project(hc, w), scale, softcap), LOGITS)


def _chunk_losses(z, tc, mc, z_loss):
    """Logits [B, c, V], targets and mask [B, c] -> (logsumexp [B, c], masked objective sum, masked CE sum)."""
    lse = jax.nn.logsumexp(z, axis=-1)
    ce = lse - jnp.take_along_axis(z, tc[..., None], axis=-1)[..., 0]
    objective = ce + z_loss * jnp.square(lse) if z_loss else ce
    return lse, jnp.sum(objective * mc), jnp.sum(ce * mc)


def _fused(scale: float, softcap: float | None, z_loss: float):
    """The chunk loop over (h [n, B, c, D], w [V, D], targets [n, B, c], mask [n, B, c]) -> (objective, CE sums),
    with its custom VJP (the loss's constants closed over)."""

    def losses(hs, w, ts, ms):
        def step(sums, xs):
            hc, tc, mc = xs
            z = _chunk_logits(hc, w, scale, softcap)
            _, obj, ce = _chunk_losses(z, tc, mc, z_loss)
            return (sums[0] + obj, sums[1] + ce), None

        zero = jnp.zeros((), jnp.float32)
        return jax.lax.scan(step, (zero, zero), (hs, ts, ms))[0]

    def forward(hs, w, ts, ms):
        def step(carry, xs):
            obj_sum, ce_sum, dw = carry
            hc, tc, mc = xs
            z = _chunk_logits(hc, w, scale, softcap)
            lse, obj, ce = _chunk_losses(z, tc, mc, z_loss)
            p = jnp.exp(z - lse[..., None])  # softmax [B, c, V]
            onehot = jnp.arange(z.shape[-1]) == tc[..., None]
            g = p * (1.0 + 2.0 * z_loss * lse)[..., None] - onehot  # d objective / d logits
            g = g * mc[..., None]
            if softcap is not None:
                g = g * (1.0 - jnp.square(z / softcap))  # through z = cap * tanh(raw / cap)
            if scale != 1.0:
                g = g * scale
            g = constrain(g.astype(w.dtype), LOGITS)
            dh = project(g, w.T)  # [B, c, D]
            dw = dw + jnp.einsum("nv,nd->vd", g.reshape(-1, g.shape[-1]), hc.reshape(-1, hc.shape[-1]),
                                 preferred_element_type=jnp.float32)
            return (obj_sum + obj, ce_sum + ce, dw), dh.astype(hc.dtype)

        zero = jnp.zeros((), jnp.float32)
        init = (zero, zero, constrain(jnp.zeros(w.shape, jnp.float32), ("vocab", "embed")))
        (obj, ce, dw), dhs = jax.lax.scan(step, init, (hs, ts, ms))
        return (obj, ce), (dhs, dw.astype(w.dtype))

    def backward(res, cts):
        dhs, dw = res
        ct = cts[0]  # the CE sum is stop_gradient'ed by chunked_cross_entropy_sums: its cotangent is zero
        return (dhs * ct.astype(dhs.dtype), dw * ct.astype(dw.dtype), None, None)

    fn = jax.custom_vjp(losses)
    fn.defvjp(forward, backward)
    return fn
