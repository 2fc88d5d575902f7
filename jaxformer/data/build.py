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
