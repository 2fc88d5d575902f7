"""Seq2seq data: JSONL pairs -> tokenized examples -> length-bucketed, padded batches through grain.

A data directory holds {train,val,test}.jsonl, one {"source": str, "target": str} object per line
(other fields are kept for reports, e.g. code2doc's function name), and tokenizer.json: given, or a
byte-level BPE trained on the train split's sources and targets on first use.

Sources become their tokens + EOS (cut to max_source_len), targets their tokens + EOS (cut to
max_target_len). A batch (global rows; each process keeps its own slice):
  src        [B, S] int32    source tokens, right-padded with pad_id
  src_mask   [B, S] int32    1 = token, 0 = pad
  tgt_in     [B, T] int32    decoder inputs: decoder_start_id, then the target shifted right
  tgt_out    [B, T] int32    the target (EOS included), right-padded
  loss_mask  [B, T] float32  1 on target tokens (0 everywhere on filler rows)
  rows       [B]    int32    example index of each row (-1: a filler row completing the last batch)
  index      [B]    int32    the batch's position in the stream (dropout keys, resume-exact)
S and T are buckets, min_bucket * 2^k capped at the max lengths: one compiled program per bucket pair.
Training batches come from chunks of the epoch's permutation sorted by length (similar lengths share
a batch, little padding), then shuffled; each epoch draws a new permutation.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterable

import grain
import numpy as np

from jaxformer.config import Seq2SeqConfig
from jaxformer.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from jaxformer.seq2seq.code2doc import build_code2doc, name_baseline

SPLITS = ("train", "val", "test")
SORT_CHUNK = 64  # batches per length-sorted chunk of a training epoch
EPOCHS = 1_000_000  # a training stream's length in epochs (grain indexes it; nobody reaches the end)


@dataclasses.dataclass
class Pairs:
    """One split: raw records and their token ids (each with EOS)."""

    records: list[dict]
    src: list[np.ndarray]
    tgt: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def sources(self) -> list[str]:
        return [r["source"] for r in self.records]

    @property
    def targets(self) -> list[str]:
        return [r["target"] for r in self.records]


def read_jsonl_pairs(path: str | Path) -> list[dict]:
    """Records with string "source" and "target" fields; other lines are skipped (and counted in the error)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: a seq2seq split is a JSONL file of "
                                '{"source": ..., "target": ...} lines')
    out, bad = [], 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("source"), str) and isinstance(rec.get("target"), str):
                out.append(rec)
            else:
                bad += 1
    if not out:
        raise ValueError(f"{path} holds no valid pairs ({bad} lines without string \"source\" and \"target\")")
    return out


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def split_identifiers(code: str) -> str:
    """Identifiers as lower-case words: `def getEventLoop(self_ref):` -> `def get event loop(self ref):`.

    Code-summarization models commonly read sub-tokenised identifiers (code2seq; Ahmad et al. 2020):
    the words a summary uses ("Return the event loop") become tokens the source holds.
    """
    return _IDENTIFIER.sub(lambda m: name_baseline(m.group(0)) or m.group(0), code)


def source_text(record: dict, split_ids: bool) -> str:
    return split_identifiers(record["source"]) if split_ids else record["source"]


_CAPITALISED_WORD = re.compile(r"[A-Z][a-z]*(?![A-Za-z0-9_])")  # 'Return', 'A'; not 'HTTP', 'ZipInfo', 'Foo_bar'


def truecase(target: str) -> str:
    """A summary with its first word as it would stand inside a sentence: 'Close the file.' -> ' close the file.'

    Truecasing as machine translation does it (sentence-initial words in their usual case), plus the space a
    byte-level BPE puts before an in-sentence word: the first word becomes the same token as that word in a
    split-identifier source (`def close(self)`), so a model can copy or align it. `detruecase` inverts it.
    """
    if _CAPITALISED_WORD.match(target):
        target = target[0].lower() + target[1:]
    return " " + target


def detruecase(text: str) -> str:
    """A decoded summary in sentence form: surrounding space stripped, first letter upper-case."""
    text = text.strip()
    return text[:1].upper() + text[1:]


def target_text(record: dict, truecase_targets: bool) -> str:
    return truecase(record["target"]) if truecase_targets else record["target"]


def tokenize_pairs(records: list[dict], tok: Tokenizer, max_source_len: int, max_target_len: int,
                   split_ids: bool = False, truecase_targets: bool = False) -> Pairs:
    """Token ids + EOS per source and target, cut to the max lengths (EOS always kept)."""
    eos = tok.eos_id

    def ids(texts: list[str], n: int) -> list[np.ndarray]:
        return [np.asarray(t[:n - 1] + [eos], np.int32) for t in tok.encode_batch(texts)]

    return Pairs(records, ids([source_text(r, split_ids) for r in records], max_source_len),
                 ids([target_text(r, truecase_targets) for r in records], max_target_len))


def load_split(data_dir: str | Path, split: str, tok: Tokenizer, cfg: Seq2SeqConfig) -> Pairs:
    """Read and tokenize DATA_DIR/{split}.jsonl."""
    return tokenize_pairs(read_jsonl_pairs(Path(data_dir) / f"{split}.jsonl"), tok, cfg.max_source_len,
                          cfg.max_target_len, cfg.split_identifiers, cfg.truecase_targets)


def ensure_seq2seq_data(cfg: Seq2SeqConfig, vocab_size: int, *, progress: bool = True) -> tuple[Path, Tokenizer]:
    """(data_dir, tokenizer): builds the task's JSONL (cfg.task) and trains the tokenizer, each only when missing."""
    data_dir = Path(cfg.data_dir)
    missing = [s for s in SPLITS if not (data_dir / f"{s}.jsonl").exists()]
    if missing:
        if cfg.task is None:
            raise FileNotFoundError(f"{data_dir} lacks {[f'{s}.jsonl' for s in missing]}; give JSONL pairs there "
                                    "or set seq2seq.task (e.g. code2doc) to build them")
        print(f"building the {cfg.task} task into {data_dir} ...", flush=True)
        stats = build_code2doc(data_dir)
        print(f"{cfg.task}: {stats['examples']} examples from {stats['modules']} modules", flush=True)
    if (data_dir / "tokenizer.json").exists():
        tok = load_tokenizer(data_dir)
        if cfg.tokenizer and load_tokenizer(cfg.tokenizer).sha256() != tok.sha256():
            raise ValueError(f"{data_dir}/tokenizer.json differs from seq2seq.tokenizer={cfg.tokenizer}; delete it "
                             "or point seq2seq.data_dir elsewhere")
        return data_dir, tok
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        print(f"training a {vocab_size}-token byte-level BPE tokenizer on {data_dir}/train.jsonl ...", flush=True)
        records = read_jsonl_pairs(data_dir / "train.jsonl")
        texts: Iterable[str] = (t for r in records for t in (source_text(r, cfg.split_identifiers),
                                                             target_text(r, cfg.truecase_targets)))
        tok = train_tokenizer(texts, vocab_size, show_progress=progress)
    tok.save(data_dir)
    return data_dir, load_tokenizer(data_dir)


def bucket(n: int, min_bucket: int, cap: int) -> int:
    """The smallest min_bucket * 2^k >= n, capped at `cap` (n <= cap)."""
    b = min_bucket
    while b < n:
        b *= 2
    return min(b, cap)


@dataclasses.dataclass(eq=False)
class Collate:
    """Row indices of one batch -> padded arrays (see the module docstring); -1 rows are fillers."""

    pairs: Pairs
    cfg: Seq2SeqConfig
    pad_id: int
    start_id: int
    process_index: int = 0
    process_count: int = 1

    def __call__(self, item: dict) -> dict[str, np.ndarray]:
        rows = np.asarray(item["rows"], np.int32)
        real = [int(r) for r in rows if r >= 0]
        cfg = self.cfg
        S = bucket(max(len(self.pairs.src[r]) for r in real), cfg.min_bucket, cfg.max_source_len)
        T = bucket(max(len(self.pairs.tgt[r]) for r in real), cfg.min_bucket, cfg.max_target_len)
        B = len(rows)
        src = np.full((B, S), self.pad_id, np.int32)
        tgt_out = np.full((B, T), self.pad_id, np.int32)
        src_len, tgt_len = np.zeros(B, np.int32), np.zeros(B, np.int32)
        for i, r in enumerate(rows):
            s, t = self.pairs.src[r if r >= 0 else real[0]], self.pairs.tgt[r if r >= 0 else real[0]]
            src[i, :len(s)], tgt_out[i, :len(t)] = s, t
            src_len[i], tgt_len[i] = len(s), len(t)
        loss_mask = (np.arange(T)[None, :] < tgt_len[:, None]) & (rows >= 0)[:, None]
        batch = {"src": src, "src_mask": (np.arange(S)[None, :] < src_len[:, None]).astype(np.int32),
                 "tgt_in": np.concatenate([np.full((B, 1), self.start_id, np.int32), tgt_out[:, :-1]], axis=1),
                 "tgt_out": tgt_out, "loss_mask": loss_mask.astype(np.float32), "rows": rows,
                 "index": np.full((B,), item["index"], np.int32)}
        if self.process_count > 1:
            b = B // self.process_count
            batch = {k: v[self.process_index * b:(self.process_index + 1) * b] for k, v in batch.items()}
        return batch


class TrainBatches:
    """grain source: index -> {"rows", "index"} of one training batch; epoch = index // batches_per_epoch."""

    def __init__(self, pairs: Pairs, batch_size: int, seed: int):
        if len(pairs) < batch_size:
            raise ValueError(f"only {len(pairs)} training pairs, fewer than batch_size={batch_size}")
        self.lengths = np.array([len(s) for s in pairs.src]) * 4096 + np.array([len(t) for t in pairs.tgt])
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = len(pairs) // batch_size
        self._epoch, self._plan = -1, None

    def __len__(self) -> int:
        return self.per_epoch * EPOCHS

    def plan(self, epoch: int) -> np.ndarray:
        """[batches, B] row indices of an epoch: permuted, sorted by length within chunks, batch order shuffled."""
        rng = np.random.default_rng((self.seed, epoch))
        B = self.batch_size
        perm = rng.permutation(len(self.lengths))[:self.per_epoch * B]
        chunks = [perm[i:i + SORT_CHUNK * B] for i in range(0, len(perm), SORT_CHUNK * B)]
        batches = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")].reshape(-1, B) for c in chunks])
        return batches[rng.permutation(len(batches))]

    def __getitem__(self, index: int) -> dict:
        epoch, i = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self.plan(epoch)
        return {"rows": self._plan[i], "index": index}


class EvalBatches:
    """grain source: every example once, sorted by length, in batches of B (the last completed with -1 fillers)."""

    def __init__(self, pairs: Pairs, batch_size: int, max_examples: int | None = None, by_length: bool = True):
        n = len(pairs) if max_examples is None else min(max_examples, len(pairs))
        order = np.arange(n)
        if by_length:
            order = order[np.argsort([len(pairs.src[i]) * 4096 + len(pairs.tgt[i]) for i in order], kind="stable")]
        fill = -len(order) % batch_size
        self.batches = np.concatenate([order, np.full(fill, -1)]).reshape(-1, batch_size).astype(np.int32)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict:
        return {"rows": self.batches[index], "index": index}


def train_dataset(pairs: Pairs, cfg: Seq2SeqConfig, batch_size: int, *, pad_id: int, start_id: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """The endless, seeded, length-bucketed training stream (global batch_size rows, this process's slice)."""
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the process count {process_count}")
    collate = Collate(pairs, cfg, pad_id, start_id, process_index, process_count)
    return grain.MapDataset.source(TrainBatches(pairs, batch_size, cfg.seed)).map(collate)


def eval_dataset(pairs: Pairs, cfg: Seq2SeqConfig, batch_size: int, *, pad_id: int, start_id: int,
                 max_examples: int | None = None, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Each example once (the first max_examples), length-sorted batches; `rows` maps rows back to examples."""
    collate = Collate(pairs, cfg, pad_id, start_id, process_index, process_count)
    return grain.MapDataset.source(EvalBatches(pairs, batch_size, max_examples)).map(collate)
