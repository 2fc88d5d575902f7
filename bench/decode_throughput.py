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
Each side is timed --repeats times (at least 5), interleaved so that a busy moment of the machine
falls on both; tokens/s is the median run, the spread is the (min, max) over the runs, and the ratios
are of medians. The last line printed is one JSON object with tokens/s, spreads and the ratios.
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


def gpt2_shaped(args, tmp: Path):
    """(transformers' random-init GPT-2 of args' shape, the same weights through jaxformer's importer)."""
    import torch
    import transformers

    from jaxformer.interop import load_hf

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.width, n_layer=args.layers,
                                     n_head=args.width // 64, n_positions=1024, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp / "hf")
    return hf, load_hf(tmp / "hf")


def build_models(args, tmp: Path):
    """transformers, jaxformer and torch_ref with the same weights."""
    from jaxformer.interop import to_torch

    hf, ours = gpt2_shaped(args, tmp)
    return hf, ours, to_torch(ours)


def jaxformer_runner(model, prompts: np.ndarray, new: int):
    """A timed run of the engine (compiled and warmed up here): () -> (seconds, tokens [B, new]); and the engine."""
    from jaxformer.infer import Engine, SamplingParams, generate

    B, P = prompts.shape
    engine = Engine(model, max_batch=B, max_len=P + new)
    params = SamplingParams(temperature=0.0, max_new_tokens=new)
    generate(engine, [list(p) for p in prompts], params)  # compile + warm-up

    def run():
        start = time.perf_counter()
        seqs = generate(engine, [list(p) for p in prompts], params)
        return time.perf_counter() - start, np.array([s.tokens for s in seqs])

    return run, engine


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


def hf_runner(hf, prompts: np.ndarray, new: int):
    """A timed run of transformers' generate (KV cache): () -> (seconds, tokens); and the torch threads chosen."""
    import torch

    ids = torch.as_tensor(prompts, dtype=torch.long)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True, pad_token_id=0,
              eos_token_id=None, max_new_tokens=new, min_new_tokens=new)
    with torch.inference_mode():
        threads = best_torch_threads(lambda: hf.generate(ids, **{**kw, "max_new_tokens": 16, "min_new_tokens": 16}))

    def run():
        with torch.inference_mode():
            start = time.perf_counter()
            out = hf.generate(ids, **kw)
            return time.perf_counter() - start, out[:, ids.shape[1]:].numpy()

    return run, threads


def torch_ref_runner(module, prompts: np.ndarray, new: int):
    """A timed run of torch_ref with no cache (the whole sequence again every step): () -> (seconds, None)."""
    import torch

    ids0 = torch.as_tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
        best_torch_threads(lambda: module(ids0))

    def run():
        ids = ids0
        with torch.inference_mode():
            start = time.perf_counter()
            for _ in range(new):
                nxt = module(ids)[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
            return time.perf_counter() - start, None

    return run


def timed(runners: dict, tokens: dict, repeats: int) -> tuple[dict, dict]:
    """Interleaved repeats of every runner: ({name: [tokens/s per run]}, {name: last tokens})."""
    rates, outputs = {n: [] for n in runners}, {}
    for _ in range(repeats):
        for name, run in runners.items():
            seconds, out = run()
            rates[name].append(tokens[name] / seconds)
            outputs[name] = out
    return rates, outputs


def summary(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": len(rates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--ref-new-tokens", type=int, default=32, help="tokens torch_ref (uncached) decodes")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side (at least 5)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be at least 5: one run is noise on a shared machine")
    if args.quick:
        args.layers, args.width, args.vocab, args.new_tokens, args.ref_new_tokens = 2, 128, 1000, 16, 4

    import jax
    import torch

    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    results: dict = {"config": {k: getattr(args, k) for k in ("layers", "width", "vocab", "prompt_len", "new_tokens",
                                                              "ref_new_tokens", "repeats")}}
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours, ref = build_models(args, Path(tmp))
        rng = np.random.default_rng(0)
        for B in args.batches:
            prompts = rng.integers(1, args.vocab, (B, args.prompt_len))
            hf_run, hf_threads = hf_runner(hf, prompts, args.new_tokens)
            runners = {"jaxformer": jaxformer_runner(ours, prompts, args.new_tokens)[0], "hf": hf_run,
                       "torch_ref": torch_ref_runner(ref, prompts, args.ref_new_tokens)}
            tokens = {"jaxformer": B * args.new_tokens, "hf": B * args.new_tokens,
                      "torch_ref": B * args.ref_new_tokens}
            rates, outputs = timed(runners, tokens, args.repeats)
            s = {name: summary(r) for name, r in rates.items()}
            agree = float((outputs["jaxformer"] == outputs["hf"]).mean())
            row = {"jaxformer_tok_s": s["jaxformer"]["median"], "hf_tok_s": s["hf"]["median"],
                   "torch_ref_tok_s": s["torch_ref"]["median"], "spread": s,
                   "ratio_vs_hf": s["jaxformer"]["median"] / s["hf"]["median"],
                   "ratio_vs_torch_ref": s["jaxformer"]["median"] / s["torch_ref"]["median"],
                   "token_agreement_with_hf": agree, "hf_torch_threads": hf_threads}
            results[f"batch_{B}"] = row
            show = lambda n: f"{s[n]['median']:8.1f} tok/s [{s[n]['min']:.1f}-{s[n]['max']:.1f}]"  # noqa: E731
            print(f"batch {B} (median of {args.repeats} [min-max]): jaxformer {show('jaxformer')} | HF generate "
                  f"{show('hf')} ({hf_threads} torch threads) (x{row['ratio_vs_hf']:.2f}) | torch_ref uncached "
                  f"{show('torch_ref')} (x{row['ratio_vs_torch_ref']:.2f}) | same tokens as HF: {agree:.3f}")
    for B in args.batches:
        results[f"ratio_vs_hf_b{B}"] = results[f"batch_{B}"]["ratio_vs_hf"]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
