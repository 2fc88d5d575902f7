"""Grouped SwiGLU: rows sorted by group, each row through its group's expert (MegaBlocks, Gale et al. 2022).

`glu(gate, up)` combines the two projections (act(gate) * up for SwiGLU; gpt-oss clamps first: moe.py: glu);
`biases` (gate [G, F], up [G, F]), when given, are added to the projections of each row's group.

TPUs lower `jax.lax.ragged_dot` to a native grouped matmul. XLA:CPU has none, and neither has XLA:GPU
in jax 0.10.2: both expand the rows to a dense [G, M, D] masked copy, G times the work (8 experts: 8x;
docs/gpu.md has the measured bytes and FLOPs). Both therefore cut each group's rows into tiles of m rows and run
each tile through its own group's weights: the routed FLOPs plus each group's last partial tile.

GPUs (`looped_swiglu`): one `jax.lax.scan` over a static count of tiles (tall ones, loop_tile_rows), weights
sliced one tile at a time, so nothing of size n_tiles x F x D exists, forward or backward, and XLA's cost
analysis sees every tile; its custom VJP writes each group's weight gradient once per tile into [G, F, D],
summed in float32 over the group's run of tiles.
CPUs (`expert_loop_swiglu`): a loop over the groups around loops over each group's own tiles, of the data's
length: tall tiles (tallest_tile: a group's even share of the rows, rounded up to a power of two, at most
CPU_TILE_ROWS) while the rows fill them, then shorter ones, so the padding stays under the shortest height
(shortest_tile: 16 to 64 rows) a group; weights sliced and weight-gradient sums written once per group, not once
per tile, which on XLA:CPU cost as much as the tile matmuls themselves; the backward writes dx over dy in place.
`jax.lax.platform_dependent` picks the path when the computation is lowered; TPUs keep `ragged_dot` (`_ragged`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

CPU_TILE_ROWS = 1024  # the CPU path's tallest tile at most: XLA:CPU's [m, D] x [D, F] runs faster the taller m is
CPU_SHORTEST_TILES = (64, 32, 16)  # its shortest, the first whose padding bound holds (shortest_tile)
# ragged_dot of x [M, D] with w [G, O, D] (torch layout): contract D with w's last dim, groups on w's first
_RAGGED = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                            lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def _ragged(xs, group_sizes, wg, wu, wd, glu, biases):
    def dot(x, w):
        return jax.lax.ragged_dot_general(x, w, group_sizes, _RAGGED)

    g, u = dot(xs, wg), dot(xs, wu)  # [M, F]
    if biases is not None:
        G = wg.shape[0]
        row_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(xs.shape[0]), side="right"), G - 1)
        g, u = g + biases[0][row_group], u + biases[1][row_group]
    return dot(glu(g, u), wd)  # [M, D]


def loop_tile_rows(m_rows: int, groups: int) -> int:
    """GPU rows per tile: the power of two at or below M / (4 G), within [16, 1024].

    The static padding, at most min(G, M) * (m - 1) rows, is then at most a quarter of M (1.25x the routed
    FLOPs) wherever the bounds do not bind; taller tiles read each weight slice for more rows (a [m, D] x
    [D, F] bf16 tile matmul does m FLOPs per weight byte: an H100 needs about 300 to be compute-bound)."""
    target = max(1, m_rows // (4 * groups))
    return min(1024, max(16, 1 << (target.bit_length() - 1)))


def tallest_tile(M: int, groups: int, shortest: int) -> int:
    """The CPU path's tallest tile height: the power of two at or above a group's even share of the rows (M /
    groups), within [shortest, CPU_TILE_ROWS]. Taller tiles would run only for groups over twice their share, yet
    the tile temporaries ([m, F] projections and their gradients) are sized by the tallest height and each height
    is one more loop body to compile (bench/moe_throughput.py's mixtral block, fwd + bwd, 4,096 rows over 8
    experts: 512-row tiles, XLA's temporaries 33.7 -> 32.2 MiB)."""
    share = -(-M // groups)
    return min(CPU_TILE_ROWS, max(shortest, 1 << (share - 1).bit_length()))


def shortest_tile(M: int, groups: int) -> int:
    """The CPU path's shortest tile height: the tallest of CPU_SHORTEST_TILES whose padding, at most
    groups x (height - 1) rows, stays within M / 16 (else the last). Each tile costs XLA:CPU a loop trip of some
    30 ops besides its matmuls, so fewer, taller tiles win until the padded rows cost more (bench/moe_tiles.py:
    8 experts over 4,096 rows 57 -> 54 ms at 32, over 8,192 rows 24 -> 22 ms at 64; 128 experts over 8,192 rows
    97 ms at 16, 105 at 64)."""
    return next((h for h in CPU_SHORTEST_TILES if groups * (h - 1) <= M / 16), CPU_SHORTEST_TILES[-1])


def tile_heights(M: int, tallest: int, shortest: int) -> list[int]:
    """The CPU path's tile heights, tallest first: min(tallest, M), then halves while they stay >= shortest (a
    group's rows, less the tallest tiles they fill, take at most one tile of each shorter height)."""
    heights = [min(tallest, M)]
    while heights[-1] % 2 == 0 and heights[-1] // 2 >= shortest:
        heights.append(heights[-1] // 2)
    return heights


def _tiles(group_sizes, M: int, m: int, n_tiles: int):
    """Each tile's (group, window, first, end) [n_tiles]: tile j of group g holds the group's rows [first, end)
    (at most m, from its start + j * m), read through the m-row window [window, window + m) of the rows (the
    window moved back from `first` where it would pass row M). The unused tiles at the end hold no rows."""
    G = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    padded = (group_sizes + m - 1) // m * m  # [G] each group's rows padded to whole tiles
    pends = jnp.cumsum(padded)
    tile_start = jnp.arange(n_tiles) * m  # in the padded layout
    group = jnp.minimum(jnp.searchsorted(pends, tile_start, side="right"), G - 1)  # the unused tiles: G - 1
    first = (ends - group_sizes)[group] + tile_start - (pends - padded)[group]
    return group, jnp.clip(first, 0, M - m), first, jnp.minimum(first + m, ends[group])


def looped_swiglu(xs: jax.Array, group_sizes: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                  glu: Callable, biases: tuple[jax.Array, jax.Array] | None = None, tile: int | None = None
                  ) -> jax.Array:
    """grouped_swiglu's GPU path (same arguments and result; rows past sum(group_sizes) give 0): a scan over
    tiles of `tile` rows (default loop_tile_rows), each group's rows cut into whole tiles, each tile through its
    own group's weights.

    Work and memory follow the rows: 3 tile matmuls forward and 6 backward per tile, n_tiles <= (M + min(G, M) *
    (m - 1)) / m tiles. A tile reads its rows as an m-row window of xs (rows of other groups masked to zero) and
    writes its outputs back into [M, D] in place; the residuals are the tiles' gate/up projections. The
    backward's weight gradients are summed in float32 over each group's run of consecutive tiles and written into
    [G, F, D] (bias [G, F]) by one dynamic_update_slice per tile."""
    M = xs.shape[0]
    G = wg.shape[0]
    if M == 0:
        return jnp.zeros_like(xs)
    m = min(tile or loop_tile_rows(M, G), M)
    n_tiles = (M + min(G, M) * (m - 1)) // m  # >= sum over groups of ceil(size / m), whatever the sizes
    return _tile_loop(glu, m, xs, _tiles(group_sizes, M, m, n_tiles), (wg, wu, wd), biases)


def _varying(*trees) -> tuple[str, ...]:
    """The mesh axes over which any array of `trees` varies (inside jax.shard_map; none outside)."""
    axes = set()
    for a in jax.tree.leaves(trees):
        t = jax.typeof(a)
        axes |= set(t.mat.varying if hasattr(t, "mat") else getattr(t, "vma", ()))
    return tuple(sorted(axes))


def _vary(tree, axes: tuple[str, ...]):
    """Every array of `tree` made varying over `axes`: a loop carry's type must match what the loop writes into it."""
    return jax.tree.map(lambda a: jax.lax.pcast(a, tuple(x for x in axes if x not in _varying(a)), to="varying"), tree)


def _reduce_like(ct, primal):
    """A cotangent summed over the axes its primal does not vary over (the transpose of the implicit pvary that
    met the primal with varying operands: e.g. a weight's gradient over the token axes), typed as the primal."""
    extra = tuple(x for x in _varying(ct) if x not in _varying(primal))
    return _vary(jax.lax.psum(ct, extra) if extra else ct, _varying(primal))


def _tile_loop(glu, m, xs, tiles, ws, bs):
    """The scan over tiles with its custom VJP (glu and the tile height m closed over)."""
    fn = jax.custom_vjp(lambda xs, tiles, ws, bs: _loop_fwd(glu, m, xs, tiles, ws, bs, keep=False))
    fn.defvjp(lambda xs, tiles, ws, bs: _loop_fwd_res(glu, m, xs, tiles, ws, bs),
              lambda res, dy: _loop_bwd(glu, m, res, dy))
    return fn(xs, tiles, ws, bs)


def _window(a, mask, start, m):
    """Rows [start, start + m) of a [M, ...], zero where mask [m, 1] is False."""
    return jnp.where(mask, jax.lax.dynamic_slice_in_dim(a, start, m), 0)


def _write(a, rows, mask, start):
    """a with rows [start, start + m) replaced by `rows` where mask [m, 1] (in place in a loop carry)."""
    old = jax.lax.dynamic_slice_in_dim(a, start, rows.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(a, jnp.where(mask, rows.astype(a.dtype), old), start, 0)


def _mask(m, window, first, end):
    row = window + jnp.arange(m)
    return ((row >= first) & (row < end))[:, None]  # [m, 1] the window's rows that are the tile's


def _group_weights(ws, g):
    """Group g's weights: gate [F, D], up [F, D], down [D, F]."""
    return tuple(jax.lax.dynamic_index_in_dim(w, g, keepdims=False) for w in ws)


def _group_biases(bs, g):
    """Group g's gate and up biases [F] each, or None."""
    return None if bs is None else (bs[0][g], bs[1][g])


def _tile_forward(glu, x, ws, bs):
    """One tile's rows x [m, D] through its group's expert (weights ws, biases bs or None) -> (output [m, D], gate
    and up projections [m, F])."""
    wg, wu, wd = ws
    gate, up = jnp.einsum("md,fd->mf", x, wg), jnp.einsum("md,fd->mf", x, wu)
    if bs is not None:
        gate, up = gate + bs[0], up + bs[1]
    return jnp.einsum("mf,df->md", glu(gate, up), wd), gate, up


def _loop_fwd(glu, m, xs, tiles, ws, bs, keep: bool):
    def step(y, tile):
        g, window, first, end = tile
        mask = _mask(m, window, first, end)
        out, gate, up = _tile_forward(glu, _window(xs, mask, window, m), _group_weights(ws, g), _group_biases(bs, g))
        return _write(y, out, mask, window), (gate, up) if keep else None

    dtype = jnp.result_type(xs, *ws, *(bs or ()))
    y0 = _vary(jnp.zeros(xs.shape[:1] + ws[2].shape[1:2], dtype), _varying(xs, tiles, ws, bs))  # [M, D]
    y, res = jax.lax.scan(step, y0, tiles)
    return (y, *res) if keep else y


def _loop_fwd_res(glu, m, xs, tiles, ws, bs):
    y, gt, ut = _loop_fwd(glu, m, xs, tiles, ws, bs, keep=True)
    return y, (xs, tiles, ws, bs, gt, ut)


def _loop_bwd(glu, m, res, dy):
    """Per tile: its rows' dx written into [M, D]; weight (and bias) gradients summed in float32 over the group's
    run of tiles, the running sum written to its group's slot each tile (the run's last tile writes the whole sum)."""
    xs, tiles, ws, bs, gt, ut = res
    f32 = jnp.float32
    group = tiles[0]
    new_run = jnp.concatenate([jnp.ones((1,), bool), group[1:] != group[:-1]])  # [n] a group's first tile

    def step(carry, tile):
        dx, grads, sums = carry
        (g, window, first, end), new, gate, up = tile
        mask = _mask(m, window, first, end)
        dxt, parts = _tile_backward(glu, _window(xs, mask, window, m), _window(dy, mask, window, m), gate, up,
                                    _group_weights(ws, g), bs is not None)
        sums = tuple(jnp.where(new, 0, s) + p for s, p in zip(sums, parts))
        grads = tuple(jax.lax.dynamic_update_index_in_dim(a, s.astype(a.dtype), g, 0) for a, s in zip(grads, sums))
        return (_write(dx, dxt, mask, window), grads, sums), None

    leaves = list(ws) + ([] if bs is None else list(bs))
    init = (jnp.zeros_like(xs), tuple(jnp.zeros_like(a) for a in leaves),
            tuple(jnp.zeros(a.shape[1:], f32) for a in leaves))
    (dx, grads, _), _ = jax.lax.scan(step, _vary(init, _varying(res, dy)), (tiles, new_run, gt, ut))
    grads = [_reduce_like(g, a) for g, a in zip(grads, leaves)]
    return _reduce_like(dx, xs), None, tuple(grads[:3]), None if bs is None else tuple(grads[3:])


def _tile_backward(glu, x, dy, gate, up, ws, biased: bool):
    """One tile's backward: rows x, dy [m, D] (rows not the tile's zero), its gate/up projections [m, F], its
    group's weights -> (dx [m, D], float32 gradients of gate, up, down (and the gate/up biases when `biased`))."""
    wg, wu, wd = ws
    f32 = jnp.float32
    h, glu_vjp = jax.vjp(glu, gate, up)  # [m, F]
    dgate, dup = glu_vjp(jnp.einsum("md,df->mf", dy, wd))
    dx = jnp.einsum("mf,fd->md", dgate, wg) + jnp.einsum("mf,fd->md", dup, wu)
    parts = [jnp.einsum("mf,md->fd", dgate, x, preferred_element_type=f32),
             jnp.einsum("mf,md->fd", dup, x, preferred_element_type=f32),
             jnp.einsum("md,mf->df", dy, h, preferred_element_type=f32)]
    if biased:
        parts += [dgate.sum(0, dtype=f32), dup.sum(0, dtype=f32)]
    return dx, tuple(parts)


def expert_loop_swiglu(xs: jax.Array, group_sizes: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                       glu: Callable, biases: tuple[jax.Array, jax.Array] | None = None, tile: int | None = None,
                       shortest: int | None = None) -> jax.Array:
    """grouped_swiglu's CPU path (same arguments and result; rows past sum(group_sizes) give 0): a loop over the
    groups, each slicing its weights once, around that group's tiles: as many `tile`-row tiles (by default
    tallest_tile's) as its rows fill, then at most one of each shorter height of tile_heights (halves, down to
    `shortest`, by default shortest_tile's).

    The trip counts are the data's, so the padding is each group's last tile only (fewer rows than the shortest
    height), and a tile's work is its matmuls: XLA:CPU spends about as long copying a [F, D] weight slice or a running
    [F, D] gradient sum as multiplying a short tile by it, which a loop over all tiles (looped_swiglu) pays per
    tile, and runs a tall tile's matmuls at a higher rate than a short one's. The residuals are every row's
    gate/up projections ([M, F] each); the backward keeps each group's weight-gradient sums (float32) in its tile
    loop's carry and writes them once per group."""
    M = xs.shape[0]
    if M == 0:
        return jnp.zeros_like(xs)
    shortest = shortest or shortest_tile(M, wg.shape[0])
    heights = tile_heights(M, tile or tallest_tile(M, wg.shape[0], shortest), shortest)
    fn = jax.custom_vjp(lambda xs, sizes, ws, bs: _groups_fwd(glu, heights, xs, sizes, ws, bs)[0])
    fn.defvjp(lambda xs, sizes, ws, bs: _groups_fwd(glu, heights, xs, sizes, ws, bs),
              lambda res, dy: _groups_bwd(glu, heights, res, dy))
    return fn(xs, jnp.asarray(group_sizes), (wg, wu, wd), biases)


def _over_tiles(M: int, heights: list[int], first, end, body: Callable, carry):
    """carry through body(window, mask, carry) for each tile of the rows [first, end), their count rounded up to
    heights[-1]: as many tiles of each height, tallest first, as the rows left fill. A tile's window is its
    first row, moved back to fit in M rows; mask [m, 1] marks the window's rows that are the tile's."""
    rest = (end - first + heights[-1] - 1) // heights[-1] * heights[-1]
    start = first
    for m in heights:
        count = rest // m
        carry = jax.lax.fori_loop(0, count, lambda j, c, m=m, s=start: body(*_tile_rows(M, m, s + j * m, end), c),
                                  carry)
        start, rest = start + count * m, rest - count * m
    return carry


def _tile_rows(M, m, start, end):
    """An m-row tile from row `start` (up to `end`): its window's first row (moved back to fit in M) and row mask."""
    window = jnp.clip(start, 0, M - m)
    return window, _mask(m, window, start, end)


def _groups_fwd(glu, heights, xs, sizes, ws, bs):
    M = xs.shape[0]
    F = ws[0].shape[1]
    dtype = jnp.result_type(xs, *ws, *(bs or ()))
    ends = jnp.cumsum(sizes)

    def group(g, carry):
        ws_g = _group_weights(ws, g)  # sliced once per group, not per tile
        bs_g = _group_biases(bs, g)

        def tile(window, mask, carry):
            y, gates, ups = carry
            out, gate, up = _tile_forward(glu, _window(xs, mask, window, mask.shape[0]), ws_g, bs_g)  # [m, D], [m, F]
            return _write(y, out, mask, window), _write(gates, gate, mask, window), _write(ups, up, mask, window)

        return _over_tiles(M, heights, ends[g] - sizes[g], ends[g], tile, carry)

    init = (jnp.zeros((M, ws[2].shape[1]), dtype), jnp.zeros((M, F), dtype), jnp.zeros((M, F), dtype))
    y, gates, ups = jax.lax.fori_loop(0, ws[0].shape[0], group, _vary(init, _varying(xs, sizes, ws, bs)))
    return y, (xs, sizes, ws, bs, gates, ups)


def _groups_bwd(glu, heights, res, dy):
    xs, sizes, ws, bs, gates, ups = res
    M = xs.shape[0]
    leaves = list(ws) + ([] if bs is None else list(bs))
    axes = _varying(res, dy)
    ends = jnp.cumsum(sizes)

    def group(g, carry):
        dxy, grads = carry  # dxy: dx in the rows of the tiles done so far, dy in the rest
        ws_g = _group_weights(ws, g)

        def tile(window, mask, carry):
            dxy, sums = carry
            rows = lambda a: _window(a, mask, window, mask.shape[0])  # noqa: E731 - [m, ...]; other rows 0
            dxt, parts = _tile_backward(glu, rows(xs), rows(dxy), rows(gates), rows(ups), ws_g, bs is not None)
            return _write(dxy, dxt, mask, window), tuple(s + p for s, p in zip(sums, parts))

        sums = _vary(tuple(jnp.zeros(a.shape[1:], jnp.float32) for a in leaves), axes)
        dxy, sums = _over_tiles(M, heights, ends[g] - sizes[g], ends[g], tile, (dxy, sums))
        grads = tuple(jax.lax.dynamic_update_index_in_dim(a, s.astype(a.dtype), g, 0) for a, s in zip(grads, sums))
        return dxy, grads

    # dx is written over dy, each tile's rows after that tile read them (no second [M, D] buffer): a tile reads
    # only its own rows (others masked to 0), and every row is its group's once
    init = _vary((dy.astype(xs.dtype), tuple(jnp.zeros_like(a) for a in leaves)), axes)
    dxy, grads = jax.lax.fori_loop(0, ws[0].shape[0], group, init)
    dx = jnp.where((jnp.arange(M) < ends[-1])[:, None], dxy, 0)  # rows past the groups: dy until here
    grads = [_reduce_like(g, a) for g, a in zip(grads, leaves)]
    return _reduce_like(dx, xs), None, tuple(grads[:3]), None if bs is None else tuple(grads[3:])


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


@jax.custom_vjp
def _permute(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """x [A, ...] -> x[perm], a gather both ways: the cotangent is g[inverse] (the transpose JAX derives is a
    scatter-add into a freshly zeroed [A, ...] buffer)."""
    return x[perm]


_permute.defvjp(lambda x, perm, inverse: (x[perm], inverse), lambda inverse, g: (g[inverse], None, None))


@jax.custom_vjp
def _token_rows(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """x [N, D] -> x[order % N] [k*N, D]; the cotangent is the sum of each token's k rows of g[inverse], added
    slot by slot (XLA:CPU runs the same sum written as a reduction over a leading k axis 10x slower)."""
    return x[order % x.shape[0]]


def _token_rows_bwd(res, g):
    inverse, N, x = res
    rows = g[inverse]  # [k*N, D] in (slot, token) order
    return _reduce_like(_sum_slots(rows.reshape(-1, N, rows.shape[-1])), x), None, None  # typed as x (shard_map)


_token_rows.defvjp(lambda x, order, inverse: (x[order % x.shape[0]], (inverse, x.shape[0], x)), _token_rows_bwd)


def _sum_slots(a: jax.Array) -> jax.Array:
    """a [k, ...] -> a[0] + a[1] + ... (elementwise adds: one loop XLA:CPU vectorizes, where its reduction over the
    leading axis is not)."""
    total = a[0]
    for i in range(1, a.shape[0]):
        total = total + a[i]
    return total


def expert_rows(x: jax.Array, order: jax.Array) -> jax.Array:
    """Tokens x [N, D] -> the k*N assignments' rows in sort_by_expert's `order` [k*N, D] (row a' is token
    order[a'] % N); the backward sums each token's k rows."""
    return _token_rows(x, order, inverse_permutation(order))


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """perm [A] (a permutation of 0..A-1) -> its inverse: inverse[perm[i]] = i, the sorted position of each
    assignment (a scatter: a second argsort costs XLA:CPU several times longer)."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype), unique_indices=True)


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
    y = _permute(ys, inverse_permutation(order), order).reshape(k, N, ys.shape[-1])  # (slot, token) order
    return _weighted_slots(y, weights.T.astype(y.dtype))


@jax.custom_vjp
def _weighted_slots(y: jax.Array, w: jax.Array) -> jax.Array:
    """y [k, N, D], w [k, N] -> sum over k of w[k, :, None] * y[k] [N, D]. The weights' cotangent, a sum over D,
    is a product with a vector of ones: XLA:CPU (its YNNPACK fusion) runs it as a reduction several times slower."""
    return _sum_slots(y * w[:, :, None])


def _weighted_slots_bwd(res, g):
    y, w = res
    dw = jnp.einsum("knd,d->kn", y * g, jnp.ones(g.shape[-1], g.dtype))
    return _reduce_like(w[:, :, None] * g, y), _reduce_like(dw, w)  # (inside shard_map: typed as the primals)


_weighted_slots.defvjp(lambda y, w: (_weighted_slots(y, w), (y, w)), _weighted_slots_bwd)


def grouped_swiglu(xs: jax.Array, group_sizes: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array,
                   glu: Callable, biases: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Rows xs [M, D] sorted by group, group_sizes [G] (sum <= M), gate/up [G, F, D], down [G, D, F] -> [M, D].

    Row r of group g: wd[g] @ glu(wg[g] @ x_r + bg[g], wu[g] @ x_r + bu[g]); rows past sum(group_sizes) are
    unspecified.
    """
    gpu = lambda *a: looped_swiglu(*a, glu, biases)  # noqa: E731 - one branch object: traced once for both
    cpu = lambda *a: expert_loop_swiglu(*a, glu, biases)  # noqa: E731
    return jax.lax.platform_dependent(xs, group_sizes, wg, wu, wd, cpu=cpu, cuda=gpu, rocm=gpu,
                                      default=lambda *a: _ragged(*a, glu, biases))
