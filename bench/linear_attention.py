"""The gated delta rule, chunked (models/gated_delta.py) vs its token scan vs causal softmax attention (xla), on CPU.

  python bench/linear_attention.py            # T = 1k, 4k, 16k; batch 1, heads 4, Dk = Dv = 128
  python bench/linear_attention.py --quick    # T = 256, 512, small heads: proves the script runs

Each mixer's jitted forward+backward (grads of a random projection of its output w.r.t. all inputs) is compiled,
warmed up, then timed --reps times; reported: median seconds, tokens/s, the ratio of each to the chunked form, and
where softmax attention's time line crosses the chunked form's (log-log interpolation between measured lengths).
A case whose estimated working set exceeds --max-gib is skipped and named so. Then, for a hybrid preset (--preset,
default the Qwen3.5 ones in configs/), a sequence's decode state: every layer's recurrent state (fixed size) against
the key/value cache its attention layers fill at --context tokens, and against a model of attention layers only.
The load average is printed before and after, since the machine may be shared. The last line printed is one JSON
object.
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


def crossing(results: list[dict], a: str = "softmax_xla", b: str = "chunked") -> float | None:
    """The length where mixer a's time first exceeds b's, by log-log interpolation between measured lengths."""
    pts = [(r["T"], r[a]["seconds"], r[b]["seconds"]) for r in results if "seconds" in r[a] and "seconds" in r[b]]
    for (t0, a0, b0), (t1, a1, b1) in zip(pts, pts[1:]):
        d0, d1 = np.log(a0 / b0), np.log(a1 / b1)
        if d0 <= 0 < d1:
            return float(np.exp(np.log(t0) + (np.log(t1) - np.log(t0)) * -d0 / (d1 - d0)))
    return None


def decode_state_bytes(preset: str, context: int) -> dict:
    """A sequence's decode memory for a hybrid preset (bf16 caches, the recurrent matrices float32): its layers'
    states, its attention layers' keys/values at `context` tokens, and all-attention layers' at the same shapes."""
    from jaxformer.config import load_model_config
    from jaxformer.models.cache import layer_states

    cfg = load_model_config(preset)
    states = jax.eval_shape(lambda: layer_states(cfg.replace(compute_dtype="bfloat16"), 1))
    state = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(states))
    kv = context * cfg.kv_bytes_per_token(2)
    dense = context * 2 * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim  # every layer full attention
    return {"preset": preset, "context": context, "state_bytes": state, "kv_bytes": kv, "total_bytes": state + kv,
            "all_attention_kv_bytes": dense, "ratio_vs_all_attention": round(dense / (state + kv), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-gib", type=float, default=4.0)
    ap.add_argument("--preset", nargs="*", default=None, help="hybrid presets for decode-state bytes (default: "
                    "configs/qwen3.5-*.yaml and qwen3-next-*.yaml)")
    ap.add_argument("--context", type=int, default=32768)
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
    cross = crossing(results)
    print(f"softmax attention becomes slower than the chunked rule at T ~ {cross:.0f}" if cross else
          "softmax attention and the chunked rule do not cross within the measured lengths", flush=True)
    configs = Path(__file__).resolve().parent.parent / "configs"
    presets = a.preset if a.preset is not None else sorted(
        p.stem for pattern in ("qwen3.5-*.yaml", "qwen3-next-*.yaml") for p in configs.glob(pattern))
    states = [decode_state_bytes(p, a.context) for p in presets]
    for d in states:
        print(f"{d['preset']}: decode state {d['state_bytes'] / 2**20:.1f} MiB + KV cache {d['kv_bytes'] / 2**20:.1f} "
              f"MiB at {d['context']} tokens = {d['total_bytes'] / 2**20:.1f} MiB per sequence; all-attention "
              f"layers would hold {d['all_attention_kv_bytes'] / 2**20:.1f} MiB ({d['ratio_vs_all_attention']}x)",
              flush=True)
    print(json.dumps({"batch": B, "heads": a.heads, "head_dim": a.head_dim, "chunk_size": a.chunk_size,
                      "device": str(jax.devices()[0]), "load_after": load_after, "results": results,
                      "softmax_slower_from_T": cross, "decode_state": states}))


if __name__ == "__main__":
    main()
