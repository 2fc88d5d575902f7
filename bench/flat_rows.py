"""A projection's weight gradient on XLA:CPU: x [B, T, in] @ W^T as one three-axis einsum vs on flat rows
[B*T, in] (jaxformer.models.layers.project, what Linear, the tied output projection and LoRA use).

Timed: the forward + backward (gradients of every weight and of x) of a SwiGLU MLP (loss: sum(y * g), g random) and
of an LM head (d_model -> vocab) under the cross-entropy of random targets, as training runs it; each form in this
process, repeats interleaved, medians; the load average printed before and after. Both forms
give the same numbers (compared first); the difference is how XLA:CPU lays out the three-axis backward: its weight
gradient contracts (B, T), which it runs through a transposing copy of the activation gradient.

    python bench/flat_rows.py [--batch 8] [--seq 256] [--d-model 256] [--d-ff 1024] [--vocab 4096]

The last line is one JSON object.
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

from jaxformer.models.layers import project


def three_axis(x, w):  # how Linear computed it before: [B, T, in] x [out, in] -> [B, T, out]
    return jnp.einsum("bti,oi->bto", x, w)


def mlp(proj):
    def f(ws, x):
        wg, wu, wd = ws
        return proj(jax.nn.silu(proj(x, wg)) * proj(x, wu), wd)
    return f


def head(proj):
    return lambda ws, x: proj(x, ws[0])


def weighted_sum(y, g):
    return jnp.sum(y * g)


def cross_entropy(logits, targets):
    return jnp.sum(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])


def runner(fn, loss, ws, x, target):
    step = jax.jit(jax.grad(lambda ws, x: loss(fn(ws, x), target), argnums=(0, 1)))
    grads = step(ws, x)

    def run():
        jax.block_until_ready(step(ws, x))

    return run, grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    B, T, D, F, V = args.batch, args.seq, args.d_model, args.d_ff, args.vocab
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    cases = {"swiglu_mlp": (mlp, [(F, D), (F, D), (D, F)], weighted_sum, g),
             "lm_head_cross_entropy": (head, [(V, D)], cross_entropy, targets)}
    results = {}
    for case, (build, shapes, loss, target) in cases.items():
        ws = tuple(jnp.asarray(0.05 * rng.standard_normal(s), jnp.float32) for s in shapes)
        runs, grads = {}, {}
        for form, proj in (("three_axis_einsum", three_axis), ("flat_rows", project)):
            runs[form], grads[form] = runner(build(proj), loss, ws, x, target)
        a, b = (jax.tree.leaves(g) for g in grads.values())
        diff = max(float(jnp.abs(p - q).max() / jnp.abs(q).max()) for p, q in zip(a, b))
        for run in runs.values():
            run()
        times = {form: [] for form in runs}
        load_before = os.getloadavg()
        for _ in range(args.repeats):
            for form, run in runs.items():
                t = time.perf_counter()
                run()
                times[form].append(time.perf_counter() - t)
        load_after = os.getloadavg()
        ms = {form: 1e3 * statistics.median(ts) for form, ts in times.items()}
        speedup = ms["three_axis_einsum"] / ms["flat_rows"]
        print(f"{case} (B {B}, T {T}, D {D}, {'F ' + str(F) if case == 'swiglu_mlp' else 'vocab ' + str(V)}), "
              f"forward + backward: three-axis einsum {ms['three_axis_einsum']:.1f} ms, flat rows "
              f"{ms['flat_rows']:.1f} ms: x{speedup:.2f}; gradients agree to {diff:.1e} x max; load {load_before} -> "
              f"{load_after}")
        results[case] = {"ms": {f: round(v, 2) for f, v in ms.items()}, "speedup": round(speedup, 3),
                         "max_rel_diff": diff, "loadavg_before": [round(v, 2) for v in load_before],
                         "loadavg_after": [round(v, 2) for v in load_after]}
    print(json.dumps({"cases": results, "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
