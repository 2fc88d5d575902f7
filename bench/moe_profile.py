"""Where the MoE block's forward + backward spends its time on XLA:CPU, op by op: a jax.profiler trace of
bench/moe_throughput.py's jaxformer block (2,048 tokens, width 256, 8 experts of F 512, top-2), each compiled op's
time per step (summed over its loop trips) with its result shape from the compiled HLO, the largest first. A while
loop's time holds the ops inside it (its shape shows as a tuple).

    python bench/moe_profile.py [--family mixtral] [--steps 5] [--top 25]

The last line is one JSON object: the top ops (name, ms per step, calls per step, result shape) and the load.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_throughput  # noqa: E402 - the bench's blocks and runner


def result_shapes(hlo: str) -> dict[str, str]:
    """Compiled HLO text -> {instruction name: its result type}."""
    return {m[1]: m[2] for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", hlo, re.M)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="mixtral", choices=["mixtral", "deepseek_v3", "gpt_oss"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    D, F, E, k, tokens = 256, 512, 8, 2, 2048
    _, block, _ = moe_throughput.blocks(args.family, D, F, E, k)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens // moe_throughput.SEQ, moe_throughput.SEQ, D)).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    graphdef, params = nnx.split(block)
    fn = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) * gy), argnums=(0, 1)))
    shapes = result_shapes(fn.lower(params, jnp.asarray(x)).compile().as_text())
    run = moe_throughput.jax_runner(block, x, gy)
    for _ in range(3):
        run()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(args.steps):
            run()
        jax.profiler.stop_trace()
        (trace,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))["traceEvents"]
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in shapes:  # the compiled program's ops only
            total[e["name"]] += e["dur"] / 1e3 / args.steps
            calls[e["name"]] += 1 / args.steps
    top = [{"op": n, "ms": round(ms, 2), "calls": round(calls[n]), "shape": shapes[n]}
           for n, ms in total.most_common(args.top)]
    print(f"{args.family}: the block's ops, ms per forward + backward step ({args.steps} traced steps); "
          f"load {load_before} -> {os.getloadavg()}")
    for t in top:
        print(f"  {t['ms']:7.2f} ms  {t['calls']:4d}x  {t['op']:40s} {t['shape']}")
    print(json.dumps({"family": args.family, "top": top, "loadavg_before": [round(v, 2) for v in load_before]}))


if __name__ == "__main__":
    main()
