"""Load on the local OpenAI-compatible server: requests/s and p50/p99 latency at concurrency 1, 8, 32.

  python bench/serve_http.py                          # starts a server on 127.0.0.1 (random GPT-2-style model)
  python bench/serve_http.py --ckpt runs/x/model      # ... serving a checkpoint
  python bench/serve_http.py --url http://127.0.0.1:8000 --model NAME [--api-key KEY]   # an already running one

Each level sends `--requests` non-streaming /v1/completions (greedy, `--max-tokens` new tokens, no
early stop, prompts of 16-48 token ids) from that many client threads at once, and records each
request's wall time. Only loopback addresses are used. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def local_server(args):
    from flax import nnx

    from jaxformer.config import ModelConfig
    from jaxformer.models import DecoderLM
    from jaxformer.serve import ServerThread, create_app

    if args.ckpt:
        from jaxformer.infer import load_model, load_tokenizer_for

        model, tok = load_model(args.ckpt), load_tokenizer_for(args.ckpt)
    else:
        cfg = ModelConfig.gpt2(vocab_size=args.vocab, d_model=args.width, n_layers=args.layers,
                               n_heads=args.width // 64, d_ff=4 * args.width, max_seq_len=256)
        model, tok = DecoderLM(cfg, rngs=nnx.Rngs(0)), None
    app = create_app(model, tok, model_name=args.model, max_batch=args.max_batch, max_queue=256)
    return ServerThread(app).start(), model.config.vocab_size


def run_level(client, model: str, concurrency: int, n: int, max_tokens: int, vocab: int, rng: np.random.Generator,
              lengths: list[int] | None = None) -> dict:
    lengths = lengths or [int(rng.integers(16, 49)) for _ in range(n)]
    prompts = [rng.integers(0, vocab, m).tolist() for m in lengths]

    def one(prompt):
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        start = time.perf_counter()
        r = client.post("/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    lat = np.array([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    return {"concurrency": concurrency, "requests": n, "requests_per_s": n / wall, "tokens_per_s": tokens / wall,
            "p50_latency_s": float(np.percentile(lat, 50)), "p99_latency_s": float(np.percentile(lat, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (default: start one here on 127.0.0.1)")
    ap.add_argument("--api-key")
    ap.add_argument("--model", default="bench", help="model id to request")
    ap.add_argument("--ckpt", help="checkpoint for the local server (default: random GPT-2-style weights)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--max-batch", type=int, default=8, help="decode slots of the local server")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="a tiny model and few requests: proves the script runs")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.width, args.vocab, args.requests, args.max_tokens = 2, 64, 512, 8, 8

    server, vocab = (None, args.vocab) if args.url else local_server(args)
    url = args.url or server.url
    if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("serve_load only sends traffic to loopback addresses")
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = httpx.Client(base_url=url, headers=headers, timeout=600,
                          limits=httpx.Limits(max_connections=max(args.levels) + 4))
    rng = np.random.default_rng(0)
    try:  # warm-up: one prompt per prefill bucket the levels use (compilation happens here)
        run_level(client, args.model, 1, 3, args.max_tokens, vocab, rng, lengths=[16, 32, 48])
        rows = []
        for c in args.levels:
            row = run_level(client, args.model, c, max(args.requests, c), args.max_tokens, vocab, rng)
            rows.append(row)
            print(f"concurrency {c:3d}: {row['requests_per_s']:7.2f} req/s  {row['tokens_per_s']:8.1f} tok/s  "
                  f"p50 {row['p50_latency_s']:.3f}s  p99 {row['p99_latency_s']:.3f}s")
    finally:
        client.close()
        if server is not None:
            server.stop()
    print(json.dumps({"max_tokens": args.max_tokens, "levels": rows}))


if __name__ == "__main__":
    main()
