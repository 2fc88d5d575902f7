"""`jaxformer prepare`: corpus files -> token shards, over K worker processes and N tasks (machines).

    task I of N        takes files I, I+N, I+2N, ... of the sources' sorted file list, and writes its own shards
                       and manifest into the output directory; N = 1 writes manifest.json as always. Training
                       reads every task's shards as one dataset once all N manifests are there (shards.py).
    worker w of K      (inside a task) reads, extracts, tokenizes and keys the task's files w, w+K, ...; the
                       parent takes their results file by file, in order, drops duplicates and writes. So the
                       shards are the same whatever K is, and memory stays bounded: a worker ahead of the parent
                       waits on its full queue.

Tasks come from --tasks/--task, else SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID (an sbatch --array job), else
1 / 0. Deduplication (dedup.py) covers one task's documents: documents in different tasks' files are not
compared. Text files over formats.PIECE_CHARS arrive in pieces and are never dropped as duplicates.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import time
import traceback
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from jaxformer.data import dedup as dd
from jaxformer.data.corpus import CorpusFileError, CorpusStats, check_not_empty, file_documents, named_files
from jaxformer.data.shards import (MANIFEST, ShardWriter, SPLITS, remove_outputs, save_manifest, split_of,
                                   task_manifest_name, token_dtype)
from jaxformer.data.tokenizer import Tokenizer, load_tokenizer

QUEUE_BATCHES = 4  # encoded batches a worker may hold ahead of the parent


@dataclasses.dataclass(frozen=True)
class Job:
    """What one worker needs (picklable: it crosses to spawned processes)."""

    files: tuple[tuple[int, str, str], ...]  # (index in the task's file list, path, doc_id)
    tokenizer_json: str
    dtype: str
    field: str
    skip_bad_files: bool
    dedup: str
    batch_bytes: int


def task_from_env(tasks: int | None, task: int | None) -> tuple[int, int]:
    """(task, tasks) from the arguments, else from a SLURM array job's environment, else (0, 1)."""
    if tasks is None and task is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        task = int(os.environ["SLURM_ARRAY_TASK_ID"]) - first
        tasks = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    tasks, task = tasks or 1, task or 0
    if tasks < 1 or not 0 <= task < tasks:
        raise ValueError(f"--task must be in [0, --tasks), got task {task} of {tasks}")
    return task, tasks


def prepare(sources: Sequence[str | Path] | str, tokenizer: Tokenizer | str | Path, out_dir: str | Path, *,
            val_fraction: float = 0.01, jsonl_field: str = "text", batch_bytes: int = 4 << 20,
            max_shard_tokens: int = 1 << 28, progress: bool = True, workers: int = 1, tasks: int | None = None,
            task: int | None = None, dedup: str = "none", skip_bad_files: bool = False) -> dict:
    """Tokenize this task's share of the documents into train/val shards under out_dir; returns (and writes)
    its manifest."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    dd.key_fn(dedup)
    task, tasks = task_from_env(tasks, task)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token, which shards put after every document; "
                         "train one with `jaxformer tokenizer train` or use a tokenizer with an eos_token")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_outputs(out, task, tasks)
    files = named_files(sources)[task::tasks]
    dtype = token_dtype(tok.vocab_size)
    job = Job(tuple((i, str(p), d) for i, (p, d) in enumerate(files)), tok.tok.to_str(), dtype.name, jsonl_field,
              skip_bad_files, dedup, batch_bytes)
    prefix = "" if tasks == 1 else f"task{task:05d}_"
    writers = {s: ShardWriter(out, s, dtype, max_shard_tokens, prefix) for s in SPLITS}
    keep, stats = dd.Deduplicator(dedup), CorpusStats()
    bar = tqdm(total=sum(p.stat().st_size for p, _ in files), unit="B", unit_scale=True, desc="prepare",
               disable=not progress)
    t0, open_doc = time.perf_counter(), None
    for kind, index, payload in _results(job, workers):
        if kind == "done":
            stats.add(payload)
            bar.update(Path(job.files[index][1]).stat().st_size)
            continue
        for doc_id, final, ids, nbytes, key in payload:
            if open_doc is None and final and not keep.keep(key):  # a whole document: it may be a duplicate
                continue
            w = writers[split_of(doc_id, val_fraction)]
            if open_doc != doc_id:  # the first piece of a document
                w.begin_document()
            w.write(ids)
            w.n_bytes += nbytes
            if final:
                w.write(np.asarray([tok.eos_id], dtype))
            open_doc = None if final else doc_id
    bar.close()
    if files or tasks == 1:
        check_not_empty(stats, sources)
    manifest = {
        "format": "jaxformer-shards", "version": 1, "tokenizer": "tokenizer.json",
        "tokenizer_sha256": tok.sha256(), "vocab_size": tok.vocab_size, "dtype": dtype.name,
        "eos_id": tok.eos_id, "val_fraction": val_fraction,
        "splits": {s: w.close() for s, w in writers.items()},
        "corpus": stats.to_dict(), "dedup": keep.report(),
        "sources": [str(s) for s in ([sources] if isinstance(sources, (str, Path)) else sources)],
        "task": {"index": task, "count": tasks, "files": len(files), "workers": workers},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    save_manifest(out, manifest, tok, MANIFEST if tasks == 1 else task_manifest_name(task, tasks))
    return manifest


def _results(job: Job, workers: int) -> Iterator[tuple[str, int, object]]:
    """("docs", file index, [(doc_id, final, ids, bytes, key)]) and ("done", file index, CorpusStats) messages, in
    file order, from this process (workers=1) or from `workers` spawned processes."""
    if workers == 1 or len(job.files) <= 1:
        yield from _read_files(job)
        return
    ctx = mp.get_context("spawn")  # never fork a process that may hold JAX's or the tokenizer's threads
    n = min(workers, len(job.files))
    queues = [ctx.Queue(maxsize=QUEUE_BATCHES) for _ in range(n)]
    procs = [ctx.Process(target=_worker, args=(dataclasses.replace(job, files=job.files[w::n]), queues[w]),
                         daemon=True) for w in range(n)]
    for p in procs:
        p.start()
    try:
        for index in range(len(job.files)):
            while True:
                kind, i, payload = _get(queues[index % n], procs[index % n], job.files[index][1])
                if kind == "error":
                    corpus_error, message = payload
                    raise CorpusFileError(message) if corpus_error else RuntimeError(f"a prepare worker failed:\n{message}")
                yield kind, i, payload
                if kind == "done":
                    break
    finally:
        for p in procs:
            p.terminate()
            p.join()


def _get(q, proc, path: str):
    """The next message of a worker; a clear error if it died without sending one."""
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"a prepare worker exited (code {proc.exitcode}) while reading {path}; "
                                   "out of memory? try fewer --workers") from None


def _worker(job: Job, q) -> None:
    """A worker process: its files' messages onto its queue, or one ("error", index, message) and stop."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers fill the cores
    try:
        for message in _read_files(job):
            q.put(message)
    except Exception as e:  # noqa: BLE001 - the parent raises it, in file order
        q.put(("error", -1, (isinstance(e, CorpusFileError), str(e) if isinstance(e, CorpusFileError)
                             else traceback.format_exc())))


def _read_files(job: Job) -> Iterator[tuple[str, int, object]]:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_str(job.tokenizer_json)
    key_fn = dd.key_fn(job.dedup)
    dtype = np.dtype(job.dtype)
    for index, path, doc_id in job.files:
        stats = CorpusStats()
        batch, size = [], 0
        for doc in file_documents(Path(path), doc_id, job.field, stats, skip_bad_files=job.skip_bad_files):
            batch.append(doc)
            size += len(doc.text)
            if size >= job.batch_bytes:
                yield "docs", index, _encode(tok, batch, dtype, key_fn)
                batch, size = [], 0
        if batch:
            yield "docs", index, _encode(tok, batch, dtype, key_fn)
        yield "done", index, stats


def _encode(tok, docs: list, dtype: np.dtype, key_fn) -> list[tuple]:
    """[(doc_id, final, token ids, UTF-8 bytes, dedup key)] for a batch of documents (pieces get no key)."""
    encodings = tok.encode_batch_fast([d.text for d in docs], add_special_tokens=False)
    return [(d.doc_id, d.final, np.asarray(e.ids, dtype), len(d.text.encode("utf-8")),
             key_fn(d.text) if key_fn and d.final else None) for d, e in zip(docs, encodings)]
