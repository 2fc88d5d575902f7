"""Token shards on disk: their layout, the writer `jaxformer prepare` uses (data/prepare.py), and the readers the
input pipeline uses.

Layout of an output directory:
  manifest.json              tokenizer hash, dtype, per-split shard list and counts, what reading met; a prepare
                             split over N tasks writes manifest-task{I:05d}-of-{N:05d}.json per task instead, and
                             the readers here join them (all N must be there) into one dataset
  tokenizer.json (+ config)  the tokenizer the shards were made with
  {split}_[task{I:05d}_]{k:05d}.bin       raw token ids (uint16 when the vocab fits, else uint32); every
                             document is followed by EOS
  {split}_[task{I:05d}_]{k:05d}.docs.npy  int64 start offset of each document within the shard
The split is by document (a hash of its id), so no document straddles train and val.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from jaxformer.data.corpus import CorpusStats, check_not_empty, iter_documents

MANIFEST = "manifest.json"
TASK_MANIFEST = re.compile(r"manifest-task(\d{5})-of-(\d{5})\.json")
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def split_of(doc_id: str, val_fraction: float) -> str:
    """Deterministic by-document split: the same document always lands in the same split."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "little")
    return "val" if (h % 1_000_000) < val_fraction * 1_000_000 else "train"


def task_manifest_name(task: int, tasks: int) -> str:
    return f"manifest-task{task:05d}-of-{tasks:05d}.json"


class ShardWriter:
    """Appends documents' tokens to {split}_{prefix}{k}.bin, rolling to a new shard past max_tokens."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, max_tokens: int, prefix: str = ""):
        self.out, self.split, self.dtype, self.max_tokens, self.prefix = out, split, dtype, max_tokens, prefix
        self.shards: list[dict] = []
        self.n_bytes = 0
        self._file = None
        self._starts: list[int] = []
        self._pos = 0

    def begin_document(self) -> None:
        if self._file is None or self._pos >= self.max_tokens:
            self._roll()
        self._starts.append(self._pos)

    def write(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._file.write(arr.tobytes())
        self._pos += arr.size

    def _roll(self) -> None:
        self._close_shard()
        name = f"{self.split}_{self.prefix}{len(self.shards):05d}"
        self._file = open(self.out / f"{name}.bin", "wb")
        self.shards.append({"tokens": f"{name}.bin", "docs": f"{name}.docs.npy"})
        self._starts, self._pos = [], 0

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        np.save(self.out / self.shards[-1]["docs"], np.asarray(self._starts, dtype=np.int64))
        self.shards[-1].update(n_tokens=self._pos, n_docs=len(self._starts))
        self._file = None

    def close(self) -> dict:
        self._close_shard()
        return {"shards": self.shards, "n_tokens": sum(s["n_tokens"] for s in self.shards),
                "n_docs": sum(s["n_docs"] for s in self.shards), "n_bytes": self.n_bytes}


def remove_outputs(out: Path, task: int, tasks: int) -> None:
    """Delete what an earlier prepare of this task left (one task: everything; task I of N: its own files)."""
    if tasks == 1:
        stale = [*out.glob("*.bin"), *out.glob("*.docs.npy"), out / MANIFEST, *out.glob("manifest-task*.json")]
    else:
        if (out / MANIFEST).exists():
            raise ValueError(f"{out} holds a dataset prepared in one task ({MANIFEST}); write the tasks of a split "
                             "prepare into a new directory")
        others = [m for m in out.glob("manifest-task*.json") if not m.name.endswith(f"-of-{tasks:05d}.json")]
        if others:
            raise ValueError(f"{out} holds tasks of a prepare split {len(others)} other ways ({others[0].name}); "
                             f"use the same --tasks, or a new directory")
        tag = f"task{task:05d}_"
        stale = [*out.glob(f"*_{tag}*.bin"), *out.glob(f"*_{tag}*.docs.npy"), out / task_manifest_name(task, tasks)]
    for path in stale:
        path.unlink(missing_ok=True)


def save_manifest(out: Path, manifest: dict, tok, name: str) -> None:
    """The tokenizer files, then the manifest (last: a manifest means the shards are complete). Each file is
    written beside its destination and renamed into place, so tasks writing the same tokenizer never tear it."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer-") as tmp:
        tok.save(tmp)
        for f in Path(tmp).iterdir():
            os.replace(f, out / f.name)
    tmp_manifest = out / f".{name}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp_manifest, out / name)


@dataclasses.dataclass
class SplitTokens:
    """One split's tokens as memory-mapped shards plus each token's document index."""

    shards: list[np.ndarray]  # memmaps, each 1-D
    doc_starts: list[np.ndarray]  # per shard, start offsets of its documents
    n_bytes: int  # UTF-8 bytes of the split's text (for bits-per-byte)

    @property
    def n_tokens(self) -> int:
        return sum(int(s.size) for s in self.shards)


def read_manifest(data_dir: str | Path) -> dict:
    """The dataset's manifest: manifest.json, or the join of a split prepare's task manifests (all of them)."""
    data_dir = Path(data_dir)
    if (data_dir / MANIFEST).exists():
        return json.loads((data_dir / MANIFEST).read_text())
    parts = sorted(p for p in data_dir.glob("manifest-task*.json") if TASK_MANIFEST.fullmatch(p.name))
    if not parts:
        raise FileNotFoundError(f"no {MANIFEST} in {data_dir}: run `jaxformer prepare` to make token shards first")
    return join_task_manifests(data_dir, [json.loads(p.read_text()) for p in parts])


def join_task_manifests(data_dir: Path, parts: list[dict]) -> dict:
    """One manifest from every task's: shards in task order, counts summed, each task's record kept."""
    count = parts[0]["task"]["count"]
    have = {p["task"]["index"] for p in parts}
    missing = sorted(set(range(count)) - have)
    if missing:
        raise FileNotFoundError(f"{data_dir} holds {len(have)} of the {count} tasks of a split prepare; tasks "
                                f"{missing[:10]} have not finished (no manifest-task*.json): run them "
                                f"(jaxformer prepare ... --tasks {count} --task I) before training")
    parts = sorted(parts, key=lambda p: p["task"]["index"])
    for key in ("tokenizer_sha256", "dtype", "vocab_size", "eos_id", "val_fraction"):
        values = {json.dumps(p[key]) for p in parts}
        if len(values) > 1:
            raise ValueError(f"the tasks in {data_dir} disagree on {key} ({sorted(values)}): prepare every task with "
                             "the same tokenizer and --val-fraction")
    joined = {k: parts[0][k] for k in ("format", "version", "tokenizer", "tokenizer_sha256", "vocab_size", "dtype",
                                       "eos_id", "val_fraction", "sources")}
    joined["splits"] = {s: {"shards": [sh for p in parts for sh in p["splits"][s]["shards"]],
                            **{k: sum(p["splits"][s][k] for p in parts) for k in ("n_tokens", "n_docs", "n_bytes")}}
                        for s in SPLITS}
    corpus = {}
    for p in parts:
        for k, v in p["corpus"].items():
            corpus[k] = corpus.get(k, [] if isinstance(v, list) else 0) + v
    joined["corpus"] = corpus
    if not corpus["documents"]:
        raise ValueError(f"the {count} tasks in {data_dir} kept no document at all: nothing to train on")
    joined["tasks"] = [{"task": p["task"], "dedup": p.get("dedup"), "documents": p["corpus"]["documents"],
                        "seconds": p["seconds"]} for p in parts]
    return joined


def has_dataset(data_dir: str | Path) -> bool:
    """True when data_dir holds a finished dataset (manifest.json, or task manifests, complete or not)."""
    data_dir = Path(data_dir)
    return (data_dir / MANIFEST).exists() or any(data_dir.glob("manifest-task*.json"))


def open_split(data_dir: str | Path, split: str) -> SplitTokens:
    """Memory-map one split's shards (nothing is read until indexed)."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in {data_dir}; splits: {sorted(manifest['splits'])}")
    info = manifest["splits"][split]
    dtype = np.dtype(manifest["dtype"])
    shards, starts = [], []
    for s in info["shards"]:
        if s["n_tokens"] == 0:
            continue
        shards.append(np.memmap(data_dir / s["tokens"], dtype=dtype, mode="r", shape=(s["n_tokens"],)))
        starts.append(np.load(data_dir / s["docs"]))
    return SplitTokens(shards, starts, info["n_bytes"])


def iter_sources_text(sources, jsonl_field: str = "text", *, skip_bad_files: bool = False) -> Iterable[str]:
    """Texts only, for tokenizer training; an EmptyCorpusError at the end when there was none."""
    stats = CorpusStats()
    for doc in iter_documents(sources, jsonl_field=jsonl_field, stats=stats, skip_bad_files=skip_bad_files):
        yield doc.text
    check_not_empty(stats, sources)
