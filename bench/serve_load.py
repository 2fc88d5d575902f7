"""Serving under load: the dense engine against the paged engine with prefix caching, and speculative decoding.

Part 1, same process, same model (random weights: speed does not depend on them; Llama-style, width 256, 4
layers, 4096-token vocabulary, 1280-token context): 32 requests arrive at once, each a shared 1024-token system
prompt plus 32 tokens of its own, 32 new tokens each, greedy, 8 rows. Reported per engine: tokens/s (generated
tokens over the wall time until the last finishes), time to first token p50 / p99 (from arrival), and KV memory
reserved vs at its peak in use. Both engines' outputs are checked equal.

Part 2: prompt-lookup speculation at batch 1 on code-editing prompts (a standard-library function, then a
request to repeat it with a name changed: the output mostly repeats the input), with the README's trained model
(runs/tiny_code/model, from `make train`): tokens/s with and without `--speculate ngram`, acceptance, and the
greedy outputs checked identical.

    python bench/serve_load.py [--ckpt runs/tiny_code/model] [--requests 32] [--draft-tokens 4]

Prints the load average before and after; the last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import sysconfig
import time
from pathlib import Path

import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.infer import Engine, SamplingParams, generate, load_model, load_tokenizer_for
from jaxformer.infer.generate import Sequence, batcher_for
from jaxformer.infer.paged_engine import PagedEngine
from jaxformer.infer.speculative import NgramDrafter
from jaxformer.models import DecoderLM

LOAD_MODEL = ModelConfig.llama(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=688,
                               max_seq_len=1280, init_std=0.1)


def run_load(engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """All prompts arrive at t=0; continuous batching until every one finishes. TTFT per request, throughput."""
    batcher = batcher_for(engine)
    seqs = [Sequence(p, params, max_len=engine.max_len) for p in prompts]
    waiting, first = collections.deque(seqs), {}
    peak = 0
    t0 = time.perf_counter()
    while waiting or batcher.active:
        while waiting and batcher.free_slots():
            batcher.add(waiting.popleft())
            if id(batcher.active[-1]) not in first and batcher.active[-1].tokens:
                first[id(batcher.active[-1])] = time.perf_counter() - t0
        batcher.step()
        now = time.perf_counter() - t0
        for s in seqs:
            if s.tokens and id(s) not in first:
                first[id(s)] = now
        if hasattr(engine, "pool"):
            peak = max(peak, engine.used_bytes())
    wall = time.perf_counter() - t0
    ttft = np.array([first[id(s)] for s in seqs])
    generated = sum(len(s.tokens) for s in seqs)
    reserved = engine.cache_bytes()
    return {"tokens_per_s": round(generated / wall, 1), "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
            "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3), "wall_s": round(wall, 2),
            "kv_reserved_mb": round(reserved / 2**20, 1),
            "kv_peak_used_mb": round((peak if hasattr(engine, "pool") else reserved) / 2**20, 1),
            "tokens": [s.tokens for s in seqs]}


def part_load(n_requests: int) -> dict:
    model = DecoderLM(LOAD_MODEL, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    system = list(rng.integers(0, LOAD_MODEL.vocab_size, 1024))
    prompts = [system + list(rng.integers(0, LOAD_MODEL.vocab_size, 32)) for _ in range(n_requests)]
    params = SamplingParams(temperature=0.0, max_new_tokens=32)
    out = {}
    for name, make in (("dense", lambda: Engine(model, max_batch=8)),
                       ("paged_prefix", lambda: PagedEngine(model, max_batch=8, page_size=16))):
        engine = make()
        engine.warmup()
        generate(engine, [prompts[0][:40]], params)  # compile the buckets this run uses, outside the timing
        generate(engine, [prompts[0][:100]], params)
        if hasattr(engine, "pool"):
            engine.reset()
        out[name] = run_load(engine, prompts, params)
        print(f"{name:13s} {out[name]['tokens_per_s']:8.1f} tok/s  TTFT p50 {out[name]['ttft_p50_s']:.2f} s  "
              f"p99 {out[name]['ttft_p99_s']:.2f} s  KV reserved {out[name]['kv_reserved_mb']} MB, peak used "
              f"{out[name]['kv_peak_used_mb']} MB", flush=True)
    assert out["dense"]["tokens"] == out["paged_prefix"]["tokens"], "the engines disagree"
    for r in out.values():
        del r["tokens"]
    return out


def code_edit_prompts(tok, n: int, max_tokens: int) -> list[list[int]]:
    """Standard-library functions of 30-90 tokens, each followed by a request to repeat it with a name changed."""
    src_dir = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for path in sorted(src_dir.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                fn = ast.get_source_segment(source, node)
                if fn and 30 <= len(tok.encode(fn)) <= 90:
                    head = fn.splitlines()[0].replace(node.name, node.name + "_v2", 1)
                    text = f"{fn}\n\n\n# the same function, renamed to {node.name}_v2\n{head}\n"
                    ids = tok.encode_prompt(text)
                    if len(ids) + max_tokens < 256:
                        prompts.append(ids)
                if len(prompts) == n:
                    return prompts
    return prompts


def part_speculative(ckpt: str, k: int) -> dict:
    tok, model = load_tokenizer_for(ckpt), load_model(ckpt)
    new = 64
    prompts = code_edit_prompts(tok, 12, new)
    params = SamplingParams(temperature=0.0, max_new_tokens=new)
    out = {"drafted": 0, "accepted": 0, "verify_steps": 0}

    def one_by_one(engine, kw, count: bool) -> tuple[int, list]:
        n, seqs = 0, []
        for p in prompts:
            batcher = batcher_for(engine, **kw)
            seq = Sequence(p, params, max_len=engine.max_len, stop_ids=tok.eos_ids)
            batcher.add(seq)
            while batcher.active:
                batcher.step()
            n += len(seq.tokens)
            seqs.append(seq.tokens)
            if count and kw:
                out["drafted"] += batcher.stats()["spec_drafted"]
                out["accepted"] += batcher.stats()["spec_accepted"]
                out["verify_steps"] += batcher.stats()["spec_verify_steps"]
        return n, seqs

    for name, kw in (("plain", {}), ("ngram", {"drafter": NgramDrafter(k)})):
        engine = PagedEngine(model, max_batch=1, page_size=16, prefix_cache=False)
        one_by_one(engine, kw, count=False)  # every prefill bucket and step compiled before the clock starts
        t0 = time.perf_counter()
        n, seqs = one_by_one(engine, kw, count=True)
        out[f"{name}_tokens_per_s"] = round(n / (time.perf_counter() - t0), 1)
        out[f"{name}_tokens"] = seqs
    assert out["plain_tokens"] == out["ngram_tokens"], "speculation changed the greedy output"
    out["identical"] = True
    out["acceptance"] = round(out["accepted"] / max(out["drafted"], 1), 3)
    out["speedup"] = round(out["ngram_tokens_per_s"] / out["plain_tokens_per_s"], 2)
    out["tokens_per_verify_step"] = round((out["accepted"] + out["verify_steps"]) / max(out["verify_steps"], 1), 2)
    out.update(step_ms(model, k))  # why: what one verify call costs against one decode step on this machine
    out["prompts"] = len(prompts)
    del out["plain_tokens"], out["ngram_tokens"]
    print(f"speculative (ngram, k={k}) at batch 1: {out['plain_tokens_per_s']} -> {out['ngram_tokens_per_s']} tok/s "
          f"({out['speedup']}x), acceptance {out['acceptance']}, {out['tokens_per_verify_step']} tokens per verify "
          f"step; decode step {out['decode_step_ms']} ms, verify step {out['verify_step_ms']} ms", flush=True)
    return out


def step_ms(model, k: int) -> dict:
    """Milliseconds of one decode step and one verify step (1 + k tokens) at batch 1, 120 tokens in the cache."""
    engine = PagedEngine(model, max_batch=1, page_size=16, prefix_cache=False)
    engine.admit(0, list(range(1, 121)), 120, SamplingParams(temperature=0.0))
    engine.prefill(0)
    active, drafts, n = np.array([True]), np.ones((1, k), np.int32), np.array([k], np.int32)
    out = {}
    for name, call in (("decode_step_ms", lambda: engine.decode(active)),
                       ("verify_step_ms", lambda: engine.verify(active, drafts, n))):
        times = []
        for i in range(30):
            engine.set_cached(0, 120 + 1)  # rewind: every call sees the same cache
            engine.grow([0], [k])
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        out[name] = round(1e3 * float(np.median(times[5:])), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="runs/tiny_code/model", help="a trained model for the speculative part")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--draft-tokens", type=int, default=4)
    args = ap.parse_args()
    before = os.getloadavg()
    print(f"load average before: {before[0]:.2f} {before[1]:.2f} {before[2]:.2f} ({os.cpu_count()} cores)", flush=True)
    figures = {"load": part_load(args.requests)}
    if Path(args.ckpt).exists():
        figures["speculative"] = part_speculative(args.ckpt, args.draft_tokens)
    else:
        print(f"no {args.ckpt}: run `make train` for the speculative part")
    after = os.getloadavg()
    print(f"load average after: {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}")
    figures.update(load_before=round(before[0], 2), load_after=round(after[0], 2), cores=os.cpu_count())
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
