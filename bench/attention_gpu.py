"""Attention on one NVIDIA GPU: our Pallas flash_attention vs jax's Pallas mha, cuDNN and XLA.

  python bench/attention_gpu.py              # full sweep (bf16, head dims 64/128, seq 512..16k, causal and not)
  python bench/attention_gpu.py --dry-run    # print the plan only
  python bench/attention_gpu.py --cpu-smoke  # tiny shapes, Pallas in interpret mode: proves the script on CPU

First it checks every implementation against a float32 reference on the device, then times the
forward and forward+backward passes (median of --iters runs after --warmup) on random data.
FLOPs follow the FlashAttention convention: 4 * B * S^2 * N * H for the forward, halved when causal;
the backward counts 2.5x the forward. Shapes keep B * S = 16k tokens and N * H = 2048, as in the
FlashAttention-2 paper. Any implementation may fail (cuDNN absent, XLA out of memory, ...): the
failure is reported and the sweep goes on. The last line printed is one JSON object of all figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference  # noqa: E402

IMPLS = ("ours", "jax_pallas_mha", "cudnn", "xla")


def attention_fn(impl: str, *, causal: bool, scale: float, interpret: bool, blocks: BlockSizes | None):
    """q [B,S,N,H], k/v [B,S,K,H] -> [B,S,N,H] for one implementation (same scale for all)."""
    if impl == "ours":
        return functools.partial(flash_attention, causal=causal, sm_scale=scale, block_sizes=blocks,
                                 interpret=interpret)
    if impl == "jax_pallas_mha":
        from jax.experimental.pallas.ops.gpu import attention as jax_attention

        def mha(q, k, v):  # no GQA in jax's kernel: repeat kv heads (counted in its time)
            g = q.shape[2] // k.shape[2]
            k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
            return jax_attention.mha(q, k, v, None, sm_scale=scale, causal=causal, interpret=interpret)
        return mha
    if impl in ("cudnn", "xla"):
        return functools.partial(jax.nn.dot_product_attention, scale=scale, is_causal=causal, implementation=impl)
    raise ValueError(impl)


def forward_flops(B, S, N, H, causal):
    return 4 * B * S * S * N * H / (2 if causal else 1)


def time_ms(fn, args, *, warmup: int, iters: int) -> float:
    """Median wall time of fn(*args) in milliseconds, after warm-up (which includes compilation)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def random_qkv(B, S, N, K, H, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, S, N, H), dtype)
    k = jax.random.normal(ks[1], (B, S, K, H), dtype)
    v = jax.random.normal(ks[2], (B, S, K, H), dtype)
    do = jax.random.normal(ks[3], (B, S, N, H), dtype)
    return q, k, v, do


def fwd_bwd(attn):
    """(q, k, v, do) -> (out, dq, dk, dv): one forward and one backward pass."""
    def run(q, k, v, do):
        out, vjp = jax.vjp(attn, q, k, v)
        return (out, *vjp(do))
    return jax.jit(run)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def check_correctness(args, dtype) -> dict:
    """Relative error of each implementation's out/dq/dk/dv against the float32 reference, per config."""
    report = {}
    B, S, N, K = args.check_shape
    for H in args.head_dims:
        for causal in (False, True):
            q, k, v, do = random_qkv(B, S, N, K, H, dtype, seed=1)
            up = [x.astype(jnp.float32) for x in (q, k, v, do)]
            ref = fwd_bwd(functools.partial(flash_attention_reference, causal=causal))(*up)
            for impl in args.impls:
                key = f"{impl}/H{H}/{'causal' if causal else 'full'}"
                try:
                    attn = attention_fn(impl, causal=causal, scale=H ** -0.5, interpret=args.interpret,
                                        blocks=args.blocks)
                    got = fwd_bwd(attn)(q, k, v, do)
                    errs = {name: rel_err(x, r) for name, x, r in zip(("out", "dq", "dk", "dv"), got, ref)}
                    report[key] = {"ok": max(errs.values()) <= args.tolerance, **errs}
                except Exception as e:  # a baseline may not exist here: report it and go on
                    report[key] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                print(f"check {key:28s} {report[key]}", flush=True)
    return report


def sweep(args, dtype) -> list[dict]:
    rows = []
    for H in args.head_dims:
        N = args.model_width // H
        K = N // args.group
        for causal in (False, True):
            for S in args.seqs:
                B = max(1, args.tokens // S)
                q, k, v, do = random_qkv(B, S, N, K, H, dtype)
                fwd_flops = forward_flops(B, S, N, H, causal)
                for impl in args.impls:
                    attn = attention_fn(impl, causal=causal, scale=H ** -0.5, interpret=args.interpret,
                                        blocks=args.blocks)
                    for mode, fn, fargs, flops in (("fwd", jax.jit(attn), (q, k, v), fwd_flops),
                                                   ("fwd_bwd", fwd_bwd(attn), (q, k, v, do), 3.5 * fwd_flops)):
                        row = dict(impl=impl, mode=mode, head_dim=H, seq=S, batch=B, heads=N, kv_heads=K,
                                   causal=causal)
                        try:
                            ms = time_ms(fn, fargs, warmup=args.warmup, iters=args.iters)
                            row.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 2))
                        except Exception as e:
                            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                        rows.append(row)
                        shown = f"{row['tflops']:8.2f} TFLOP/s {row['ms']:9.3f} ms" if "ms" in row else row["error"]
                        print(f"H={H:<4d} {'causal' if causal else 'full  '} S={S:<6d} B={B:<3d} {mode:8s} "
                              f"{impl:15s} {shown}", flush=True)
                del q, k, v, do
    return rows


def ratios(rows: list[dict], correctness: dict | None = None) -> list[dict]:
    """ours / baseline speed for every shape where both ran and both passed the correctness check.

    An implementation whose check failed (or crashed) for a head dim and mask gets no ratio there: a
    fast wrong answer is not a speed-up. Without a check (--skip-check) every timing counts.
    """
    def passed(impl, H, causal):
        entry = (correctness or {}).get(f"{impl}/H{H}/{'causal' if causal else 'full'}")
        return not correctness or "error" not in correctness and entry is not None and entry.get("ok", False)

    by_key = {}
    for r in rows:
        if "ms" in r and passed(r["impl"], r["head_dim"], r["causal"]):
            by_key[(r["head_dim"], r["causal"], r["seq"], r["mode"], r["impl"])] = r["ms"]
    out = []
    for (H, causal, S, mode, impl), ms in sorted(by_key.items()):
        if impl != "ours":
            continue
        entry = dict(head_dim=H, causal=causal, seq=S, mode=mode)
        for base in IMPLS[1:]:
            if (H, causal, S, mode, base) in by_key:
                entry[f"vs_{base}"] = round(by_key[(H, causal, S, mode, base)] / ms, 3)  # > 1: ours faster
        out.append(entry)
    return out


def print_ratio_table(table: list[dict]) -> None:
    print("\nspeed-up of ours (baseline time / our time; > 1 means ours is faster)")
    print(f"{'H':>4s} {'mask':6s} {'seq':>6s} {'mode':8s} " + " ".join(f"{b:>15s}" for b in IMPLS[1:]))
    for e in table:
        cells = " ".join(f"{e.get('vs_' + b, float('nan')):15.2f}" for b in IMPLS[1:])
        print(f"{e['head_dim']:4d} {'causal' if e['causal'] else 'full':6s} {e['seq']:6d} {e['mode']:8s} {cells}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--tokens", type=int, default=16384, help="batch * seq per shape")
    p.add_argument("--model-width", type=int, default=2048, help="heads * head_dim")
    p.add_argument("--group", type=int, default=1, help="query heads per kv head (1 = MHA, as jax's mha needs)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--tolerance", type=float, default=2e-2, help="bf16 relative error allowed in the check")
    p.add_argument("--check-shape", type=int, nargs=4, default=[2, 1024, 8, 2], metavar=("B", "S", "N", "K"),
                   help="GQA by default; jax's mha gets repeated K/V")
    p.add_argument("--block-sizes", type=int, nargs=6, default=None,
                   metavar=("BQ", "BK", "BQ_DKV", "BK_DKV", "BQ_DQ", "BK_DQ"), help="override our tiles")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, Pallas interpret mode (no GPU needed)")
    args = p.parse_args(argv)
    args.interpret = False
    if args.cpu_smoke:
        args.seqs, args.head_dims, args.tokens, args.model_width = [128], [64], 128, 128
        args.warmup, args.iters, args.check_shape, args.interpret = 1, 2, [1, 128, 2, 2], True
    args.blocks = BlockSizes(*args.block_sizes) if args.block_sizes else None
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = str(jax.devices()[0].device_kind)
    plan = dict(device=device, seqs=args.seqs, head_dims=args.head_dims, impls=args.impls, tokens=args.tokens,
                model_width=args.model_width, group=args.group, warmup=args.warmup, iters=args.iters,
                interpret=args.interpret)
    print(f"plan: {plan}", flush=True)
    if args.interpret:
        print("note: interpret mode times the Pallas interpreter, not the kernels; only the plumbing is real")
    if args.dry_run:
        result = {"plan": plan, "dry_run": True}
        print(json.dumps(result))
        return result
    if jax.default_backend() != "gpu" and not args.cpu_smoke:
        print("no GPU: run on an NVIDIA GPU, or use --cpu-smoke / --dry-run here", file=sys.stderr)
        sys.exit(2)
    dtype = jnp.bfloat16
    try:
        correctness = {} if args.skip_check else check_correctness(args, dtype)
    except Exception:
        traceback.print_exc()
        correctness = {"error": "correctness check crashed"}
    rows = sweep(args, dtype)
    table = ratios(rows, correctness)
    print_ratio_table(table)
    result = {"plan": plan, "correctness": correctness, "results": rows, "ratios": table}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
