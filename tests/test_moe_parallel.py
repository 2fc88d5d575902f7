"""Expert parallelism (jaxformer/models/moe_parallel.py) on 8 fake CPU devices: one subprocess, tests/moe_worker.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_on_eight_devices

ROOT = Path(__file__).resolve().parent.parent
MESHES = {"expert8": (8, 1, 1), "expert2_fsdp2_tensor2": (2, 2, 2)}  # expert, fsdp, tensor


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("moe") / "report.json"
    run_on_eight_devices(str(ROOT / "tests" / "moe_worker.py"), str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", MESHES)
def test_expert_parallel_equals_one_device(report, mesh):
    r = report[mesh]
    assert report["devices"] == 8
    assert abs(r["loss"] - report["one_loss"]) <= 1e-5 * abs(report["one_loss"])  # cross-entropy + aux + z loss
    assert r["n_grads"] == 23, "every parameter's gradient compared"
    assert r["max_grad_rel"] <= 1e-5, f"{r['worst']}: rel {r['max_grad_rel']}"


@pytest.mark.parametrize("mesh", MESHES)
def test_expert_weights_split_and_never_gathered_whole(report, mesh):
    r = report[mesh]
    ep, fsdp, tensor = MESHES[mesh]
    for name, (shard, full) in r["expert_bytes"].items():
        assert shard * ep * fsdp * tensor == full, name  # 1/ep of the experts, each split over fsdp x tensor too
    full_sizes = {math.prod(s) for s in report["expert_shapes"].values()}
    assert r["all_to_all"], "tokens reach their experts by all-to-all"
    biggest = max((math.prod(s) for s in r["all_gather"]), default=0)
    assert biggest <= min(full_sizes) // ep, f"an all-gather as large as {biggest} elements: {r['all_gather']}"
    assert not [s for s in r["all_gather"] if s in report["expert_shapes"].values()]
    assert report["routed_rows"] not in r["all_gather"], "every token's rows gathered onto each device (GSPMD's way)"


def test_capacity_factor_groups_per_device(report):
    c = report["capacity"]
    assert c["dropped"] > 0.05, "the case must drop assignments"
    assert abs(c["dropped"] - c["dropped_ref"]) < 1e-6
    assert c["max_abs_diff"] <= 1e-5 * c["max_abs"]


def test_fewer_rows_than_the_batch_axes_split_tokens(report):
    """3 rows on expert=8 (serving: one prompt's prefill, a few decode rows) run over tokens, equal to one device."""
    r = report["few_rows"]
    assert r["max_abs_diff"] <= 1e-5 * r["max_abs"]


def test_biased_clamped_experts_split_over_expert_fsdp_tensor(report):
    """gpt-oss's experts: output and every gradient (router and expert biases included) equal one device's."""
    r = report["biased"]
    assert {"experts.gate_bias", "experts.up_bias", "experts.down_bias", "gate.bias"} <= set(r["names"])
    assert r["max_abs_diff"] <= 1e-5 * r["max_abs"]
    assert r["max_grad_rel"] <= 1e-5, f"{r['worst']}: rel {r['max_grad_rel']}"


def test_deepseek_router_on_expert_parallel_equals_one_device(report):
    r = report["deepseek"]
    assert r["max_abs_diff"] <= 1e-5 * r["max_abs"]


@pytest.mark.parametrize("mesh", MESHES)
def test_deepseek_v3_like_model_on_expert_meshes_equals_one_device(report, mesh):
    """Latent attention, a dense first layer, grouped sigmoid routing and a shared expert: the training objective and
    every gradient (elementwise, relative to the largest) on expert 8 and on expert 2 x fsdp 2 x tensor 2."""
    r = report["deepseek_model"]
    assert {"layers.0.self_attn.kv_b_proj.weight", "layers.1.mlp.shared_expert.down_proj.weight",
            "layers.2.mlp.gate.weight"} <= set(r["names"])
    assert abs(r[mesh]["loss"] - r["one_loss"]) <= 1e-5 * abs(r["one_loss"])
    # measured 4.5e-6 / 4.7e-6 (embed_tokens: summed over every token's rows in another order)
    assert r[mesh]["max_grad_rel"] <= 2e-5, f"{r[mesh]['worst']}: rel {r[mesh]['max_grad_rel']}"


def test_llama4_router_on_expert_fsdp_tensor_equals_one_device(report):
    """Llama 4's weights act on the experts' inputs: on expert 2 x fsdp 2 x tensor 2 the output and every gradient
    (router, experts, shared expert) equal one device's."""
    r = report["llama4"]
    assert {"gate.weight", "experts.gate_proj", "shared_expert.down_proj.weight"} <= set(r["names"])
    assert r["max_abs_diff"] <= 1e-5 * r["max_abs"]
    assert r["max_grad_rel"] <= 1e-5, f"{r['worst']}: rel {r['max_grad_rel']}"


def test_misfit_meshes_name_the_fix(report):
    assert "does not divide n_experts=4" in report["errors"]["experts"]


def SWIGLU(g, u):  # grouped_swiglu's glu: act(gate) * up
    import jax

    return jax.nn.silu(g) * u


def test_expert_rows_and_combine_match_numpy_loops():
    """The dispatch into expert order (expert_rows) and back (combine), each a gather both ways, against numpy loops:
    forward values and the vector-Jacobian products (a token's k rows summed; each row's weighted share)."""
    import jax
    import numpy as np

    from jaxformer.models.grouped import combine, expert_rows, sort_by_expert

    rng = np.random.default_rng(3)
    N, D, E, k = 11, 6, 5, 3
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(N)]).astype(np.int32)  # [N, k] distinct experts
    x, w = rng.standard_normal((N, D)).astype(np.float32), rng.random((N, k)).astype(np.float32)
    order, sorted_expert, _ = (np.asarray(a) for a in sort_by_expert(idx, E))
    token, slot = order % N, order // N  # sorted row a' is (slot, token) assignment order[a']
    assert (idx[token, slot] == sorted_expert).all() and (np.diff(sorted_expert) >= 0).all()

    xs, rows_vjp = jax.vjp(lambda x: expert_rows(x, order), x)
    np.testing.assert_array_equal(np.asarray(xs), x[token])
    g = rng.standard_normal(xs.shape).astype(np.float32)
    want = np.zeros_like(x)
    for a in range(len(order)):
        want[token[a]] += g[a]
    np.testing.assert_allclose(np.asarray(rows_vjp(g)[0]), want, rtol=1e-6, atol=1e-6)

    ys = rng.standard_normal(xs.shape).astype(np.float32)
    y, combine_vjp = jax.vjp(lambda ys, w: combine(ys, order, w), ys, w)
    want = np.zeros((N, D), np.float32)
    for a in range(len(order)):
        want[token[a]] += w[token[a], slot[a]] * ys[a]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
    gy = rng.standard_normal((N, D)).astype(np.float32)
    dys, dw = (np.asarray(a) for a in combine_vjp(gy))
    np.testing.assert_allclose(dys, w[token, slot][:, None] * gy[token], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw[token, slot], (ys * gy[token]).sum(1), rtol=1e-5, atol=1e-6)


def test_grouped_swiglu_matches_per_group_reference():
    """models/grouped.py on CPU (tiles) vs numpy per group (forward) and a masked dense jnp reference (gradients)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxformer.models.grouped import grouped_swiglu

    rng = np.random.default_rng(7)
    G, D, F = 5, 12, 20
    sizes = np.array([9, 0, 31, 1, 14], np.int32)  # an empty group, sizes that are not whole tiles
    M = int(sizes.sum())
    x = rng.standard_normal((M, D)).astype(np.float32)
    wg, wu = (rng.standard_normal((G, F, D)).astype(np.float32) * 0.3 for _ in range(2))
    wd = rng.standard_normal((G, D, F)).astype(np.float32) * 0.3
    group = np.repeat(np.arange(G), sizes)
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    ref = np.stack([wd[g] @ (silu(wg[g] @ r) * (wu[g] @ r)) for r, g in zip(x, group)])
    out = np.asarray(jax.jit(grouped_swiglu, static_argnums=5)(x, sizes, wg, wu, wd, SWIGLU))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

    def dense(x, wg, wu, wd):  # every row through every expert, masked to its own
        h = jax.nn.silu(jnp.einsum("md,gfd->gmf", x, wg)) * jnp.einsum("md,gfd->gmf", x, wu)
        return jnp.einsum("gmf,gdf->md", h * (jnp.arange(G)[:, None] == group[None, :])[..., None], wd)

    gy = rng.standard_normal((M, D)).astype(np.float32)
    grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * gy), argnums=(0, 1, 2, 3))(x, wg, wu, wd)  # noqa: E731
    for a, b in zip(grad(lambda *a: grouped_swiglu(a[0], sizes, *a[1:], SWIGLU)), grad(dense)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_grouped_biased_clamped_glu_matches_per_group_reference():
    """gpt-oss's experts: gate/up biases and the clamped GLU, tiles (CPU) vs a numpy loop; and the batched form."""
    import functools

    import jax
    import numpy as np

    from jaxformer.models.grouped import batched_swiglu, grouped_swiglu
    from jaxformer.models.moe import glu

    rng = np.random.default_rng(8)
    G, D, F, L, alpha = 4, 12, 20, 1.5, 1.702
    sizes = np.array([7, 0, 23, 12], np.int32)
    x = rng.standard_normal((int(sizes.sum()), D)).astype(np.float32)
    wg, wu = (rng.standard_normal((G, F, D)).astype(np.float32) * 0.5 for _ in range(2))
    wd = rng.standard_normal((G, D, F)).astype(np.float32) * 0.3
    bg, bu = (rng.standard_normal((G, F)).astype(np.float32) for _ in range(2))
    fn = functools.partial(glu, act=None, limit=L, alpha=alpha)

    def expert(r, g):  # numpy, float64: transformers' GptOssExperts._apply_gate
        gate, up = wg[g] @ r + bg[g], wu[g] @ r + bu[g]
        gate, up = np.minimum(gate, L), np.clip(up, -L, L)
        return wd[g] @ ((up + 1) * gate / (1 + np.exp(-alpha * gate)))

    ref = np.stack([expert(r.astype(np.float64), g) for r, g in zip(x, np.repeat(np.arange(G), sizes))])
    assert np.abs(np.clip(x @ wg[2].T + bg[2], -9, 9)).max() > L, "the clamp must bind somewhere"
    out = np.asarray(jax.jit(lambda *a: grouped_swiglu(*a[:5], fn, a[5:]))(x, sizes, wg, wu, wd, bg, bu))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    xb = np.stack([x[:7], x[7:14], x[7:14], x[30:37]])  # [G, C, D]
    ref_b = np.stack([[expert(r.astype(np.float64), g) for r in xb[g]] for g in range(G)])
    got_b = np.asarray(batched_swiglu(xb, wg, wu, wd, fn, (bg, bu)))
    np.testing.assert_allclose(got_b, ref_b, rtol=1e-5, atol=1e-5 * np.abs(ref_b).max())


def masked_dense(x, sizes, wg, wu, wd, glu, biases=None):
    """Every row through every expert, masked to its own (rows past sum(sizes): none, so zero): a jnp reference."""
    import jax.numpy as jnp
    import numpy as np

    G = wg.shape[0]
    group = np.concatenate([np.repeat(np.arange(G), sizes), np.full(x.shape[0] - sizes.sum(), G)])
    gate, up = jnp.einsum("md,gfd->gmf", x, wg), jnp.einsum("md,gfd->gmf", x, wu)
    if biases is not None:
        gate, up = gate + biases[0][:, None], up + biases[1][:, None]
    h = glu(gate, up) * (jnp.arange(G)[:, None] == group[None, :])[..., None]
    return jnp.einsum("gmf,gdf->md", h, wd)


TILE_LOOPS = ["looped_swiglu", "expert_loop_swiglu"]  # models/grouped.py's GPU path and CPU path


def check_tile_loop(looped_swiglu):
    """looped_swiglu(x, sizes, wg, wu, wd) (SwiGLU) forward vs numpy per group, every gradient vs the masked dense
    reference; an empty group first and last, rows past sum(sizes) (the last tiles' windows then move back from
    the end)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(9)
    G, D, F = 7, 12, 20
    sizes = np.array([0, 9, 0, 31, 1, 14, 0], np.int32)
    M = int(sizes.sum()) + 5  # 5 rows past every group (their output is zero)
    x = rng.standard_normal((M, D)).astype(np.float32)
    wg, wu = (rng.standard_normal((G, F, D)).astype(np.float32) * 0.3 for _ in range(2))
    wd = rng.standard_normal((G, D, F)).astype(np.float32) * 0.3
    group = np.repeat(np.arange(G), sizes)
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    ref = np.stack([wd[g] @ (silu(wg[g] @ r) * (wu[g] @ r)) for r, g in zip(x, group)])
    out = np.asarray(jax.jit(looped_swiglu)(x, sizes, wg, wu, wd))
    np.testing.assert_allclose(out[:len(ref)], ref, rtol=1e-5, atol=1e-5)
    assert not out[len(ref):].any()

    gy = rng.standard_normal((M, D)).astype(np.float32)
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * gy), argnums=(0, 1, 2, 3)))(x, wg, wu, wd)  # noqa
    got = grad(lambda x, *w: looped_swiglu(x, sizes, *w))
    want = grad(lambda x, *w: masked_dense(x, sizes, *w, SWIGLU))
    for name, a, b in zip(("x", "gate", "up", "down"), got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)
    assert not np.asarray(got[1])[[0, 2, 6]].any(), "empty groups get zero weight gradients"


def test_cpu_tallest_tile_is_the_even_share():
    """The CPU path's tallest height: a group's even share of the rows rounded up to a power of two, within
    [shortest, 1024]."""
    from jaxformer.models.grouped import tallest_tile

    assert tallest_tile(4096, 8, 32) == 512  # the MoE bench's experts: 512 rows each
    assert tallest_tile(4100, 8, 32) == 1024  # 513 rows a share
    assert tallest_tile(8192, 8, 64) == 1024 and tallest_tile(1 << 20, 8, 64) == 1024  # the cap
    assert tallest_tile(60, 7, 16) == 16 and tallest_tile(8, 8, 16) == 16  # never under the shortest


@pytest.mark.parametrize("impl", TILE_LOOPS)
@pytest.mark.parametrize("tile", [None, 4, 7])
def test_gpu_tile_loop_matches_per_group_reference(tile, impl):
    """models/grouped.py's GPU path (looped_swiglu) and CPU path (expert_loop_swiglu), tiles of 4 (several per
    group: a group's weight gradient summed over its run of tiles), 7 and the default (GPU: the whole 60 rows, one
    tile per group, its window moved back; CPU: tallest_tile's 16) against the per-group references."""
    from jaxformer.models import grouped

    check_tile_loop(lambda *a: getattr(grouped, impl)(*a, SWIGLU, tile=tile))


@pytest.mark.parametrize("tile, shortest, heights",
                         [(16, 1, [16, 8, 4, 2, 1]), (16, 4, [16, 8, 4]), (64, 4, [60, 30, 15])])
def test_cpu_tile_ladder_matches_per_group_reference(tile, shortest, heights):
    """The CPU path's tiles of several heights: 16-row tiles, then at most one of each half (31 rows = 16 + 8 + 4 +
    2 + 1, 14 = 8 + 4 + 2: no padding); without 2- and 1-row tiles a group's last 4-row tile is padded (31 = 16 +
    8 + 4 + 4 padded by 1); a tallest height over the 60 rows becomes 60, then 30, 15 (odd: no shorter one)."""
    from jaxformer.models import grouped

    assert grouped.tile_heights(60, tile, shortest) == heights  # what each case exercises
    check_tile_loop(lambda *a: grouped.expert_loop_swiglu(*a, SWIGLU, tile=tile, shortest=shortest))


def test_cpu_shortest_tile_bounds_the_padding():
    """The CPU path's shortest height: the tallest of 64, 32, 16 with groups x (height - 1) <= M / 16 padded rows."""
    from jaxformer.models.grouped import shortest_tile

    assert shortest_tile(8192, 8) == 64  # 8 x 63 = 504 <= 512
    assert shortest_tile(4096, 8) == 32  # 8 x 63 > 256 >= 8 x 31
    assert shortest_tile(4096, 64) == 16 and shortest_tile(100, 8) == 16  # nothing fits: the shortest


@pytest.mark.parametrize("impl", TILE_LOOPS)
@pytest.mark.parametrize("tile", [None, 4])
def test_gpu_tile_loop_biased_clamped_glu_matches_reference(tile, impl):
    """gpt-oss's experts through the GPU path: gate/up biases and the clamped GLU, forward vs the numpy loop of
    transformers' GptOssExperts, gradients (biases too) vs the masked dense reference; rows past sum(sizes)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxformer.models import grouped

    looped_swiglu = getattr(grouped, impl)
    from jaxformer.models.moe import glu

    rng = np.random.default_rng(10)
    G, D, F, L, alpha = 4, 12, 20, 1.5, 1.702
    sizes = np.array([7, 0, 23, 12], np.int32)
    M = int(sizes.sum()) + 3
    x = rng.standard_normal((M, D)).astype(np.float32)
    wg, wu = (rng.standard_normal((G, F, D)).astype(np.float32) * 0.5 for _ in range(2))
    wd = rng.standard_normal((G, D, F)).astype(np.float32) * 0.3
    bg, bu = (rng.standard_normal((G, F)).astype(np.float32) for _ in range(2))
    fn = functools.partial(glu, act=None, limit=L, alpha=alpha)

    def expert(r, g):  # numpy, float64: transformers' GptOssExperts._apply_gate
        gate, up = wg[g] @ r + bg[g], wu[g] @ r + bu[g]
        gate, up = np.minimum(gate, L), np.clip(up, -L, L)
        return wd[g] @ ((up + 1) * gate / (1 + np.exp(-alpha * gate)))

    ref = np.stack([expert(r.astype(np.float64), g) for r, g in zip(x, np.repeat(np.arange(G), sizes))])
    out = np.asarray(jax.jit(lambda *a: looped_swiglu(*a[:5], fn, a[5:], tile=tile))(x, sizes, wg, wu, wd, bg, bu))
    np.testing.assert_allclose(out[:len(ref)], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert not out[len(ref):].any()

    gy = rng.standard_normal((M, D)).astype(np.float32)
    args = (x, wg, wu, wd, bg, bu)
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * gy), argnums=tuple(range(6))))(*args)  # noqa
    got = grad(lambda x, a, b, c, d, e: looped_swiglu(x, sizes, a, b, c, fn, (d, e), tile=tile))
    want = grad(lambda x, a, b, c, d, e: masked_dense(x, sizes, a, b, c, fn, (d, e)))
    for name, a, b in zip(("x", "gate", "up", "down", "gate_bias", "up_bias"), got, want):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=name)
    assert np.abs(np.asarray(got[4])).max() > 0 and not np.asarray(got[4])[1].any()


@pytest.mark.parametrize("impl", TILE_LOOPS)
def test_gpu_tile_loop_bf16_matches_float32_reference(impl):
    """bf16 through the GPU path, 8 tiles in one group's run (its weight gradient summed over them in float32, then
    rounded once): every gradient bf16 and within bf16 compute's bound (1e-2 of the norm) of a float32 reference."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxformer.models import grouped

    looped_swiglu = getattr(grouped, impl)

    rng = np.random.default_rng(11)
    G, D, F = 3, 16, 24
    sizes = np.array([5, 64, 11], np.int32)
    M = int(sizes.sum())
    x = rng.standard_normal((M, D)).astype(np.float32)
    ws = [rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((G, F, D), (G, F, D), (G, D, F))]
    gy = rng.standard_normal((M, D)).astype(np.float32)

    def grads(dtype, fn):
        loss = lambda x, *w: jnp.sum(fn(x, *w).astype(jnp.float32) * gy)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*(jnp.asarray(a, dtype) for a in (x, *ws)))

    got = grads(jnp.bfloat16, lambda x, *w: looped_swiglu(x, sizes, *w, SWIGLU, tile=8))
    want = grads(jnp.float32, lambda x, *w: masked_dense(x, sizes, *w, SWIGLU))
    for name, a, b in zip(("x", "gate", "up", "down"), got, want):
        assert a.dtype == jnp.bfloat16, name
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b), (name, np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("impl", TILE_LOOPS)
def test_gpu_tile_loop_fewer_rows_than_a_tile(impl):
    """Decode-sized inputs: 4 rows over 5 experts (3 of them empty) take one 4-row tile per expert in use; no rows,
    no tiles."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxformer.models import grouped

    looped_swiglu = getattr(grouped, impl)

    rng = np.random.default_rng(12)
    G, D, F = 5, 8, 6
    sizes = np.array([0, 3, 0, 1, 0], np.int32)
    x = rng.standard_normal((4, D)).astype(np.float32)
    ws = [rng.standard_normal(s).astype(np.float32) for s in ((G, F, D), (G, F, D), (G, D, F))]
    loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)  # noqa: E731
    got = jax.value_and_grad(loss(lambda x, *w: looped_swiglu(x, sizes, *w, SWIGLU)), argnums=(0, 1, 2, 3))(x, *ws)
    want = jax.value_and_grad(loss(lambda x, *w: masked_dense(x, sizes, *w, SWIGLU)), argnums=(0, 1, 2, 3))(x, *ws)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * np.abs(np.asarray(b)).max())
    assert looped_swiglu(x[:0], np.zeros(G, np.int32), *ws, SWIGLU).shape == (0, D)


GPU_PATH_ON_MESHES = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import moe_worker
from jaxformer.models import grouped, moe_parallel
moe_parallel.grouped_swiglu = lambda *a, **k: grouped.looped_swiglu(*a, **k, tile=4)  # the GPU path, 4-row tiles
rng = np.random.default_rng(0)
print(json.dumps({"biased": moe_worker.biased_case(rng), "llama4": moe_worker.llama4_case(rng)}))
"""


def test_gpu_tile_loop_on_expert_fsdp_tensor_equals_one_device():
    """The GPU path inside the expert-parallel shard_map (its custom VJP sums each cotangent over the mesh axes its
    primal does not vary over: dx over "tensor", the weights' over the token axes), run on 8 CPU devices in place of
    the CPU tiles: gpt-oss's biased clamped experts and Llama 4's on expert 2 x fsdp 2 x tensor 2 against one device
    (tests/moe_worker.py's cases), outputs and every parameter's gradient."""
    stdout = run_on_eight_devices("-c", GPU_PATH_ON_MESHES, str(ROOT / "tests"))
    for name, r in json.loads(stdout.strip().splitlines()[-1]).items():
        assert r["max_abs_diff"] <= 1e-5 * r["max_abs"], name
        assert r["max_grad_rel"] <= 1e-5, f"{name}: {r['worst']}: rel {r['max_grad_rel']}"
