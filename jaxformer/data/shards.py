"""Corpus -> token shards on disk (`jaxformer prepare`), and the reader the input pipeline uses.

Layout of an output directory:
  manifest.json              tokenizer hash, dtype, per-split shard list and counts, skipped inputs
  tokenizer.json (+ config)  the tokenizer the shards were made with
  {split}_{i:05d}.bin        raw token ids (uint16 when the vocab fits, else uint32); every document
                             is followed by EOS
  {split}_{i:05d}.docs.npy   int64 start offset of each document within the shard
The split is by document (a hash of its id), so no document straddles train and val.
Tokenization streams in batches of about `batch_bytes`: memory is bounded whatever the corpus size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from jaxformer.data.corpus import CorpusStats, Document, iter_documents, list_files
from jaxformer.data.tokenizer import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def split_of(doc_id: str, val_fraction: float) -> str:
    """Deterministic by-document split: the same document always lands in the same split."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "little")
    return "val" if (h % 1_000_000) < val_fraction * 1_000_000 else "train"


class _ShardWriter:
    """Appends documents' tokens to {split}_{i}.bin, rolling to a new shard past max_tokens."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, max_tokens: int):
        self.out, self.split, self.dtype, self.max_tokens = out, split, dtype, max_tokens
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
        name = f"{self.split}_{len(self.shards):05d}"
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


def prepare(sources: Sequence[str | Path] | str, tokenizer: Tokenizer | str | Path, out_dir: str | Path, *,
            val_fraction: float = 0.01, jsonl_field: str = "text", batch_bytes: int = 4 << 20,
            max_shard_tokens: int = 1 << 28, progress: bool = True) -> dict:
    """Tokenize documents into train/val shards under out_dir; returns (and writes) the manifest."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token, which shards put after every document; "
                         "train one with `jaxformer tokenizer train` or use a tokenizer with an eos_token")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*.bin")) + list(out.glob("*.docs.npy")) + [out / MANIFEST]:
        stale.unlink(missing_ok=True)
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _ShardWriter(out, s, dtype, max_shard_tokens) for s in SPLITS}
    stats = CorpusStats()
    total = sum(f.stat().st_size for f in list_files(sources))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress)
    t0 = time.perf_counter()
    batch: list[Document] = []
    size, open_doc = 0, {}
    for doc in iter_documents(sources, jsonl_field=jsonl_field, stats=stats):
        batch.append(doc)
        size += len(doc.text)
        if size >= batch_bytes:
            _flush(batch, tok, writers, val_fraction, bar, open_doc)
            batch, size = [], 0
    _flush(batch, tok, writers, val_fraction, bar, open_doc)
    bar.close()
    manifest = {
        "format": "jaxformer-shards", "version": 1, "tokenizer": "tokenizer.json",
        "tokenizer_sha256": tok.sha256(), "vocab_size": tok.vocab_size, "dtype": dtype.name,
        "eos_id": tok.eos_id, "val_fraction": val_fraction,
        "splits": {s: w.close() for s, w in writers.items()},
        "corpus": stats.to_dict(), "sources": [str(s) for s in ([sources] if isinstance(sources, (str, Path)) else sources)],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    tok.save(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _flush(batch: list[Document], tok: Tokenizer, writers: dict, val_fraction: float, bar, open_doc: dict) -> None:
    """Encode a batch in parallel and append it; `open_doc` remembers a document whose pieces continue
    (corpus.iter_documents yields a document's pieces in order, one after another)."""
    if not batch:
        return
    for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
        w = writers[split_of(doc.doc_id, val_fraction)]
        if open_doc.get("id") != doc.doc_id:  # first piece of a document
            w.begin_document()
        w.write(ids)
        nb = len(doc.text.encode("utf-8"))
        w.n_bytes += nb
        if doc.final:
            w.write([tok.eos_id])
            open_doc.clear()
        else:
            open_doc["id"] = doc.doc_id
        bar.update(nb)


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
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {data_dir}: run `jaxformer prepare` to make token shards first")
    return json.loads(path.read_text())


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


def iter_sources_text(sources, jsonl_field: str = "text") -> Iterable[str]:
    """Texts only, for tokenizer training."""
    for doc in iter_documents(sources, jsonl_field=jsonl_field):
        yield doc.text
