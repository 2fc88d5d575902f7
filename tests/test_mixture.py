"""Training on a weighted mixture of prepared directories: exact proportions, determinism, exact resume, logging."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxformer.config import DataConfig
from jaxformer.data.pipeline import MixturePattern, make_mixture_dataset
from jaxformer.data.prepare import prepare
from jaxformer.data.shards import SplitTokens
from jaxformer.train.lm import train
from jaxformer.train.metrics import read_metrics
from tests.conftest import tiny_run


def test_pattern_holds_each_source_s_share_exactly_and_walks_each_source_in_order():
    weights = [0.55, 0.3, 0.15]
    p = MixturePattern(weights, seed=5)
    n = 3 * p.PERIOD + 1234
    rows = [p[i] for i in range(n)]
    sources = np.array([k for k, _ in rows])
    for k in range(3):
        assert [j for s, j in rows if s == k] == list(range(int((sources == k).sum())))  # its rows, in order
        assert (sources[:p.PERIOD] == k).sum() == round(weights[k] * p.PERIOD)  # exact in every period
    np.testing.assert_array_equal(p.rows(n), np.bincount(sources, minlength=3))
    assert [q[0] for q in (MixturePattern(weights, seed=5)[i] for i in range(50))] == sources[:50].tolist()
    assert [q[0] for q in (MixturePattern(weights, seed=6)[i] for i in range(50))] != sources[:50].tolist()


def test_mixture_batches_follow_the_pattern():
    """Two synthetic sources whose tokens say where they came from: every row is from its pattern's source."""
    T = 8
    splits = [SplitTokens([np.full(40 * T + 1, 1 + 10 * k, np.uint16)], [np.array([0])], 40 * T) for k in range(2)]
    ds, pattern = make_mixture_dataset(splits, [0.75, 0.25], seq_len=T, batch_size=8, packed=False, seed=3)
    got = np.concatenate([ds[b]["inputs"][:, 0] for b in range(100)])  # 800 rows: past each source's length
    want = np.array([1 + 10 * pattern[i][0] for i in range(800)])
    np.testing.assert_array_equal(got, want)


def test_mixture_config_is_checked():
    assert DataConfig(mixture="a:3,b:1").mixture_weights() == [("a", 0.75), ("b", 0.25)]
    assert DataConfig(mixture={"a": 1, "b": 1}).mixture == "a:1,b:1"  # a YAML mapping
    for bad in ("a", "a:0", "a:x", "a:1,a:2"):
        with pytest.raises(ValueError, match="data.mixture"):
            DataConfig(mixture=bad)
    with pytest.raises(ValueError, match="data.mixture=.*is a URL"):
        DataConfig(mixture="gs://bucket/web:1")


@pytest.fixture(scope="module")
def second_source(tmp_path_factory, jsonl_file, tokenizer):
    out = tmp_path_factory.mktemp("jsonl_source")
    prepare([jsonl_file] * 1, tokenizer, out, jsonl_field="body", val_fraction=0.3, progress=False)
    return out


def _mixture_run(run_dir, shards_dir, second_source, **train_kw):
    cfgs = tiny_run(run_dir, shards_dir, **{"steps": 12, "ckpt_every": 6, "eval_every": 6, **train_kw})
    mixture = f"{shards_dir}:0.75,{second_source}:0.25"
    return {**cfgs, "data": dataclasses.replace(cfgs["data"], mixture=mixture, seq_len=16)}


def test_mixture_run_resumes_bitwise_and_logs_tokens_per_source(tmp_path, shards_dir, second_source):
    straight = train(_mixture_run(tmp_path / "straight", shards_dir, second_source), progress=False)
    train(_mixture_run(tmp_path / "split", shards_dir, second_source, steps=6), progress=False)
    train(_mixture_run(tmp_path / "split", shards_dir, second_source), resume=True, progress=False)
    loss = {d: {r["step"]: r["loss"] for r in read_metrics(tmp_path / d) if r["kind"] == "train"}
            for d in ("straight", "split")}
    assert loss["straight"] == loss["split"] and len(loss["straight"]) == 12  # bitwise: JSON floats compared

    last = [r for r in read_metrics(tmp_path / "straight") if r["kind"] == "train"][-1]
    names = [k for k in last if k.startswith("tokens/")]
    assert len(names) == 2
    counts = np.array([last[k] for k in names])
    assert counts.sum() == 12 * 4 * 16  # steps x batch x seq_len
    rows = [sum(MixturePattern([0.75, 0.25], seed=0)[i][0] == k for i in range(48)) for k in range(2)]
    np.testing.assert_array_equal(counts, np.array(rows) * 16)  # the rows each source gave, counted one by one
    assert "val_loss" in straight and all(f"val_loss/{n.split('/', 1)[1]}" in straight for n in names)
    per_source = [straight[f"val_loss/{n.split('/', 1)[1]}"] for n in names]
    assert straight["val_loss"] == pytest.approx(0.75 * per_source[0] + 0.25 * per_source[1], rel=1e-9)


def test_mixture_sources_must_share_a_tokenizer(tmp_path, shards_dir, corpus_dir):
    from jaxformer.data.tokenizer import train_tokenizer
    from jaxformer.data.shards import iter_sources_text

    other = train_tokenizer(iter_sources_text([corpus_dir]), 300, show_progress=False)
    prepare([corpus_dir], other, tmp_path / "other", progress=False)
    cfgs = tiny_run(tmp_path / "run", shards_dir, steps=2)
    cfgs["data"] = dataclasses.replace(cfgs["data"], mixture=f"{shards_dir}:1,{tmp_path / 'other'}:1")
    with pytest.raises(ValueError, match="another tokenizer"):
        train(cfgs, progress=False)
    cfgs["data"] = dataclasses.replace(cfgs["data"], mixture=f"{shards_dir}:1,{tmp_path / 'missing'}:1")
    with pytest.raises(FileNotFoundError, match="jaxformer prepare"):
        train(cfgs, progress=False)
