"""XLA:CPU's matmul rate against torch's on the MoE tiles' shapes, in this process (GFLOP/s).

For each tile height m and (K, N): the forward form x [m, K] @ W^T (W [N, K], torch's layout) and the weight
gradient's form g^T @ x (contracting the m rows), each as 8 products in one jitted call (so dispatch does not
count), against torch.nn.functional.linear and g.T @ x on the same arrays. Medians of --repeats; the load average
printed before and after. The last line is one JSON object.

    python bench/xla_cpu_matmul.py [--heights 256 512 1024] [--repeats 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

PRODUCTS = 8  # per timed call


def median_s(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heights", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--shapes", nargs="+", default=["256x512", "512x256"], help="K x N")
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    scales = [1 + i * 1e-3 for i in range(PRODUCTS)]  # distinct products XLA cannot fold into one
    forward = jax.jit(lambda x, w: sum(jnp.einsum("mk,nk->mn", x * s, w) for s in scales))
    wgrad = jax.jit(lambda g, x: sum(jnp.einsum("mn,mk->nk", g * s, x) for s in scales))
    load_before, rows = os.getloadavg(), []
    print(f"torch threads {torch.get_num_threads()}; load before {load_before}")
    for m in args.heights:
        for shape in args.shapes:
            K, N = map(int, shape.split("x"))
            x, g = rng.standard_normal((m, K), np.float32), rng.standard_normal((m, N), np.float32)
            w = rng.standard_normal((N, K), np.float32)
            xj, gj, wj = jnp.asarray(x), jnp.asarray(g), jnp.asarray(w)
            xt, gt, wt = torch.from_numpy(x), torch.from_numpy(g), torch.from_numpy(w)
            gflop = PRODUCTS * 2 * m * K * N / 1e9
            rate = {
                "xla_forward": gflop / median_s(lambda: forward(xj, wj).block_until_ready(), args.repeats),
                "torch_forward": gflop / median_s(lambda: sum(torch.nn.functional.linear(xt * s, wt) for s in scales),
                                                  args.repeats),
                "xla_weight_grad": gflop / median_s(lambda: wgrad(gj, xj).block_until_ready(), args.repeats),
                "torch_weight_grad": gflop / median_s(lambda: sum((gt * s).T @ xt for s in scales), args.repeats)}
            print(f"m {m}, K {K}, N {N}: x @ W^T  XLA {rate['xla_forward']:.0f}  torch {rate['torch_forward']:.0f}; "
                  f"g^T @ x  XLA {rate['xla_weight_grad']:.0f}  torch {rate['torch_weight_grad']:.0f} GFLOP/s")
            rows.append({"m": m, "K": K, "N": N, **{k: round(v, 1) for k, v in rate.items()}})
    load_after = os.getloadavg()
    print(f"load after {load_after}")
    print(json.dumps({"rows": rows, "loadavg_before": [round(v, 2) for v in load_before],
                      "loadavg_after": [round(v, 2) for v in load_after], "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
