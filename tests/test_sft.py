"""Supervised fine-tuning data: records, chat-template rendering, loss masks, packing, zero prompt gradient."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.data.tokenizer import Tokenizer
from jaxformer.finetune import sft
from jaxformer.models import DecoderLM
from jaxformer.train.losses import cross_entropy_sums
from jaxformer.train.step import lm_loss, make_train_step


@pytest.fixture(scope="module")
def tok(tokenizer):
    return Tokenizer(tokenizer.tok)  # jaxformer's default chat template, the reserved role tokens


def _ids(tok, text):
    return tok.tok.encode(text, add_special_tokens=False).ids


def test_records_both_formats_and_clear_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        "",
        json.dumps({"prompt": "2+2?", "completion": "4", "system": "be brief"}),
    ]) + "\n")
    recs = sft.read_records(f)
    assert recs[1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": "4"}]
    bad = {"a.jsonl": ("{not json", r"a.jsonl:1: not a JSON object"),
           "b.jsonl": (json.dumps({"text": "x"}), r"b.jsonl:1: expected \"messages\" or \"prompt\""),
           "c.jsonl": (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "no assistant message"),
           "d.jsonl": (json.dumps({"messages": [{"role": "user"}]}), r"messages\[0\] must be")}
    for name, (line, msg) in bad.items():
        (tmp_path / name).write_text(line + "\n")
        with pytest.raises(sft.SFTDataError, match=msg):
            sft.read_records(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sft.read_records(tmp_path / "missing.jsonl")


def test_render_masks_exactly_the_replies(tok):
    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def f(x): return x"},
            {"role": "assistant", "content": "Identity."}, {"role": "user", "content": "and g?"},
            {"role": "assistant", "content": "Return g of x."}]
    ids, trained = sft.render(msgs, tok)
    # the reference, written out by hand from the documented template
    parts = [("<|system|>You write Python.<|end|><|user|>def f(x): return x<|end|><|assistant|>", False),
             ("Identity.<|end|>", True), ("<|user|>and g?<|end|><|assistant|>", False), ("Return g of x.<|end|>", True)]
    want_ids = [i for text, _ in parts for i in _ids(tok, text)]
    want_mask = [m for text, m in parts for _ in _ids(tok, text)]
    assert ids == want_ids and trained == want_mask
    assert ids == _ids(tok, "".join(t for t, _ in parts))  # piecewise tokenization == whole-text tokenization
    end = tok.tok.token_to_id("<|end|>")
    assert sum(1 for i, t in zip(ids, trained) if t and i == end) == 2  # each reply ends its turn
    prompt = tok.encode_chat(msgs[:2])  # what the server feeds for the first reply
    assert ids[:len(prompt)] == prompt and not any(trained[:len(prompt)]) and trained[len(prompt)]


def test_pack_layout_matches_packed_windows():
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(23):
        n = int(rng.integers(3, 20))
        trained = np.zeros(n, bool)
        trained[int(rng.integers(1, n)):] = True
        examples.append((rng.integers(10, 99, n).astype(np.int32), trained))
    T = 24
    rows = sft.pack(examples, T, packed=True, pad_id=0)
    assert all(rows[k].shape[1] == T for k in sft.ROW_KEYS)
    assert len(rows["inputs"]) < len(examples)  # several examples share a row
    found = []
    for r in range(len(rows["inputs"])):
        tokens = np.concatenate([rows["inputs"][r], rows["targets"][r][-1:]])  # the row's T + 1 tokens
        seg = rows["segment_ids"][r]
        np.testing.assert_array_equal(rows["targets"][r], tokens[1:])
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # contiguous
            assert list(rows["positions"][r][idx]) == list(range(len(idx)))  # restart per example
            # the example's last token is an input (predicting across the boundary, masked) unless it
            # ends the row, where it is only the final target
            lengths = [len(idx)] + ([len(idx) + 1] if idx[-1] == T - 1 else [])
            match = [(n, e) for n in lengths for e in examples
                     if len(e[0]) == n and np.array_equal(e[0], tokens[idx[0]:idx[0] + n])]
            assert len(match) == 1
            n, (ids, trained) = match[0]
            found.append(tuple(ids))
            want = np.zeros(len(idx), np.float32)
            want[:n - 1] = trained[1:]
            np.testing.assert_array_equal(rows["loss_mask"][r][idx], want)
        assert not rows["loss_mask"][r][seg == 0].any()  # padding never trains
    assert sorted(found) == sorted(tuple(e[0]) for e in examples)  # every example exactly once
    single = sft.pack(examples, T, packed=False)
    assert len(single["inputs"]) == len(examples) and single["segment_ids"].max() == 1


def test_split_truncation_and_dataset(tok):
    recs = [[{"role": "user", "content": f"q{i} " * (1 + i % 5)}, {"role": "assistant", "content": f"a{i}"}]
            for i in range(60)]
    train, val = sft.split_records(recs, 0.25)
    assert len(train) + len(val) == 60 and 5 <= len(val) <= 25
    assert sft.split_records(list(reversed(recs)), 0.25)[1] == list(reversed(val))  # by content, not order
    long = [[{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}]]
    examples, stats = sft.tokenize(long + recs[:2], tok, 33)
    assert stats["dropped_no_reply"] == 1 and stats["examples"] == 2  # truncation ate the whole reply
    rows, stats = sft.build_rows(recs, tok, 32)
    assert stats["rows"] == len(rows["inputs"]) and 0 < stats["fill"] <= 1
    ds = sft.make_sft_dataset(rows, batch_size=4, seed=1)
    assert ds[0]["inputs"].shape == (4, 32)
    batches = list(sft.eval_batches(rows, 4))
    assert sum(float(b["loss_mask"].sum()) for b in batches) == float(rows["loss_mask"].sum())


def test_prompt_tokens_get_zero_loss_and_zero_gradient(tok):
    recs = [[{"role": "user", "content": f"Add {i} and {i + 1}."}, {"role": "assistant", "content": f"{2 * i + 1}."}]
            for i in range(8)]
    rows, _ = sft.build_rows(recs, tok, 32)
    batch = {k: v[:4] for k, v in rows.items()}
    mask = batch["loss_mask"]
    assert 0 < mask.sum() < (batch["segment_ids"] > 0).sum()
    cfg = ModelConfig.llama(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=32)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    logits = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
    g = jax.grad(lambda lg: cross_entropy_sums(lg, jnp.asarray(batch["targets"]), jnp.asarray(mask))[0])(logits)
    g = np.asarray(g)
    assert np.abs(g[mask == 0]).max() == 0 and np.abs(g[mask == 1]).max() > 0

    graphdef, params = nnx.split(model)
    tx = optax.sgd(1.0)
    step = jax.jit(make_train_step(lm_loss(graphdef, packed=True), tx))
    ref_params, _, ref = step(params, tx.init(params), batch)
    scrambled = dict(batch, targets=np.where(mask == 0, (batch["targets"] + 7) % cfg.vocab_size, batch["targets"]))
    got_params, _, got = step(params, tx.init(params), scrambled)  # every prompt target changed: nothing may change
    assert float(got["loss"]) == float(ref["loss"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(ref_params)))
    one = np.argwhere(mask == 1)[0]
    reply = dict(batch, targets=batch["targets"].copy())
    reply["targets"][tuple(one)] = (reply["targets"][tuple(one)] + 7) % cfg.vocab_size
    assert float(step(params, tx.init(params), reply)[2]["loss"]) != float(ref["loss"])  # a reply target does count
