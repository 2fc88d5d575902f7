"""Quantized decoding against the memory roofline: fp32 vs int8 vs int4 tokens/s through Engine + generate.

  python bench/quant_decode.py            # GPT-2 shape: 6 layers, width 768, 50257 tokens; 128 new after 32
  python bench/quant_decode.py --quick    # a small smoke run of the same code

One GPT-2-shaped model (random weights from transformers' GPT2LMHeadModel, loaded with load_hf) is
decoded greedily at batch 1 and 8 as fp32, int8 (jaxformer.infer.quantize) and int4 (group size 64),
all in this process, each side timed --repeats times, interleaved so that a busy moment of the
machine falls on every side; tokens/s is the median run. Decoding reads every weight once per step,
so the roofline is (bytes a step reads) / (memory bandwidth): bandwidth is measured here too,
interleaved with the runs (numpy's single-thread sum over 512 MB, and XLA's over the same array;
the larger is the roof). Weight bytes per step count the token table once (GPT-2 ties it to the
LM head) and one row of the position table. The HLO of each decode step is summarised
(jaxformer.infer.quant.hlo_weight_reads): fused dots reading int8/uint8 weights vs materialised float
copies. The last line printed is one JSON object (int8_speedup_b1, int4_speedup_b1,
int8_roofline_fraction_b1, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_throughput import gpt2_shaped, jaxformer_runner  # noqa: E402  (the same model and timed engine)

MODES = ("fp32", "int8", "int4")


def bandwidth_probe(nbytes: int):
    """() -> {"numpy": GB/s, "xla": GB/s}: one pass reading an array of nbytes (numpy sum; jitted jnp.sum)."""
    import jax
    import jax.numpy as jnp

    host = np.ones(nbytes // 4, np.float32)
    dev = jnp.asarray(host)
    total = jax.jit(jnp.sum)
    total(dev).block_until_ready()

    def probe():
        out = {}
        start = time.perf_counter()
        host.sum()
        out["numpy"] = nbytes / (time.perf_counter() - start) / 1e9
        start = time.perf_counter()
        total(dev).block_until_ready()
        out["xla"] = nbytes / (time.perf_counter() - start) / 1e9
        return out

    return probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--group-size", type=int, default=64, help="int4 group size")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.width, args.vocab, args.new_tokens, args.repeats = 2, 128, 1000, 8, 1

    import jax

    from jaxformer.infer.quant import decode_bytes_per_token, hlo_weight_reads, quantize

    print(f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    results: dict = {"config": {k: getattr(args, k) for k in ("layers", "width", "vocab", "prompt_len", "new_tokens",
                                                              "group_size", "repeats")}}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = gpt2_shaped(args, Path(tmp))[1]
    models = {"fp32": fp32, "int8": quantize(fp32, 8), "int4": quantize(fp32, 4, args.group_size)}
    step_bytes = {m: decode_bytes_per_token(model) for m, model in models.items()}
    results["weight_bytes_per_step"] = step_bytes
    probe = bandwidth_probe(64 << 20 if args.quick else 512 << 20)
    bandwidth: dict = {"numpy": [], "xla": []}
    rng = np.random.default_rng(0)
    for B in args.batches:
        prompts = rng.integers(1, args.vocab, (B, args.prompt_len))
        runs, engines = {}, {}
        for m, model in models.items():
            runs[m], engines[m] = jaxformer_runner(model, prompts, args.new_tokens)
        rates, outputs = {m: [] for m in MODES}, {}
        for _ in range(args.repeats):
            for m in MODES:
                seconds, outputs[m] = runs[m]()
                rates[m].append(B * args.new_tokens / seconds)
            for k, v in probe().items():
                bandwidth[k].append(v)
        roof = max(statistics.median(v) for v in bandwidth.values()) * 1e9  # bytes/s
        row = {}
        for m in MODES:
            tok_s = statistics.median(rates[m])
            steps_s = tok_s / B
            row[m] = {"tok_s": tok_s, "min": min(rates[m]), "max": max(rates[m]),
                      "bytes_per_token": step_bytes[m] / B,
                      "roofline_fraction": step_bytes[m] * steps_s / roof,
                      "roofline_tok_s": roof / step_bytes[m] * B,
                      "same_tokens_as_fp32": float((outputs[m] == outputs["fp32"]).mean())}
            if m != "fp32":
                row[m]["hlo"] = hlo_weight_reads(engines[m].decode_hlo(), models[m])
        results[f"batch_{B}"] = row
        for m in MODES:
            r = row[m]
            print(f"batch {B} {m}: {r['tok_s']:7.1f} tok/s [{r['min']:.1f}-{r['max']:.1f}]  "
                  f"x{r['tok_s'] / row['fp32']['tok_s']:.2f} vs fp32  {r['bytes_per_token'] / 1e6:6.1f} MB/token  "
                  f"{100 * r['roofline_fraction']:5.1f}% of the roofline ({r['roofline_tok_s']:.0f} tok/s)  "
                  f"same greedy tokens as fp32: {r['same_tokens_as_fp32']:.3f}" + (f"  HLO {r['hlo']}" if "hlo" in r else ""))
        del runs, engines
    results["bandwidth_gb_s"] = {k: statistics.median(v) for k, v in bandwidth.items()}
    print(f"memory bandwidth (GB/s, median): {results['bandwidth_gb_s']}")
    for B in args.batches:
        row = results[f"batch_{B}"]
        for m in ("int8", "int4"):
            results[f"{m}_speedup_b{B}"] = row[m]["tok_s"] / row["fp32"]["tok_s"]
            results[f"{m}_roofline_fraction_b{B}"] = row[m]["roofline_fraction"]
        results[f"fp32_roofline_fraction_b{B}"] = row["fp32"]["roofline_fraction"]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
