"""grain input pipelines over token shards: fixed windows or packed documents.

Each example is a window of seq_len + 1 consecutive tokens from one shard, split into
inputs/targets. In packed mode the window keeps its document structure: `segment_ids` number the
documents inside the window (so attention never crosses a boundary), `positions` restart at each
document start (and at the window start), and `loss_mask` drops the one target per boundary that
would predict the next document's first token from the previous one's EOS.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator

import grain
import numpy as np

from jaxformer.data.shards import SplitTokens


class WindowSource:
    """Random access to non-overlapping windows of seq_len + 1 tokens (windows never cross shards)."""

    def __init__(self, split: SplitTokens, seq_len: int, *, packed: bool):
        self.split, self.seq_len, self.packed = split, seq_len, packed
        per_shard = [max(0, (int(s.size) - 1) // seq_len) for s in split.shards]
        self.cum = np.cumsum([0] + per_shard)
        if self.cum[-1] == 0:
            raise ValueError(f"split has {split.n_tokens} tokens: too few for one window of seq_len+1="
                             f"{seq_len + 1}; use a shorter seq_len or more data")

    def __len__(self) -> int:
        return int(self.cum[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        shard = int(np.searchsorted(self.cum, index, side="right") - 1)
        start = (index - int(self.cum[shard])) * self.seq_len
        tokens = np.asarray(self.split.shards[shard][start:start + self.seq_len + 1], dtype=np.int32)  # [T+1]
        T = self.seq_len
        if not self.packed:
            return {"inputs": tokens[:-1], "targets": tokens[1:],
                    "positions": np.arange(T, dtype=np.int32), "segment_ids": np.ones(T, np.int32),
                    "loss_mask": np.ones(T, np.float32)}
        offsets = np.arange(start, start + T + 1)
        starts = self.split.doc_starts[shard]
        doc = np.searchsorted(starts, offsets, side="right") - 1  # document index of each token
        doc_start = np.maximum(starts[doc], start)  # a document cut by the window restarts at the window
        return {"inputs": tokens[:-1], "targets": tokens[1:],
                "positions": (offsets[:-1] - doc_start[:-1]).astype(np.int32),
                "segment_ids": (doc[:-1] - doc[0] + 1).astype(np.int32),
                "loss_mask": (doc[:-1] == doc[1:]).astype(np.float32)}


class ProcessRows(grain.MapDataset):
    """This process's rows of every global batch: process p of P takes rows [p*b, (p+1)*b) of each
    batch of B = P*b, so P processes together see exactly the batches one process would."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self.global_batch, self.local = global_batch, global_batch // process_count
        self.offset = process_index * self.local

    def __len__(self) -> int:
        return len(self._parent) // self.global_batch * self.local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        b, r = divmod(index, self.local)
        return self._parent[b * self.global_batch + self.offset + r]


def make_dataset(split: SplitTokens, *, seq_len: int, batch_size: int, packed: bool = True, seed: int = 0,
                 shuffle: bool = True, repeat: bool = True, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
    """Windows -> seeded shuffle (new order each epoch) -> this process's rows -> local batches.

    `batch_size` is global; each process gets batches of batch_size // process_count rows.
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the process count {process_count}")
    ds = grain.MapDataset.source(WindowSource(split, seq_len, packed=packed))
    if len(ds) < batch_size:
        raise ValueError(f"only {len(ds)} windows of {seq_len + 1} tokens, fewer than batch_size={batch_size}; "
                         "lower the batch size or seq_len, or add data")
    return batch_rows(ds, batch_size, shuffle=shuffle, seed=seed, repeat=repeat, process_index=process_index,
                      process_count=process_count)


def batch_rows(ds: grain.MapDataset, batch_size: int, *, shuffle: bool, seed: int, repeat: bool,
               process_index: int, process_count: int) -> grain.MapDataset:
    """Rows -> seeded shuffle (a new order each epoch) -> repeat -> this process's rows -> local batches."""
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    if process_count > 1:
        ds = ProcessRows(ds, batch_size, process_index, process_count)
    return ds.batch(batch_size // process_count, drop_remainder=True)


class MixturePattern:
    """Which source each row of a mixture comes from: a seeded shuffle of one period of PERIOD rows holding
    round(w_k * PERIOD) rows of source k (largest remainders), repeated. Any row's (source, row within that
    source) is O(1), so the mixture is a grain MapDataset with exact resume, and every process can count what
    each source has contributed after n rows without reading them."""

    PERIOD = 10_000  # weights are kept to 1 / PERIOD

    def __init__(self, weights: list[float], seed: int):
        w = np.asarray(weights, np.float64) / np.sum(weights)
        quota = np.floor(w * self.PERIOD).astype(np.int64)
        quota[np.argsort(-(w * self.PERIOD - quota), kind="stable")[:self.PERIOD - quota.sum()]] += 1
        if (quota == 0).any():
            raise ValueError(f"mixture weights {list(weights)} give a source less than 1 / {self.PERIOD} of the rows")
        self.quota = quota  # [K] rows per period
        self.source = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(w)), quota))  # [PERIOD]
        self.rank = np.zeros(self.PERIOD, np.int64)  # position of each row among its source's rows in the period
        for k in range(len(w)):
            self.rank[self.source == k] = np.arange(quota[k])
        self.before = np.zeros((len(w), self.PERIOD + 1), np.int64)  # [K, r]: rows of source k among the first r
        self.before[:, 1:] = np.cumsum(self.source[None, :] == np.arange(len(w))[:, None], axis=1)

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> tuple[int, int]:
        period, r = divmod(index, self.PERIOD)
        k = int(self.source[r])
        return k, int(period * self.quota[k] + self.rank[r])

    def rows(self, n: int) -> np.ndarray:
        """[K] rows each source has given among the mixture's first n rows."""
        period, r = divmod(n, self.PERIOD)
        return period * self.quota + self.before[:, r]


def make_mixture_dataset(splits: list[SplitTokens], weights: list[float], *, seq_len: int, batch_size: int,
                         packed: bool = True, seed: int = 0, process_index: int = 0,
                         process_count: int = 1) -> tuple[grain.MapDataset, MixturePattern]:
    """Windows of several sources, each shuffled (its own seed, a new order each epoch) and repeated, interleaved
    by MixturePattern, then this process's rows, batched; and the pattern (to count rows per source)."""
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the process count {process_count}")
    sources = [grain.MapDataset.source(WindowSource(s, seq_len, packed=packed)).shuffle(seed=seed + 1000 * k)
               .repeat(None) for k, s in enumerate(splits)]
    pattern = MixturePattern(weights, seed)
    ds = grain.MapDataset.select_from_datasets(sources, pattern)
    return batch_rows(ds, batch_size, shuffle=False, seed=seed, repeat=False, process_index=process_index,
                      process_count=process_count), pattern


class DataIterator:
    """An iterator over batches whose position can be saved in and restored from a checkpoint."""

    def __init__(self, ds: grain.MapDataset):
        self._it = iter(ds.to_iter_dataset())

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return self._it.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state)


class MixtureIterator(DataIterator):
    """A mixture's batches; scalars() counts the tokens each source has given so far (from the position, so
    resumes and rollbacks count what was really read)."""

    def __init__(self, ds: grain.MapDataset, pattern: MixturePattern, names: list[str], batch_size: int,
                 seq_len: int):
        super().__init__(ds)
        self.pattern, self.names, self.batch_size, self.seq_len = pattern, names, batch_size, seq_len

    def scalars(self) -> dict[str, int]:
        """{"tokens/<source>": tokens so far} (global batches: every process counts the same)."""
        rows = self.pattern.rows(int(self.get_state()["next_index"]) * self.batch_size)
        return {f"tokens/{name}": int(r) * self.seq_len for name, r in zip(self.names, rows)}

