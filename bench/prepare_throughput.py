"""`jaxformer prepare` throughput (MB/s) and peak memory on a synthetic corpus (default 1 GB).

The corpus is the standard library's .py files repeated with varied names into many small files
and a few large ones (the large ones exercise the streamed, line-aligned pieces). `prepare` runs in
a child process so its peak RSS (ru_maxrss) is its own, not this script's.
The last line is one JSON object of the figures.

    python bench/prepare_throughput.py [--size-mb 1024] [--workdir /tmp/jaxformer-prepare-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from jaxformer.data.corpus import list_files


# runs the CLI in a child and reports that child's own peak RSS (Linux ru_maxrss is in KiB)
MEASURED = ("import resource, sys; from jaxformer.cli import main; main(sys.argv[1:]); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")


def make_corpus(root: Path, size_mb: int) -> int:
    """Write ~size_mb MB: 90% as ~64 KB files, 10% as 4 files of equal size. Returns bytes written."""
    root.mkdir(parents=True, exist_ok=True)
    texts = [f.read_text(encoding="utf-8", errors="ignore") for f in list_files(["stdlib"])[:400]]
    blob = "".join(texts)
    target = size_mb << 20
    small_budget, written, i = int(target * 0.9), 0, 0
    while written < small_budget:
        start = (i * 7919) % max(1, len(blob) - 65536)
        chunk = f"# copy {i}\n" + blob[start:start + 65536]
        (root / f"small_{i // 1000:03d}").mkdir(exist_ok=True)
        (root / f"small_{i // 1000:03d}" / f"f{i}.py").write_text(chunk)
        written += len(chunk.encode())
        i += 1
    big_each = (target - written) // 4
    for b in range(4):
        with open(root / f"big_{b}.txt", "w") as f:
            n = 0
            while n < big_each:
                f.write(blob[:min(len(blob), big_each - n)])
                n += min(len(blob), big_each - n)
        written += big_each
    return written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--workdir", default="/tmp/jaxformer-prepare-bench")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic corpus and shards")
    args = ap.parse_args()
    work = Path(args.workdir)
    corpus, tok, out = work / "corpus", work / "tok", work / "shards"
    if not corpus.exists():
        print(f"writing a {args.size_mb} MB synthetic corpus to {corpus} ...", flush=True)
        make_corpus(corpus, args.size_mb)
    size = sum(f.stat().st_size for f in list_files([corpus]))
    if not (tok / "tokenizer.json").exists():
        subprocess.run([sys.executable, "-m", "jaxformer.cli", "tokenizer", "train", "--input", "stdlib",
                        "--vocab-size", "4096", "--out", str(tok)], check=True, capture_output=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", MEASURED, "prepare", "--input", str(corpus), "--tokenizer",
                          str(tok), "--out", str(out)], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    peak_rss_mb = int(res.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) / 1024
    report = json.loads(res.stdout[res.stdout.index("{"):])
    tokens = sum(s["n_tokens"] for s in report["splits"].values())
    figures = {"corpus_mb": round(size / 2**20, 1), "seconds": round(seconds, 1),
               "mb_per_s": round(size / 2**20 / seconds, 2), "tokens": tokens,
               "tokens_per_s": round(tokens / seconds), "peak_rss_mb": round(peak_rss_mb, 1),
               "documents": report["corpus"]["documents"]}
    print(f"prepare: {figures['corpus_mb']} MB in {seconds:.0f} s = {figures['mb_per_s']} MB/s, "
          f"{tokens:,} tokens, peak RSS {figures['peak_rss_mb']} MB")
    if not args.keep:
        shutil.rmtree(work)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
