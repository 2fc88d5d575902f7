"""Grouped SwiGLU: rows sorted by group, each row through its group's expert (MegaBlocks, Gale et al. 2022).

`glu(gate, up)` combines the two projections (act(gate) * up for SwiGLU; gpt-oss clamps first: moe.py: glu);
`biases` (gate [G, F], up [G, F]), when given, are added to the projections of each row's group.

GPU and TPU lower `jax.lax.ragged_dot` to a native grouped matmul. XLA:CPU has none: jax expands the
rows to a dense [G, M, D] masked copy, G times the work (8 experts: 8x). On CPU the rows are instead
laid out in tiles of m rows, each group's rows padded to whole tiles (at most G * (m - 1) padding rows
in all, a static bound), and each tile runs one batched matmul with its group's weights: the routed
FLOPs plus the padding. `jax.lax.platform_dependent` picks the path when the computation is lowered.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# ragged_dot of x [M, D] with w [G, O, D] (torch layout): contract D with w's last dim, groups on w's first
_RAGGED = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                            lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def tile_rows(m_rows: int, groups: int) -> int:
    """Rows per tile: a power of two near M / (2 G), within [8, 256] (padding <= G * (m - 1) rows).

    XLA:CPU's batched matmul gains from taller tiles (fwd+bwd of 4096 rows, D 256, F 512: 1.76x a dense
    matmul's time at m=128, 1.24-1.39x at 256, 1.16-1.3x at 512) while the padding grows with m."""
    target = max(1, m_rows // (2 * groups))
    return min(256, max(8, 1 << (target - 1).bit_length()))


def _ragged(xs, group_sizes, wg, wu, wd, glu, biases):
    def dot(x, w):
        return jax.lax.ragged_dot_general(x, w, group_sizes, _RAGGED)

    g, u = dot(xs, wg), dot(xs, wu)  # [M, F]
    if biases is not None:
        G = wg.shape[0]
        row_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(xs.shape[0]), side="right"), G - 1)
        g, u = g + biases[0][row_group], u + biases[1][row_group]
    return dot(glu(g, u), wd)  # [M, D]


def _tiled(xs, group_sizes, wg, wu, wd, glu, biases):
    M, D = xs.shape
    G = wg.shape[0]
    m = tile_rows(M, G)
    n_tiles = -(-(M + G * (m - 1)) // m)  # static: every group padded to whole tiles
    ends = jnp.cumsum(group_sizes)
    padded = (group_sizes + m - 1) // m * m  # [G] rows of each group, padded
    pends = jnp.cumsum(padded)
    row = jnp.arange(M)
    group = jnp.searchsorted(ends, row, side="right")  # [M] group of each row (G: past every group)
    dest = jnp.where(group < G, (pends - padded)[jnp.minimum(group, G - 1)] + row - (ends - group_sizes)[
        jnp.minimum(group, G - 1)], n_tiles * m)  # [M] row in the tiled layout; n_tiles * m: none
    xt = jnp.zeros((n_tiles * m, D), xs.dtype).at[dest].set(xs, mode="drop").reshape(n_tiles, m, D)
    tile_group = jnp.minimum(jnp.searchsorted(pends, jnp.arange(n_tiles) * m, side="right"), G - 1)  # [n_tiles]
    tile_biases = None if biases is None else (biases[0][tile_group], biases[1][tile_group])
    y = batched_swiglu(xt, wg[tile_group], wu[tile_group], wd[tile_group], glu, tile_biases).reshape(n_tiles * m, D)
    return y.at[dest].get(mode="fill", fill_value=0)  # [M, D]; rows past every group: 0


def batched_swiglu(xb: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, glu: Callable,
                   biases: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Buffers xb [G, C, D], gate/up [G, F, D], down [G, D, F] (gate/up biases [G, F]) -> [G, C, D]: buffer g
    through expert g."""
    g, u = jnp.einsum("gcd,gfd->gcf", xb, wg), jnp.einsum("gcd,gfd->gcf", xb, wu)  # [G, C, F]
    if biases is not None:
        g, u = g + biases[0][:, None], u + biases[1][:, None]
    return jnp.einsum("gcf,gdf->gcd", glu(g, u), wd)


def sort_by_expert(idx: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k choices idx [N, k] -> (order, sorted_expert, counts) of the k*N assignments.

    Assignments are slot-major (a = slot * N + token: all top-1 choices, then all top-2...); `order` [k*N] sorts
    them stably by expert (row a' of the sorted rows is token order[a'] % N), sorted_expert [k*N] is each
    sorted row's expert and counts [E] the assignments per expert."""
    expert = idx.T.reshape(-1)  # [k*N]
    order = jnp.argsort(expert, stable=True)
    return order, expert[order], jnp.bincount(expert, length=n_experts).astype(jnp.int32)


def capacity_slots(sorted_expert: jax.Array, counts: jax.Array, C: int) -> tuple[jax.Array, jax.Array]:
    """Expert-sorted assignments -> (keep [A], slot [A]): the first C of each expert's rows keep their row
    expert * C + rank of an [E * C] buffer; the rest are dropped (slot E * C, out of bounds)."""
    E = counts.shape[0]
    rank = jnp.arange(sorted_expert.shape[0]) - (jnp.cumsum(counts) - counts)[sorted_expert]  # within its expert
    keep = rank < C
    return keep, jnp.where(keep, sorted_expert * C + rank, E * C)


def weigh_rows(xs: jax.Array, order: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Llama 4's routing: rows sorted by expert [k*N, D] times their router weight (weights [N, k], assignments
    slot-major as sort_by_expert orders them); the weights combine then takes are ones."""
    return xs * weights.T.reshape(-1)[order][:, None].astype(xs.dtype), jnp.ones_like(weights)


def combine(ys: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """Expert outputs ys [k*N, D] in sorted order, router weights [N, k] -> [N, D]: each token's weighted sum."""
    N, k = weights.shape
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(k, N, ys.shape[-1])  # back to (slot, token) order
    return jnp.einsum("knd,nk->nd", y, weights.astype(y.dtype))


def grouped_swiglu(xs: jax.Array, group_sizes: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                   glu: Callable, biases: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Rows xs [M, D] sorted by group, group_sizes [G] (sum <= M), gate/up [G, F, D], down [G, D, F] -> [M, D].

    Row r of group g: wd[g] @ glu(wg[g] @ x_r + bg[g], wu[g] @ x_r + bu[g]); rows past sum(group_sizes) are
    unspecified.
    """
    return jax.lax.platform_dependent(xs, group_sizes, wg, wu, wd, cpu=lambda *a: _tiled(*a, glu, biases),
                                      default=lambda *a: _ragged(*a, glu, biases))
