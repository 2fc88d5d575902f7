"""`jaxformer prepare` across worker processes and tasks (machines), and its deduplication.

Workers must not change the output at all; tasks split the files and their shards join into one dataset that
holds the same documents and tokens as one process made; dedup keeps the first copy of each duplicate group.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from jaxformer.data.corpus import iter_documents
from jaxformer.data.pipeline import make_dataset
from jaxformer.data.prepare import prepare, task_from_env
from jaxformer.data.shards import open_split, read_manifest


def _documents(out) -> dict[tuple, int]:
    """{document's tokens (EOS included): how many times} over both splits of a dataset."""
    found: dict[tuple, int] = {}
    for split in ("train", "val"):
        s = open_split(out, split)
        for tokens, starts in zip(s.shards, s.doc_starts):
            for a, b in zip(starts, [*starts[1:], tokens.size]):
                key = tuple(np.asarray(tokens[a:b]).tolist())
                found[key] = found.get(key, 0) + 1
    return found


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus_dir, jsonl_file, tokenizer):
    out = tmp_path_factory.mktemp("one")
    prepare([corpus_dir, jsonl_file], tokenizer, out, jsonl_field="body", val_fraction=0.25, progress=False)
    return out


def test_workers_write_the_same_shards_as_one_process(one_process, corpus_dir, jsonl_file, tokenizer, tmp_path):
    m = prepare([corpus_dir, jsonl_file], tokenizer, tmp_path, jsonl_field="body", val_fraction=0.25, workers=2,
                progress=False)
    assert m["task"]["workers"] == 2
    ref = read_manifest(one_process)
    assert m["splits"] == ref["splits"] and m["corpus"] == ref["corpus"]
    for shard in [s for split in m["splits"].values() for s in split["shards"]]:
        for name in (shard["tokens"], shard["docs"]):
            assert (tmp_path / name).read_bytes() == (one_process / name).read_bytes(), name


def test_two_tasks_of_two_workers_hold_what_one_process_holds(one_process, corpus_dir, jsonl_file, tokenizer,
                                                               tmp_path):
    out = tmp_path / "shared"

    def task(i):
        prepare([corpus_dir, jsonl_file], tokenizer, out, jsonl_field="body", val_fraction=0.25, workers=2,
                tasks=2, task=i, progress=False)

    task(1)  # tasks finish in any order
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 tasks.*tasks \[0\] have not finished"):
        read_manifest(out)
    task(0)
    parts = sorted(p.name for p in out.glob("manifest-task*.json"))
    assert parts == ["manifest-task00000-of-00002.json", "manifest-task00001-of-00002.json"]
    joined, ref = read_manifest(out), read_manifest(one_process)
    assert [t["task"]["index"] for t in joined["tasks"]] == [0, 1]
    assert 0 < joined["tasks"][0]["documents"] < ref["corpus"]["documents"]
    for split in ("train", "val"):
        for k in ("n_tokens", "n_docs", "n_bytes"):
            assert joined["splits"][split][k] == ref["splits"][split][k], (split, k)
    assert _documents(out) == _documents(one_process)  # the same documents, each in its split
    windows = make_dataset(open_split(out, "train"), seq_len=32, batch_size=4, seed=0)[0]  # trainable as one
    assert windows["inputs"].shape == (4, 32)


def test_task_directory_errors(corpus_dir, tokenizer, tmp_path):
    prepare([corpus_dir], tokenizer, tmp_path / "a", tasks=2, task=0, progress=False)
    with pytest.raises(ValueError, match="split 1 other ways"):
        prepare([corpus_dir], tokenizer, tmp_path / "a", tasks=3, task=0, progress=False)
    prepare([corpus_dir], tokenizer, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="prepared in one task"):
        prepare([corpus_dir], tokenizer, tmp_path / "b", tasks=2, task=1, progress=False)
    with pytest.raises(ValueError, match=r"--task must be in \[0, --tasks\)"):
        prepare([corpus_dir], tokenizer, tmp_path / "c", tasks=2, task=2, progress=False)
    other = tmp_path / "a" / "manifest-task00001-of-00002.json"  # a task made with another --val-fraction
    shutil.copy(tmp_path / "a" / "manifest-task00000-of-00002.json", other)
    raw = json.loads(other.read_text())
    other.write_text(json.dumps({**raw, "task": {**raw["task"], "index": 1}, "val_fraction": 0.5}))
    with pytest.raises(ValueError, match="disagree on val_fraction"):
        read_manifest(tmp_path / "a")


def test_tasks_from_a_slurm_array(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert task_from_env(None, None) == (3, 8)
    assert task_from_env(2, 1) == (1, 2)  # explicit arguments win
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert task_from_env(None, None) == (0, 1)


def _paragraphs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(400)]
    return [" ".join(rng.choice(words, 120)) + "." for _ in range(n)]


@pytest.mark.parametrize("workers", [1, 2])
def test_dedup_exact_and_near(tmp_path, tokenizer, workers):
    base = _paragraphs(6, seed=0)
    exact = [base[0].upper(), "  ".join(base[1].split())]  # case and whitespace differ: the same text
    near = [base[2].replace(base[2].split()[5], "changed", 1), base[3] + " one more sentence here."]
    src = tmp_path / "src"
    src.mkdir()
    for name, texts in (("a.jsonl", base[:3]), ("b.jsonl", exact + base[3:]), ("c.jsonl", near)):
        (src / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    kept = {}
    for method in ("none", "exact", "minhash"):
        m = prepare([src], tokenizer, tmp_path / method, dedup=method, workers=workers, val_fraction=0.2,
                    progress=False)
        kept[method] = m["dedup"]
        assert m["corpus"]["documents"] == 10  # read; the manifest's dedup entry says what was dropped
        assert sum(_documents(tmp_path / method).values()) == m["dedup"]["kept"]
    assert kept["none"] == {"method": "none", "kept": 10, "removed": 0}
    assert (kept["exact"]["kept"], kept["exact"]["removed"]) == (8, 2)
    assert (kept["minhash"]["kept"], kept["minhash"]["removed"]) == (6, 4) and kept["minhash"]["threshold"] == 0.8
    first = [d.text for d in iter_documents([src / "a.jsonl"])]
    assert tuple(tokenizer.encode(first[0]) + [tokenizer.eos_id]) in _documents(tmp_path / "exact")  # first copy


def test_dedup_name_is_checked(tmp_path, tokenizer, corpus_dir):
    with pytest.raises(ValueError, match="dedup must be one of"):
        prepare([corpus_dir], tokenizer, tmp_path, dedup="fuzzy", progress=False)


@pytest.mark.skipif(os.cpu_count() < 2, reason="a worker crash needs a second process")
def test_a_file_error_in_a_worker_names_the_file(tmp_path, tokenizer):
    import gzip

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jsonl").write_text(json.dumps({"text": f"document {i}"}) + "\n")
    (src / "2.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    with pytest.raises(ValueError, match=r"cannot read .*2\.jsonl\.gz"):
        prepare([src], tokenizer, tmp_path / "out", workers=2, progress=False)
