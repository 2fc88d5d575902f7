"""Make a run's data directory ready: tokenizer (trained or given) and token shards, built once."""

from __future__ import annotations

import logging
from pathlib import Path

from jaxformer.config import DataConfig
from jaxformer.data.corpus import CorpusStats
from jaxformer.data.prepare import prepare
from jaxformer.data.shards import has_dataset, iter_sources_text, read_manifest
from jaxformer.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


def ensure_data(cfg: DataConfig, vocab_size: int, *, progress: bool = True) -> tuple[Path, Tokenizer]:
    """Return (data_dir, tokenizer), training the tokenizer and writing shards only when missing."""
    data_dir = Path(cfg.data_dir)
    if has_dataset(data_dir):
        read_manifest(data_dir)  # a split prepare with tasks still missing says so here
        tok = load_tokenizer(data_dir)
        if cfg.tokenizer and load_tokenizer(cfg.tokenizer).sha256() != read_manifest(data_dir)["tokenizer_sha256"]:
            raise ValueError(f"{data_dir} holds shards made with another tokenizer than {cfg.tokenizer}; "
                             "point data.data_dir at a new directory or delete it to re-prepare")
        return data_dir, tok
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        print(f"training a {vocab_size}-token byte-level BPE tokenizer on {list(cfg.sources)} ...", flush=True)
        tok = train_tokenizer(iter_sources_text(cfg.sources, cfg.jsonl_field), vocab_size, show_progress=progress)
    print(f"tokenizing {list(cfg.sources)} into {data_dir} ...", flush=True)
    manifest = prepare(cfg.sources, tok, data_dir, val_fraction=cfg.val_fraction, jsonl_field=cfg.jsonl_field,
                       progress=progress)
    print(f"prepared {manifest['splits']['train']['n_tokens']:,} train / {manifest['splits']['val']['n_tokens']:,} "
          f"val tokens from {CorpusStats(**manifest['corpus']).describe()}", flush=True)
    return data_dir, load_tokenizer(data_dir)


def open_mixture(cfg: DataConfig) -> tuple[list[tuple[str, Path, float]], Tokenizer]:
    """([(name, directory, weight)], the shared tokenizer) of data.mixture; every directory must hold a prepared
    dataset made with the same tokenizer."""
    sources, seen = [], {}
    for d, weight in cfg.mixture_weights():
        path = Path(d)
        if not has_dataset(path):
            raise FileNotFoundError(f"data.mixture source {d} holds no prepared dataset: make it with `jaxformer "
                                    f"prepare --input ... --tokenizer TOK --out {d}` (the same TOK for every source)")
        name = path.name or "data"
        seen[name] = seen.get(name, 0) + 1
        sources.append((name if seen[name] == 1 else f"{name}{seen[name]}", path, weight))
    hashes = {str(p): read_manifest(p)["tokenizer_sha256"] for _, p, _ in sources}
    if len(set(hashes.values())) > 1:
        first = sources[0][1]
        other = next(p for p, h in hashes.items() if h != hashes[str(first)])
        raise ValueError(f"data.mixture: {other} was prepared with another tokenizer than {first}; prepare every "
                         "source with the same --tokenizer")
    return sources, load_tokenizer(sources[0][1])

