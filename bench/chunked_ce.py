"""The output head + cross-entropy, forward + backward: whole logits (the model's [B, T, V], then the loss) vs the
chunked loss (train/chunked_ce.py, --chunk tokens' logits at a time), in this process.

For each shape (rows x positions x width x vocabulary) both are jitted on the same random inputs; printed: XLA's
temporary bytes of each compiled step (memory_analysis: what the logits cost), the median time over --repeats
(interleaved), the largest gradient difference relative to the largest gradient, and the load average before and
after. The last line is one JSON object.

    python bench/chunked_ce.py [--shapes 16x256x128x4096 8x256x256x32768] [--chunk 1024] [--repeats 7]
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

from jaxformer.models.layers import OutputHead
from jaxformer.train.chunked_ce import chunked_cross_entropy_sums
from jaxformer.train.losses import cross_entropy_sums


def run_shape(B: int, T: int, D: int, V: int, chunk: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    w = jnp.asarray(0.02 * rng.standard_normal((V, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.ones((B, T), jnp.float32)
    losses = {"whole_logits": lambda h, w: cross_entropy_sums(OutputHead(w).logits(h), targets, mask)[0],
              "chunked": lambda h, w: chunked_cross_entropy_sums(h, OutputHead(w), targets, mask, 0.0, chunk)[0]}
    steps = {name: jax.jit(jax.grad(fn, argnums=(0, 1))) for name, fn in losses.items()}
    temp = {name: step.lower(h, w).compile().memory_analysis().temp_size_in_bytes for name, step in steps.items()}
    grads = {name: step(h, w) for name, step in steps.items()}
    diff = max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
               for a, b in zip(grads["chunked"], grads["whole_logits"]))
    times = {name: [] for name in steps}
    load_before = os.getloadavg()
    for _ in range(repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            jax.block_until_ready(step(h, w))
            times[name].append(time.perf_counter() - t)
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    load_after = os.getloadavg()
    print(f"B {B} x T {T}, D {D}, V {V}, chunk {chunk}: temporaries whole {temp['whole_logits'] / 2**20:.1f} MiB, "
          f"chunked {temp['chunked'] / 2**20:.1f} MiB (x{temp['whole_logits'] / temp['chunked']:.1f} less); "
          f"fwd+bwd {ms['whole_logits']:.1f} vs {ms['chunked']:.1f} ms (x{ms['whole_logits'] / ms['chunked']:.2f}); "
          f"gradients agree to {diff:.1e} x max; load {load_before} -> {load_after}")
    return {"temp_bytes": temp, "ms": {n: round(v, 2) for n, v in ms.items()},
            "speed_vs_whole": round(ms["whole_logits"] / ms["chunked"], 3),
            "memory_vs_whole": round(temp["whole_logits"] / temp["chunked"], 2), "max_rel_grad_diff": diff,
            "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in load_after]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["16x256x128x4096", "8x256x256x32768"],
                    help="rows x positions x width x vocabulary (the first: the main job's head)")
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per chunk")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    results = {s: run_shape(*map(int, s.split("x")), args.chunk, args.repeats) for s in args.shapes}
    print(json.dumps({"shapes": results, "chunk": args.chunk, "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
