"""Where the MoE block's time goes outside the experts, forward + backward, on XLA:CPU: the whole block, the block
with its experts replaced by a trivial function of the same rows (router, dispatch into expert order and combine
back, alone), and the experts alone (grouped_swiglu on the same number of rows); then the sum over each token's k
rows written two ways, as XLA:CPU runs them: a reduction over a leading axis of size k, and k - 1 adds.

bench/moe_throughput.py's block and inputs (2,048 tokens, width 256, 8 experts of F 512, top-2). Runners
interleaved, medians of --repeats; the load average before and after. Run it against an older commit with
PYTHONPATH at that commit's worktree. The last line is one JSON object.

    python bench/moe_dispatch.py [--family mixtral] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_throughput  # noqa: E402 - the bench's blocks and runner

from jaxformer.models import grouped, moe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="mixtral", choices=["mixtral", "deepseek_v3", "gpt_oss"])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    D, F, E, k, tokens = 256, 512, 8, 2, 2048
    _, block, cfg = moe_throughput.blocks(args.family, D, F, E, k)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens // moe_throughput.SEQ, moe_throughput.SEQ, D)).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    runners = {"block": moe_throughput.jax_runner(block, x, gy)}
    experts = moe.grouped_swiglu
    moe.grouped_swiglu = lambda xs, sizes, wg, wu, wd, glu, biases: xs * wg[0, 0, 0]  # keeps a weight's gradient
    try:
        runners["router_dispatch_combine"] = moe_throughput.jax_runner(block, x, gy)
        runners["router_dispatch_combine"]()  # traced now, while the experts are the trivial function
    finally:
        moe.grouped_swiglu = experts
    M = k * tokens
    xs, dy = (jnp.asarray(rng.standard_normal((M, D)), jnp.float32) for _ in range(2))
    sizes = jnp.asarray(np.bincount(rng.integers(0, E, M), minlength=E), jnp.int32)
    ws = block.experts._weights()
    glu, biases = block.experts.glu(), block.experts.biases()
    alone = jax.jit(jax.grad(lambda xs, ws: jnp.sum(grouped.grouped_swiglu(xs, sizes, *ws, glu, biases) * dy),
                             argnums=(0, 1)))
    runners["experts_alone"] = lambda: jax.block_until_ready(alone(xs, ws))
    rows = jnp.asarray(rng.standard_normal((k, tokens, D)), jnp.float32)
    as_reduction = jax.jit(lambda r: r.sum(0))
    as_adds = jax.jit(lambda r: sum(r[i] for i in range(1, r.shape[0])) + r[0])
    runners["k_rows_summed_as_reduction"] = lambda: jax.block_until_ready(as_reduction(rows))
    runners["k_rows_summed_as_adds"] = lambda: jax.block_until_ready(as_adds(rows))
    for run in runners.values():
        run()
    times = {name: [] for name in runners}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, run in runners.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    load_after = os.getloadavg()
    ms = {name: round(1e3 * statistics.median(ts), 2) for name, ts in times.items()}
    print(f"{args.family}: {tokens} tokens, D {D}, {E} experts of F {F}, top-{k}; forward + backward, median ms; "
          f"load {load_before} -> {load_after}")
    for name, v in ms.items():
        print(f"  {name:28s} {v:8.2f} ms")
    print(json.dumps({"family": args.family, "ms": ms, "loadavg_before": [round(v, 2) for v in load_before],
                      "loadavg_after": [round(v, 2) for v in load_after], "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
