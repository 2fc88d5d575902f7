"""Greedy decode throughput: jaxformer's KV-cache engine vs Hugging Face `generate` (KV cache) vs torch_ref.

  python bench/decode_throughput.py                 # GPT-2 style, 6 layers, width 384, 256 new tokens
  python bench/decode_throughput.py --quick         # a small smoke run of the same code

One GPT-2-style model (6 layers, d_model 384, 6 heads, GPT-2's 50257-token vocabulary, random
weights from a fixed seed) is built in transformers, saved, and loaded into jaxformer (its
Hugging Face importer) and torch_ref (jaxformer's weights), so all three run the same weights.
Each decodes greedily `--new-tokens` tokens after a `--prompt-len`-token prompt, at batch 1 and 8,
all float32 on CPU. jaxformer and Hugging Face should produce the same tokens (reported). torch
runs with whichever thread count (1 or all cores) is faster at that moment. torch_ref
has no cache: it re-runs the full forward every step (quadratic), so by default it decodes fewer
tokens (--ref-new-tokens), which flatters it. Timings exclude compilation / first-call warm-up.
The last line printed is one JSON object with tokens/s and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def build_models(args, tmp: Path):
    import torch
    import transformers

    from jaxformer.interop import load_hf, to_torch

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.width, n_layer=args.layers,
                                     n_head=args.width // 64, n_positions=1024, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp / "hf")
    ours = load_hf(tmp / "hf")
    return hf, ours, to_torch(ours)


def bench_jaxformer(model, prompts: np.ndarray, new: int) -> tuple[float, np.ndarray]:
    from jaxformer.infer import Engine, SamplingParams, generate

    B, P = prompts.shape
    engine = Engine(model, max_batch=B, max_len=P + new)
    params = SamplingParams(temperature=0.0, max_new_tokens=new)
    generate(engine, [list(p) for p in prompts], params)  # compile + warm-up
    start = time.perf_counter()
    seqs = generate(engine, [list(p) for p in prompts], params)
    seconds = time.perf_counter() - start
    return B * new / seconds, np.array([s.tokens for s in seqs])


def best_torch_threads(run) -> int:
    """torch's fastest intra-op thread count here (OpenMP threads that spin can lose badly on a busy machine)."""
    import torch

    timings = {}
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        run()  # warm-up
        start = time.perf_counter()
        run()
        timings[n] = time.perf_counter() - start
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best


def bench_hf(hf, prompts: np.ndarray, new: int) -> tuple[float, np.ndarray, int]:
    import torch

    ids = torch.as_tensor(prompts, dtype=torch.long)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True, pad_token_id=0,
              eos_token_id=None, max_new_tokens=new, min_new_tokens=new)
    with torch.inference_mode():
        threads = best_torch_threads(lambda: hf.generate(ids, **{**kw, "max_new_tokens": 16, "min_new_tokens": 16}))
        start = time.perf_counter()
        out = hf.generate(ids, **kw)
        seconds = time.perf_counter() - start
    return ids.shape[0] * new / seconds, out[:, ids.shape[1]:].numpy(), threads


def bench_torch_ref(module, prompts: np.ndarray, new: int) -> float:
    import torch

    ids = torch.as_tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
        best_torch_threads(lambda: module(ids))
        start = time.perf_counter()
        for _ in range(new):  # no cache: the whole sequence again every step
            nxt = module(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        seconds = time.perf_counter() - start
    return prompts.shape[0] * new / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--ref-new-tokens", type=int, default=32, help="tokens torch_ref (uncached) decodes")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.width, args.vocab, args.new_tokens, args.ref_new_tokens = 2, 128, 1000, 16, 4

    import jax
    import torch

    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    results: dict = {"config": {k: getattr(args, k) for k in ("layers", "width", "vocab", "prompt_len", "new_tokens",
                                                              "ref_new_tokens")}}
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours, ref = build_models(args, Path(tmp))
        rng = np.random.default_rng(0)
        for B in args.batches:
            prompts = rng.integers(1, args.vocab, (B, args.prompt_len))
            ours_tps, ours_tokens = bench_jaxformer(ours, prompts, args.new_tokens)
            hf_tps, hf_tokens, hf_threads = bench_hf(hf, prompts, args.new_tokens)
            ref_tps = bench_torch_ref(ref, prompts, args.ref_new_tokens)
            agree = float((ours_tokens == hf_tokens).mean())
            row = {"jaxformer_tok_s": ours_tps, "hf_tok_s": hf_tps, "torch_ref_tok_s": ref_tps,
                   "ratio_vs_hf": ours_tps / hf_tps, "ratio_vs_torch_ref": ours_tps / ref_tps,
                   "token_agreement_with_hf": agree, "hf_torch_threads": hf_threads}
            results[f"batch_{B}"] = row
            print(f"batch {B}: jaxformer {ours_tps:8.1f} tok/s | HF generate {hf_tps:8.1f} tok/s "
                  f"({hf_threads} torch threads) "
                  f"(x{ours_tps / hf_tps:.2f}) | torch_ref uncached {ref_tps:8.1f} tok/s (x{ours_tps / ref_tps:.2f}) "
                  f"| same tokens as HF: {agree:.3f}")
    for B in args.batches:
        results[f"ratio_vs_hf_b{B}"] = results[f"batch_{B}"]["ratio_vs_hf"]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
