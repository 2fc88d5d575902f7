"""The gated delta rule, chunked (models/gated_delta.py) vs its token scan vs causal softmax attention (xla), on CPU.

  python bench/linear_attention.py            # T = 1k, 4k, 16k; batch 1, heads 4, Dk = Dv = 128
  python bench/linear_attention.py --quick    # T = 256, 512, small heads: proves the script runs

Each mixer's jitted forward+backward (grads of a random projection of its output w.r.t. all inputs) is compiled,
warmed up, then timed --reps times; reported: median seconds, tokens/s, and the ratio of each to the chunked form.
A case whose estimated working set exceeds --max-gib is skipped and named so. The load average is printed before
and after, since the machine may be shared. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from jaxformer.models.attention import attend  # noqa: E402
from jaxformer.models.gated_delta import gated_delta_chunked, gated_delta_recurrent  # noqa: E402


def inputs(B, T, H, D, seed=0):
    """q, k (l2-normalised), v [B,T,H,D], g = -softplus, beta = sigmoid [B,T,H], and an output projection."""
    r = np.random.default_rng(seed)
    q, k, v, proj = (r.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(4))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    g = (-np.logaddexp(0.0, r.standard_normal((B, T, H)))).astype(np.float32)
    beta = (1 / (1 + np.exp(-r.standard_normal((B, T, H))))).astype(np.float32)
    return (q, k, v, g, beta), proj


def mixers(chunk_size):
    """name -> f(q, k, v, g, beta) -> out [B,T,H,D]; softmax attention ignores g and beta."""
    return {
        "chunked": lambda q, k, v, g, b: gated_delta_chunked(q, k, v, g, b, chunk_size=chunk_size)[0],
        "recurrent": lambda q, k, v, g, b: gated_delta_recurrent(q, k, v, g, b)[0],
        "softmax_xla": lambda q, k, v, g, b: attend(q, k, v, causal=True, impl="xla"),
    }


def est_gib(name, B, T, H, D, chunk_size):
    """Rough working set of forward+backward: scan residuals, score matrices, or chunk matrices."""
    per = {"recurrent": 2 * T * D * D, "softmax_xla": 3 * T * T, "chunked": 6 * T * (chunk_size + 2 * D)}[name]
    return B * H * per * 4 / 2 ** 30


def time_one(fn, args, proj, reps):
    loss = lambda *a: jnp.sum(fn(*a) * proj)
    step = jax.jit(jax.grad(loss, argnums=range(5)))
    jax.block_until_ready(step(*args))  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-gib", type=float, default=4.0)
    a = ap.parse_args()
    if a.quick:
        a.lengths, a.heads, a.head_dim, a.reps = [256, 512], 2, 32, 2
    B = 1
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = []
    for T in a.lengths:
        (args, proj), row = inputs(B, T, a.heads, a.head_dim), {"T": T}
        for name, fn in mixers(a.chunk_size).items():
            gib = est_gib(name, B, T, a.heads, a.head_dim, a.chunk_size)
            if gib > a.max_gib:
                row[name] = {"skipped": f"estimated {gib:.1f} GiB > --max-gib {a.max_gib}"}
                print(f"T={T:6d} {name:12s} skipped (estimated {gib:.1f} GiB)", flush=True)
                continue
            s = time_one(fn, args, proj, a.reps)
            row[name] = {"seconds": s, "tokens_per_s": B * T / s}
            print(f"T={T:6d} {name:12s} {s:9.4f} s  {B * T / s:12.0f} tok/s (fwd+bwd)", flush=True)
        base = row["chunked"].get("seconds")
        for name in ("recurrent", "softmax_xla"):
            if base and "seconds" in row[name]:
                row[name]["vs_chunked"] = row[name]["seconds"] / base
                print(f"T={T:6d} {name} / chunked time: {row[name]['vs_chunked']:.2f}x", flush=True)
        results.append(row)
    load_after = os.getloadavg()
    print(f"load average after: {load_after}", flush=True)
    print(json.dumps({"batch": B, "heads": a.heads, "head_dim": a.head_dim, "chunk_size": a.chunk_size,
                      "device": str(jax.devices()[0]), "load_after": load_after, "results": results}))


if __name__ == "__main__":
    main()
