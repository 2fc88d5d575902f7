"""Expert parallelism: the MoE block's experts split over the "expert" mesh axis, tokens sent to them by all-to-all.

Inside one `jax.shard_map` over every mesh axis (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021):
each device routes its own tokens (the batch is split over ("data", "fsdp", "expert"), the sequence over
"context"), sends each (token, expert) assignment to the device that holds its expert (`all_to_all` over
"expert"), runs its E/ep local experts, sends the rows back and combines them with the router weights.

The other axes are handled explicitly rather than left to GSPMD: the local experts' "embed" dim is
all-gathered over "fsdp" (only E/ep experts' shards: never the full [E, F, D] stack), their "mlp" dim stays
split over "tensor" (gate/up column-parallel, down row-parallel, one psum of the [n, D] output), and weight
gradients come back reduce-scattered by the all-gather's transpose. A fully manual body keeps the
ragged matmul and the all-to-all out of the partitioner, whose handling of ragged_dot is not specified.

Buffers are static. Dropless: each device sends every destination a block of n * min(k, E/ep) rows, the
most that n tokens with k distinct experts can put on one device's E/ep experts, so nothing is dropped
whatever the routing (the price: ep * min(k, E/ep) / k times the k * n rows actually routed). Capacity
factor: each device's tokens are one GShard group; expert e takes at most C = capacity(n) of a device's n
tokens' assignments (top-1 choices first, earlier tokens first), so a block is exactly one device running
moe.py's capacity path on its own tokens. With drops this differs from one device over the whole batch,
whose capacity is pooled over all N tokens; without drops both equal the dropless result.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxformer.config import ModelConfig
from jaxformer.models.grouped import (batched_swiglu, capacity_slots, combine, expert_rows, grouped_swiglu,
                                     sort_by_expert, weigh_rows)
from jaxformer.sharding import fitted_spec, logical_to_spec, mesh_axis_size


def expert_parallel_size() -> int:
    """Size of the "expert" axis of the mesh in context (jax.set_mesh); 1 without a mesh."""
    return mesh_axis_size("expert")


def _axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _dropless(xs, sorted_expert, counts, ws, glu, biases, ep: int, k: int):
    """Sorted rows [A, D] (A = k*n, by global expert) -> their expert outputs [A, D], exchanged over "expert"."""
    A, D = xs.shape
    E = counts.shape[0]
    El = E // ep
    C = (A // k) * min(k, El)  # rows per destination block: n tokens, each with at most min(k, El) experts there
    starts = jnp.cumsum(counts) - counts  # [E]
    dest = sorted_expert // El  # [A] destination device
    pos = dest * C + jnp.arange(A) - starts[dest * El]  # [A] row of the send buffer
    # unique rows: without unique_indices, the scatter's JVP holds two u32 [ep*C, D] copies to settle collisions
    send = jnp.zeros((ep * C, D), xs.dtype).at[pos].set(xs, unique_indices=True)  # [ep*C, D], block j for device j
    recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)  # [ep*C, D], block s from device s
    rcounts = jax.lax.all_to_all(counts.reshape(ep, El), "expert", 0, 0, tiled=True)  # [ep, El] per source
    # the local expert of received row o of block s: first group whose cumulative count exceeds o (El: padding)
    offsets = jnp.arange(C)
    local = jax.vmap(lambda c: jnp.searchsorted(c, offsets, side="right"))(jnp.cumsum(rcounts, 1)).reshape(-1)
    rorder = jnp.argsort(local, stable=True)  # [ep*C] rows grouped by local expert, padding last
    out = grouped_swiglu(recv[rorder], rcounts.sum(0).astype(jnp.int32), *ws, glu, biases)  # [ep*C, D]
    back = jnp.zeros_like(out).at[rorder].set(out, unique_indices=True)  # rorder: a permutation
    ret = jax.lax.all_to_all(back, "expert", 0, 0, tiled=True)  # [ep*C, D] in the send buffer's layout
    return ret[pos], jnp.zeros((), jnp.float32)


def _capacity(xs, sorted_expert, counts, ws, glu, biases, ep: int, C: int):
    """Sorted rows [A, D] -> outputs [A, D] (zero where dropped) and the dropped fraction, C rows per expert."""
    D = xs.shape[1]
    E = counts.shape[0]
    El = E // ep
    keep, slot = capacity_slots(sorted_expert, counts, C)  # [A] each
    send = jnp.zeros((E * C, D), xs.dtype).at[slot].set(xs, mode="drop")  # [ep * El * C, D]
    recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)  # [ep(source) * El * C, D]
    xb = recv.reshape(ep, El, C, D).transpose(1, 0, 2, 3).reshape(El, ep * C, D)  # [El, ep*C, D]
    out = batched_swiglu(xb, *ws, glu, biases)
    back = out.reshape(El, ep, C, D).transpose(1, 0, 2, 3).reshape(E * C, D)
    ret = jax.lax.all_to_all(back, "expert", 0, 0, tiled=True)  # [E*C, D] in the send buffer's layout
    ys = jnp.where(keep[:, None], ret.at[slot].get(mode="fill", fill_value=0), 0)
    return ys, 1.0 - keep.mean(dtype=jnp.float32)


def dispatch(experts, x: jax.Array, logits: jax.Array, cfg: ModelConfig, route: Callable, capacity: Callable
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, D], router logits [B*T, E] -> (routed output [B*T, D], dropped fraction, load [E] assignments).

    `experts` is moe.Experts (stacked gate/up [E, F, D], down [E, D, F]); `route(logits, cfg)` and
    `capacity(cfg, n)` are moe.py's router and capacity rule, applied to each device's own tokens.
    Needs a mesh in context whose "expert" axis divides n_experts and splits the batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    shape = dict(mesh.shape)
    ep = shape["expert"]
    B, T, D = x.shape
    E, k = cfg.moe.n_experts, cfg.moe.n_experts_per_token
    if E % ep:
        raise ValueError(f"mesh.expert={ep} does not divide n_experts={E}: expert parallelism gives each device "
                         "n_experts / expert experts; choose an expert size that divides n_experts")
    def spec(axes, dims):  # the rules' layout, minus mesh axes of size 1 (they need no collective)
        entries = (tuple(a for a in _axes(e) if shape[a] > 1) for e in fitted_spec(axes, dims, shape))
        return P(*(e[0] if len(e) == 1 else e or None for e in entries))

    tok = spec(("batch", "seq", None), x.shape)
    if "expert" not in _axes(tok[0]):  # too few rows to split (serving: one prompt, a few decode rows)
        return _token_split(experts, x, logits, cfg, route, capacity, shape)
    c = experts.compute_dtype
    wg, wu, wd = (experts.gate_proj[...].astype(c), experts.up_proj[...].astype(c), experts.down_proj[...].astype(c))
    up_spec = spec(("expert", "mlp", "embed"), wg.shape)  # as jaxformer.sharding lays them out
    down_spec = spec(("expert", "embed", "mlp"), wd.shape)
    token_axes, mlp_axes, embed_axes = _axes(tok[0]) + _axes(tok[1]), _axes(up_spec[1]), _axes(up_spec[2])
    glu = experts.glu()
    biases = experts.biases()  # gpt-oss: gate/up biases [E, F], split as the experts' "mlp" rows
    bias_spec = spec(("expert", "mlp"), biases[0].shape) if biases is not None else None

    def body(x, logits, wg, wu, wd, *local_biases):  # local blocks: x [b, t, D], logits [b, t, E], experts [E/ep, ..]
        if embed_axes:  # FSDP: gather this device's E/ep experts' "embed" shards, never the other experts'
            wg, wu = (jax.lax.all_gather(w, embed_axes, axis=2, tiled=True) for w in (wg, wu))
            wd = jax.lax.all_gather(wd, embed_axes, axis=1, tiled=True)
        n = x.shape[0] * x.shape[1]
        xf = x.reshape(n, D)
        weights, idx = route(logits.reshape(n, E), cfg)  # [n, k] each: this device's own tokens
        order, sorted_expert, counts = sort_by_expert(idx, E)  # as moe.py
        xs = expert_rows(xf, order)  # [k*n, D] rows grouped by expert
        if cfg.moe.router == "llama4":  # the weights act on the experts' inputs
            xs, weights = weigh_rows(xs, order, weights)
        bs = tuple(local_biases) or None
        if cfg.moe.capacity_factor is None:
            ys, dropped = _dropless(xs, sorted_expert, counts, (wg, wu, wd), glu, bs, ep, k)
        else:
            ys, dropped = _capacity(xs, sorted_expert, counts, (wg, wu, wd), glu, bs, ep, capacity(cfg, n))
        y = combine(ys, order, weights)  # [n, D]
        if mlp_axes:  # row-parallel down projection: partial sums over the "mlp" shards
            y = jax.lax.psum(y, mlp_axes)
        return y.reshape(x.shape), jax.lax.pmean(dropped, token_axes), jax.lax.psum(counts, token_axes)

    extra, extra_specs = (biases, (bias_spec, bias_spec)) if biases is not None else ((), ())
    y, dropped, load = jax.shard_map(body, in_specs=(tok, tok, up_spec, up_spec, down_spec, *extra_specs),
                                     out_specs=(tok, P(), P()))(x, logits.reshape(B, T, E), wg, wu, wd, *extra)
    return y.reshape(B * T, D), dropped, load


def _token_split(experts, x, logits, cfg, route, capacity, shape):
    """dispatch over tokens instead of rows: x [B, T, D] as B*T one-token rows, zero-padded to a multiple of the
    batch axes' size (padding last: it never takes a real token's capacity slot), the padding's outputs dropped.
    The dropped fraction and the load then count the padding too (inference reads neither)."""
    B, T, D = x.shape
    rows = int(np.prod([shape[a] for a in _axes(logical_to_spec(("batch",))[0])]))
    n = B * T
    pad = -n % rows
    xt = jnp.pad(x.reshape(n, 1, D), ((0, pad), (0, 0), (0, 0)))
    lt = jnp.pad(logits.reshape(n, -1), ((0, pad), (0, 0)))
    y, dropped, load = dispatch(experts, xt, lt, cfg, route, capacity)
    return y[:n], dropped, load

