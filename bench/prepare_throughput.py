"""`jaxformer prepare` throughput at --workers 1 and 2, against raw `tokenizers` encode_batch on the same text,
and peak memory for a corpus ten times larger.

The corpus is FineWeb-shaped: JSON lines in gzip files of ~8 MB of text each, the documents cut from the
standard library's .py files (real text, no download). Each prepare runs in a child process through the CLI,
so its peak RSS (ru_maxrss) is its own; a --workers run's workers are children of that child, and their peak is
reported apart. The raw baseline encodes the same documents with `Tokenizer.encode_batch_fast` in this process,
batch by batch as prepare does, on all cores (the library's own threads). `--workers 1` tokenizes on all cores
too (the same thread pool); the run with TOKENIZERS_PARALLELISM=false shows one process on one core, which is
what each of `--workers K`'s processes is. Prints the load average before and
after; the last line is one JSON object of the figures.

    python bench/prepare_throughput.py [--size-mb 64] [--scale 10] [--workdir /tmp/jaxformer-prepare-bench]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from jaxformer.data.corpus import list_files

FILE_MB = 8
# runs the CLI in a child and reports that child's own peak RSS and its children's (Linux ru_maxrss is in KiB)
MEASURED = ("import resource, sys; from jaxformer.cli import main; main(sys.argv[1:]); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)")


def make_corpus(root: Path, size_mb: int) -> list[str]:
    """~size_mb MB of documents as .jsonl.gz files of FILE_MB MB of text each; returns the documents of one file."""
    root.mkdir(parents=True, exist_ok=True)
    texts = [f.read_text(encoding="utf-8", errors="ignore") for f in list_files(["stdlib"])[:600]]
    blob = "".join(texts)
    written, i, n_file, first = 0, 0, 0, []
    while written < size_mb << 20:
        docs, size = [], 0
        while size < FILE_MB << 20:
            start = (i * 7919) % max(1, len(blob) - 16384)
            doc = f"# copy {i}\n" + blob[start:start + 2048 + (i * 31) % 14336]  # 2-16 KB documents
            docs.append(doc)
            size += len(doc.encode())
            i += 1
        with gzip.open(root / f"part-{n_file:05d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as f:
            f.writelines(json.dumps({"text": d, "id": n}) + "\n" for n, d in enumerate(docs))
        first = first or docs
        written, n_file = written + size, n_file + 1
    return first


def run_prepare(corpus: Path, tok: Path, out: Path, workers: int, one_thread: bool = False) -> dict:
    """One `jaxformer prepare` in a child; one_thread: the tokenizer's own thread pool off (one core per process)."""
    env = {**os.environ, **({"TOKENIZERS_PARALLELISM": "false"} if one_thread else {})}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", MEASURED, "prepare", "--input", str(corpus), "--tokenizer",
                          str(tok), "--out", str(out), "--workers", str(workers)], capture_output=True, text=True,
                         env=env)
    seconds = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    self_kb, children_kb = map(int, res.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[:2])
    report = json.loads(res.stdout[res.stdout.index("{"):])
    text_mb = sum(s["n_bytes"] for s in report["splits"].values()) / 2**20
    shutil.rmtree(out)
    return {"seconds": round(seconds, 1), "text_mb": round(text_mb, 1), "mb_per_s": round(text_mb / seconds, 2),
            "peak_rss_mb": round(self_kb / 1024, 1), "worker_peak_rss_mb": round(children_kb / 1024, 1),
            "documents": report["corpus"]["documents"]}


def raw_encode(docs: list[str], tok: Path, repeats: int) -> float:
    """MB/s of encode_batch_fast over the documents in 4 MB batches (prepare's batch size), all cores."""
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tok / "tokenizer.json"))
    batches, batch, size = [], [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= 4 << 20:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for b in batches:
            t.encode_batch_fast(b, add_special_tokens=False)
    return repeats * sum(len(d.encode()) for d in docs) / 2**20 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--scale", type=int, default=10, help="the memory check's corpus is this many times larger")
    ap.add_argument("--workdir", default="/tmp/jaxformer-prepare-bench")
    args = ap.parse_args()
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
          f"({os.cpu_count()} cores)", flush=True)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    small, large, tok = work / "small", work / "large", work / "tok"
    docs = make_corpus(small, args.size_mb)
    subprocess.run([sys.executable, "-m", "jaxformer.cli", "tokenizer", "train", "--input", "stdlib",
                    "--vocab-size", "4096", "--out", str(tok)], check=True, capture_output=True)
    raw = raw_encode(docs, tok, repeats=3)
    one = run_prepare(small, tok, work / "out", workers=1)
    single = run_prepare(small, tok, work / "out", workers=1, one_thread=True)
    two = run_prepare(small, tok, work / "out", workers=2)
    make_corpus(large, args.size_mb * args.scale)
    big = run_prepare(large, tok, work / "out", workers=1)
    load_after = os.getloadavg()
    figures = {
        "corpus_mb": one["text_mb"], "raw_encode_mb_per_s": round(raw, 2),
        "workers1_mb_per_s": one["mb_per_s"], "workers2_mb_per_s": two["mb_per_s"],
        "speedup_workers2": round(two["mb_per_s"] / one["mb_per_s"], 2),
        "workers1_one_thread_mb_per_s": single["mb_per_s"],
        "speedup_workers2_vs_one_thread": round(two["mb_per_s"] / single["mb_per_s"], 2),
        "workers1_vs_raw": round(one["mb_per_s"] / raw, 2), "workers2_vs_raw": round(two["mb_per_s"] / raw, 2),
        "peak_rss_mb": one["peak_rss_mb"], "workers2_parent_rss_mb": two["peak_rss_mb"],
        "workers2_worker_rss_mb": two["worker_peak_rss_mb"],
        f"peak_rss_mb_{args.scale}x": big["peak_rss_mb"], "rss_ratio": round(big["peak_rss_mb"] / one["peak_rss_mb"], 2),
        f"corpus_mb_{args.scale}x": big["text_mb"], f"workers1_mb_per_s_{args.scale}x": big["mb_per_s"],
        "load_before": round(load_before[0], 2), "load_after": round(load_after[0], 2), "cores": os.cpu_count(),
    }
    print(f"raw encode_batch {raw:.2f} MB/s; prepare --workers 1 {one['mb_per_s']} MB/s (tokenizer on one thread: "
          f"{single['mb_per_s']}), --workers 2 {two['mb_per_s']} MB/s ({figures['speedup_workers2']}x, "
          f"{figures['speedup_workers2_vs_one_thread']}x the one-thread process); peak RSS {one['peak_rss_mb']} MB on "
          f"{one['text_mb']} MB, {big['peak_rss_mb']} MB on {big['text_mb']} MB ({figures['rss_ratio']}x)")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    shutil.rmtree(work)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
