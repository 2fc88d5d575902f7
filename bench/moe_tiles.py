"""The CPU path of the dropless experts alone: one tile height (128 rows, how it ran before) vs tiles of several
heights (1,024 rows while an expert's rows fill them, then at most one each of 512, 256, ...) down to 16 rows vs
down to the default's shortest height (grouped.shortest_tile: 16 to 64 rows, padding within M / 16), forward +
backward.

Rows are drawn uniformly over the experts (group sizes passed as an argument, not fixed at compile time); the
settings run the same inputs and weights, repeats interleaved, medians; the load average is printed before and
after. A third runner times the floor: the same FLOPs as one dense [M, D] MLP (every row through expert 0, no
groups, no loop). The last line is one JSON object.

    python bench/moe_tiles.py [--shapes 8x256x512x4096 8x128x172x8192 64x256x256x4096 128x256x128x8192]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.models.grouped import expert_loop_swiglu
from jaxformer.models.moe import glu

SETTINGS = {"one_height_128": dict(tile=128, shortest=128), "halving_heights_1024_to_16": dict(shortest=16),
            "halving_heights_default": {}}


def run_shape(G: int, D: int, F: int, M: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    xs, dy = (jnp.asarray(rng.standard_normal((M, D)), jnp.float32) for _ in range(2))
    ws = tuple(jnp.asarray(0.05 * rng.standard_normal(s), jnp.float32) for s in ((G, F, D), (G, F, D), (G, D, F)))
    sizes = jnp.asarray(np.bincount(rng.integers(0, G, M), minlength=G), jnp.int32)
    swiglu = functools.partial(glu, act=jax.nn.silu, limit=None, alpha=1.0)
    runners, grads = {}, {}
    for name, kw in SETTINGS.items():
        loss = lambda xs, ws, sizes, kw=kw: jnp.sum(expert_loop_swiglu(xs, sizes, *ws, swiglu, **kw) * dy)  # noqa
        fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
        grads[name] = fn(xs, ws, sizes)
        runners[name] = lambda fn=fn: jax.block_until_ready(fn(xs, ws, sizes))
    def dense(xs, ws):  # the floor: the same FLOPs as one [M, D] MLP through expert 0, no groups, no loop
        wg, wu, wd = (w[0] for w in ws)
        return jnp.sum((swiglu(xs @ wg.T, xs @ wu.T) @ wd.T) * dy)

    floor = jax.jit(jax.grad(dense, argnums=(0, 1)))
    floor(xs, ws)
    runners["dense_floor_one_expert"] = lambda: jax.block_until_ready(floor(xs, ws))
    base_grads = jax.tree.leaves(grads["one_height_128"])
    diff = max(float(jnp.abs(x - y).max() / jnp.abs(y).max())
               for g in grads.values() for x, y in zip(jax.tree.leaves(g), base_grads))
    times = {name: [] for name in runners}
    for run in runners.values():
        run()
    load_before = os.getloadavg()
    for _ in range(repeats):
        for name, run in runners.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    base, new = ms["one_height_128"], ms["halving_heights_default"]
    print(f"G {G}, D {D}, F {F}, M {M}: " + ", ".join(f"{n} {v:.1f} ms" for n, v in ms.items())
          + f"; speed-up x{base / new:.2f}; gradients agree to {diff:.1e} x max; load {load_before} -> "
          f"{os.getloadavg()}")
    return {"ms": {n: round(v, 2) for n, v in ms.items()}, "speedup": round(base / new, 3), "max_rel_diff": diff,
            "loadavg_before": [round(v, 2) for v in load_before]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["8x256x512x4096", "8x128x172x8192", "64x256x256x4096",
                                                    "128x256x128x8192"], help="experts x D x F x rows")
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()
    results = {s: run_shape(*map(int, s.split("x")), args.repeats) for s in args.shapes}
    print(json.dumps({"shapes": results, "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
