"""Tokenizer training and loading, corpus reading, and the shard writer/reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxformer.data import corpus, formats
from jaxformer.data.corpus import CorpusStats, iter_documents
from jaxformer.data.prepare import prepare
from jaxformer.data.shards import open_split, read_manifest, split_of, token_dtype
from jaxformer.data.tokenizer import BOS, CHAT_TOKENS, EOS, PAD, load_tokenizer, train_tokenizer


def test_tokenizer_round_trip_and_specials(tokenizer, corpus_dir):
    text = (corpus_dir / "textwrap.py").read_text() + "\n# unicode: héllo wörld — 你好 🐍\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode()) / 1.5  # BPE actually merged something
    assert tokenizer.vocab_size == 400
    for tok in (PAD, BOS, EOS, *CHAT_TOKENS):
        assert tokenizer.token_id(tok) is not None
    assert len({tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}) == 3


def test_tokenizer_loads_in_transformers_identically(tokenizer, tmp_path, corpus_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = tokenizer.save(tmp_path)
    mine = load_tokenizer(tmp_path)
    hf_file = PreTrainedTokenizerFast(tokenizer_file=str(path))
    hf_dir = AutoTokenizer.from_pretrained(str(tmp_path))
    rng = np.random.default_rng(0)
    src = (corpus_dir / "shlex.py").read_text()
    for _ in range(5):
        a = int(rng.integers(0, len(src) - 500))
        text = src[a:a + 500]
        ids = mine.encode(text)
        assert hf_file.encode(text, add_special_tokens=False) == ids
        assert hf_dir.encode(text, add_special_tokens=False) == ids
        assert hf_dir.decode(ids) == text
    assert hf_dir.eos_token == EOS and hf_dir.pad_token == PAD and hf_dir.bos_token == BOS
    chat = hf_dir.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>hi<|end|><|assistant|>"


def test_tokenizer_vocab_too_small_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(FileNotFoundError, match="tokenizer train"):
        load_tokenizer(tmp_path / "nope")


def test_corpus_skips_and_counts_bad_inputs(corpus_dir, jsonl_file):
    stats = CorpusStats()
    docs = list(iter_documents([corpus_dir], stats=stats))
    assert stats.skipped_empty == 1 and stats.skipped_undecodable == 1
    assert stats.documents == len(docs) > 5
    stats = CorpusStats()
    docs = list(iter_documents([jsonl_file], jsonl_field="body", stats=stats))
    assert [d.text for d in docs] == [f"def f{i}(x):\n    return x * {i}\n" for i in range(20)]
    assert stats.skipped_bad_record == 2 and stats.skipped_empty == 1


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents([tmp_path / "missing"]))


def test_stdlib_source_is_python_files_only():
    files = corpus.list_files(["stdlib"])
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_shards_hold_every_document_then_eos(shards_dir, corpus_dir, tokenizer):
    """Independent check: re-encode each document and rebuild both splits from scratch."""
    manifest = read_manifest(shards_dir)
    val_fraction = manifest["val_fraction"]
    expected = {"train": [], "val": []}
    for doc in iter_documents([corpus_dir]):
        expected[split_of(doc.doc_id, val_fraction)].append(tokenizer.encode(doc.text) + [tokenizer.eos_id])
    for split in ("train", "val"):
        tokens = open_split(shards_dir, split)
        got = np.concatenate(tokens.shards) if tokens.shards else np.zeros(0)
        want = np.concatenate([np.asarray(d) for d in expected[split]]) if expected[split] else np.zeros(0)
        np.testing.assert_array_equal(got, want)
        starts = np.concatenate(tokens.doc_starts) if tokens.doc_starts else np.zeros(0)
        assert len(starts) == len(expected[split]) == manifest["splits"][split]["n_docs"]
    assert manifest["dtype"] == "uint16" and manifest["tokenizer_sha256"] == tokenizer.sha256()
    assert manifest["corpus"]["skipped_empty"] == 1 and manifest["corpus"]["skipped_undecodable"] == 1
    assert load_tokenizer(shards_dir).sha256() == tokenizer.sha256()


def test_split_is_by_document_and_deterministic():
    ids = [f"/x/doc{i}.py" for i in range(2000)]
    splits = [split_of(i, 0.1) for i in ids]
    assert splits == [split_of(i, 0.1) for i in ids]
    assert 120 < splits.count("val") < 280


def test_token_dtype_by_vocab():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_shard_rollover_and_large_files_stream_in_pieces(tmp_path, tokenizer, monkeypatch):
    big = tmp_path / "src" / "big.py"
    big.parent.mkdir()
    lines = [f"value_{i} = {i} * {i}  # line {i}\n" for i in range(3000)]
    big.write_text("".join(lines))
    for i in range(6):
        (tmp_path / "src" / f"small{i}.py").write_text(f"def g{i}():\n    return {i}\n")
    monkeypatch.setattr(formats, "PIECE_CHARS", 4096)  # big.py arrives in ~20 pieces
    out = tmp_path / "shards"
    m = prepare([tmp_path / "src"], tokenizer, out, val_fraction=0.01, max_shard_tokens=3000, batch_bytes=5000,
                progress=False)
    train = m["splits"]["train"]
    assert train["n_docs"] + m["splits"]["val"]["n_docs"] == 7
    assert len(train["shards"]) >= 2  # rolled over past max_shard_tokens
    split = open_split(out, split_of("big.py", 0.01))  # ids are paths relative to the source directory
    allt = np.concatenate(split.shards)
    eos = np.flatnonzero(allt == tokenizer.eos_id)
    docs = np.split(allt, eos + 1)[:-1]
    texts = [tokenizer.decode(d[:-1]) for d in docs]
    assert "".join(lines) in texts  # the pieces form one document again


def test_prepare_reports_json(tmp_path, tokenizer, jsonl_file):
    m = prepare([jsonl_file], tokenizer, tmp_path, jsonl_field="body", val_fraction=0.2, progress=False)
    assert m["corpus"]["documents"] == 20 and m["corpus"]["skipped_bad_record"] == 2
    assert json.loads((tmp_path / "manifest.json").read_text()) == m


def test_split_does_not_depend_on_where_the_corpus_lives(tmp_path, corpus_dir):
    import shutil

    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(corpus_dir, moved)
    here = [(d.doc_id, d.text) for d in iter_documents([corpus_dir])]
    there = [(d.doc_id, d.text) for d in iter_documents([moved])]
    assert here == there and here[0][0] == "bisect.py"
