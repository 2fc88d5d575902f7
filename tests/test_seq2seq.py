"""Seq2seq around the model: code2doc, the bucketed grain pipeline, greedy and beam search, BLEU/ROUGE, and the
whole loop (`jaxformer train` on an encoder-decoder config, `jaxformer eval`, resume) learning a tiny task."""

from __future__ import annotations

import itertools
import json
import math
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import EncDecConfig, Seq2SeqConfig
from jaxformer.data.pipeline import DataIterator
from jaxformer.models.encdec import EncoderDecoder
from jaxformer.seq2seq.beam import beam_search, greedy_decode
from jaxformer.seq2seq.code2doc import function_examples, module_split, name_baseline
from jaxformer.seq2seq.data import (
    Pairs,
    TrainBatches,
    bucket,
    detruecase,
    eval_dataset,
    split_identifiers,
    tokenize_pairs,
    train_dataset,
    truecase,
)
from jaxformer.seq2seq.metrics import bleu, rouge
from jaxformer.train.metrics import read_metrics
from tests.test_cli import main_in_process

# ----------------------------------------------------------------------------- code2doc

MODULE = textwrap.dedent('''
    import os


    def add(x, y):
        """Add two numbers together.

        Longer explanation that is not the target.
        """
        total = x + y
        return total


    class Box:
        @property
        def size(self):
            """Return the size of the box."""
            return self._n

        def only_doc(self):
            """Nothing but a docstring here."""

        def inline(self): "A docstring on the def line."; return 1


    def undocumented():
        return 1


    def short():
        """Two words."""
        return 2
''')


def test_function_examples_cut_out_the_docstring():
    examples = list(function_examples(MODULE, "m.py"))
    assert [e.name for e in examples] == ["add", "size"]  # no docstring / docstring only / one-liner / < 3 words
    add, size = examples
    assert add.target == "Add two numbers together."
    assert add.source == "def add(x, y):\n    total = x + y\n    return total"
    assert size.source == "@property\ndef size(self):\n    return self._n"  # dedented, decorator kept
    assert size.target == "Return the size of the box." and size.module == "m.py"


def test_code2doc_cli_splits_by_module(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(24):
        body = "".join(f'def f{i}_{j}(x):\n    """Compute value number {j} of module {i}."""\n    return x * {j}\n\n'
                       for j in range(3))
        (src / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"pkg{i % 3}" / f"mod{i}.py").write_text(body)
    (src / "pkg0" / "copy.py").write_text(  # an exact copy of mod0's functions: kept once only
        (src / "pkg0" / "mod0.py").read_text())
    (src / "pkg0" / "broken.py").write_text("def broken(:\n")
    (src / "tests").mkdir()
    (src / "tests" / "test_a.py").write_text('def test_a():\n    """Check that a works well."""\n    assert 1\n')
    out = tmp_path / "out"
    code, stdout, _ = main_in_process(capsys, "data", "code2doc", "--input", src, "--out", out, "--val-fraction",
                                      "0.25", "--test-fraction", "0.25")
    assert code == 0
    stats = json.loads(stdout)
    assert sum(stats["examples"].values()) == 72 and stats["skipped"] == {"unparsable_modules": 1,
                                                                          "duplicate_functions": 3}
    seen_modules, sources = {}, set()
    for split in ("train", "val", "test"):
        for line in (out / f"{split}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            assert seen_modules.setdefault(rec["module"], split) == split  # a module lives in one split
            assert split == module_split(rec["module"], 0.25, 0.25)
            assert rec["target"] not in rec["source"] and rec["source"] not in sources
            sources.add(rec["source"])
    assert len(seen_modules) == 24 and not any(m.startswith("tests") for m in seen_modules)
    assert all(stats["examples"][s] > 0 for s in ("train", "val", "test"))


def test_name_baseline():
    assert name_baseline("_get_running_loop") == "get running loop"
    assert name_baseline("getSourceLines") == "get source lines"
    assert name_baseline("HTTPServer_close2") == "http server close 2"


def test_split_identifiers_reads_code_as_words(tokenizer):
    tok = tokenizer
    code = "def getEventLoop(self_ref, _x):\n    return HTTPServer.get_running_loop()  # __init__"
    assert split_identifiers(code) == ("def get event loop(self ref, x):\n"
                                       "    return http server.get running loop()  # init")
    rec = [{"source": code, "target": "Return the loop."}]
    plain, words = tokenize_pairs(rec, tok, 64, 8), tokenize_pairs(rec, tok, 64, 8, split_ids=True)
    assert tok.decode(words.src[0].tolist()) == split_identifiers(code)
    assert tok.decode(plain.src[0].tolist()) == code and (plain.tgt[0] == words.tgt[0]).all()


@pytest.mark.parametrize("target, form", [
    ("Close the selector.", " close the selector."),  # a capitalised first word: lower-cased, after a space
    ("A factory method.", " a factory method."),
    ("HTTP server.", " HTTP server."),  # acronyms, CamelCase names and identifiers keep their case
    ("ZipInfo for name.", " ZipInfo for name."),
    ("Foo_bar it.", " Foo_bar it."),
])
def test_truecased_targets_invert(target, form):
    assert truecase(target) == form and detruecase(form) == target


def test_truecased_first_word_is_the_split_sources_token(tokenizer):
    """What truecasing is for: the summary's first word gets the id the same word has in the source."""
    tok = tokenizer
    rec = [{"source": "def close(self):\n    self.fd = None", "target": "Close the file."}]
    pairs = tokenize_pairs(rec, tok, 64, 16, split_ids=True, truecase_targets=True)
    word = tok.encode(" close")  # the in-sentence word: one or more ids
    src, tgt = pairs.src[0].tolist(), pairs.tgt[0].tolist()
    assert tgt[:len(word)] == word and any(src[i:i + len(word)] == word for i in range(len(src)))
    assert tokenize_pairs(rec, tok, 64, 16, split_ids=True).tgt[0].tolist()[:len(word)] != word  # "Close" is not
    assert detruecase(tok.decode(pairs.tgt[0][:-1].tolist())) == "Close the file."


# ----------------------------------------------------------------------------- data pipeline

S2S = Seq2SeqConfig(data_dir="unused", task=None, max_source_len=40, max_target_len=12, min_bucket=8)


def _pairs(n: int, seed: int = 0) -> Pairs:
    rng = np.random.default_rng(seed)
    src = [np.append(rng.integers(3, 50, rng.integers(1, 40)), 2).astype(np.int32)[:40] for _ in range(n)]
    tgt = [np.append(rng.integers(3, 50, rng.integers(1, 12)), 2).astype(np.int32)[:12] for _ in range(n)]
    return Pairs([{"source": str(i), "target": str(i)} for i in range(n)], src, tgt)


def test_batches_are_bucketed_padded_and_shifted():
    pairs = _pairs(100)
    ds = train_dataset(pairs, S2S, 8, pad_id=0, start_id=0)
    shapes = set()
    for i in range(30):
        b = ds[i]
        B, Sb = b["src"].shape
        Tb = b["tgt_out"].shape[1]
        shapes.add((Sb, Tb))
        src_len = np.array([len(pairs.src[r]) for r in b["rows"]])
        tgt_len = np.array([len(pairs.tgt[r]) for r in b["rows"]])
        assert Sb == bucket(src_len.max(), 8, 40) and Tb == bucket(tgt_len.max(), 8, 12)
        np.testing.assert_array_equal(b["src_mask"].sum(1), src_len)
        np.testing.assert_array_equal(b["loss_mask"].sum(1), tgt_len)
        for j, r in enumerate(b["rows"]):
            np.testing.assert_array_equal(b["src"][j, :src_len[j]], pairs.src[r])
            np.testing.assert_array_equal(b["tgt_out"][j, :tgt_len[j]], pairs.tgt[r])
        assert (b["src"][b["src_mask"] == 0] == 0).all()
        assert (b["tgt_in"][:, 0] == 0).all() and (b["tgt_in"][:, 1:] == b["tgt_out"][:, :-1]).all()
    assert shapes <= set(itertools.product((8, 16, 32, 40), (8, 12))) and len(shapes) > 1


def test_epochs_are_shuffled_length_sorted_permutations():
    pairs = _pairs(1000)
    tb = TrainBatches(pairs, 10, seed=3)
    a, b = tb.plan(0), tb.plan(1)
    assert a.shape == (100, 10) and len(set(a.ravel())) == 1000  # every example once per epoch
    assert not np.array_equal(a, b) and np.array_equal(a, TrainBatches(pairs, 10, seed=3).plan(0))
    spread = np.mean([np.ptp([len(pairs.src[r]) for r in rows]) for rows in a])
    assert spread < 5  # length-sorted chunks: little padding within a batch


def test_eval_batches_cover_every_example_once():
    pairs = _pairs(37)
    ds = eval_dataset(pairs, S2S, 8, pad_id=0, start_id=0)
    rows = np.concatenate([ds[i]["rows"] for i in range(len(ds))])
    assert len(ds) == 5 and sorted(rows[rows >= 0]) == list(range(37)) and (rows == -1).sum() == 3
    last = ds[len(ds) - 1]
    assert (last["loss_mask"][last["rows"] == -1] == 0).all()  # fillers never count


def test_iterator_resumes_and_processes_split_rows():
    pairs = _pairs(200)
    it = DataIterator(train_dataset(pairs, S2S, 8, pad_id=0, start_id=0))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    again = DataIterator(train_dataset(pairs, S2S, 8, pad_id=0, start_id=0))
    again.set_state(state)
    for e in expected:
        b = next(again)
        assert all(np.array_equal(b[k], e[k]) for k in e)
    halves = [train_dataset(pairs, S2S, 8, pad_id=0, start_id=0, process_index=p, process_count=2)[5] for p in (0, 1)]
    whole = train_dataset(pairs, S2S, 8, pad_id=0, start_id=0)[5]
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k])


# ----------------------------------------------------------------------------- BLEU and ROUGE

def test_bleu_is_sacrebleus_published_number():
    """sacrebleu's README example: two reference streams, BLEU = 48.53 (BP = 0.943)."""
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
            ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    out = bleu(hyps, refs)
    assert round(out["bleu"], 2) == 48.53 and round(out["bleu_bp"], 3) == 0.943
    assert out["bleu_signature"].startswith("nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    import sacrebleu

    single = bleu(hyps, refs[0])  # one reference per hypothesis: the library's own corpus_bleu
    assert single["bleu"] == sacrebleu.corpus_bleu(hyps, [refs[0]]).score


def test_rouge_is_rouge_scores_numbers():
    """rouge-score's README pair, checked by hand: ROUGE-1 6 of 8/9 unigrams, ROUGE-2 2 of 7/8 bigrams,
    ROUGE-L an LCS of 5 ('the quick brown jump(s) the')."""
    out = rouge(["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"])
    f = lambda p, r: 200 * p * r / (p + r)  # noqa: E731 - F-measure x 100
    assert math.isclose(out["rouge1"], f(6 / 8, 6 / 9), rel_tol=1e-9)
    assert math.isclose(out["rouge2"], f(2 / 7, 2 / 8), rel_tol=1e-9)
    assert math.isclose(out["rougeL"], f(5 / 8, 5 / 9), rel_tol=1e-9)
    from rouge_score import rouge_scorer

    hyps = ["return the value", "Set the running loop.", "", "close it"]
    refs = ["Return the value of x.", "Set the current event loop.", "Do nothing.", "Close the file."]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, h) for h, r in zip(hyps, refs)]
    ours = rouge(hyps, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert math.isclose(ours[key], 100 * np.mean([d[key].fmeasure for d in direct]), rel_tol=1e-12)
    with pytest.raises(ValueError, match="as many hypotheses as references"):
        rouge(["a"], ["a", "b"])


# ----------------------------------------------------------------------------- decoding

DEC = EncDecConfig(vocab_size=23, d_model=32, n_encoder_layers=1, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16,
                   logits_bias=True)


def _decoder_model(cfg: EncDecConfig = DEC, seed: int = 0, eos_bias: float = 1.5,
                   pad_bias: float = 0.0) -> EncoderDecoder:
    model = EncoderDecoder(cfg, rngs=nnx.Rngs(seed))
    bias = np.zeros(cfg.vocab_size, np.float32)
    bias[cfg.eos_id] = eos_bias  # some hypotheses end early, some run to max_len
    bias[cfg.pad_id] = pad_bias  # a trained model never emits pad; a random one may, on every step
    model.final_logits_bias.set_value(jnp.asarray(bias))
    return model


def _src(seed: int, B: int = 4, S: int = 7):
    rng = np.random.default_rng(seed)
    src = rng.integers(3, DEC.vocab_size, (B, S)).astype(np.int32)
    mask = (np.arange(S)[None] < rng.integers(1, S + 1, (B, 1))).astype(np.int32)
    return src, mask


@nnx.jit
def _teacher_forced_logprobs(model, src, mask, tgt_in, tgt_out, keep):
    logp = jnp.asarray(model(src, tgt_in, mask))
    logp = logp - jax_logsumexp(logp)
    return (jnp.take_along_axis(logp, tgt_out[..., None], -1)[..., 0] * keep).sum(-1)


def jax_logsumexp(x):
    import jax

    return jax.nn.logsumexp(x, axis=-1, keepdims=True)


def _rescore(model, src, mask, seqs: np.ndarray, cfg: EncDecConfig = DEC) -> tuple[np.ndarray, np.ndarray]:
    """(sum log p, length) of each hypothesis [N, L] under the full (uncached) forward pass."""
    L = seqs.shape[1]
    is_eos = seqs == cfg.eos_id
    lengths = np.where(is_eos.any(1), is_eos.argmax(1) + 1, L)
    keep = (np.arange(L)[None] < lengths[:, None]).astype(np.float32)
    tgt_in = np.concatenate([np.full((len(seqs), 1), cfg.decoder_start_id), seqs[:, :-1]], 1).astype(np.int32)
    lp = _teacher_forced_logprobs(model, jnp.asarray(src), jnp.asarray(mask), jnp.asarray(tgt_in),
                                  jnp.asarray(seqs.astype(np.int32)), jnp.asarray(keep))
    return np.asarray(lp), lengths


@pytest.mark.parametrize("length_penalty, early_stopping", [(0.0, False), (1.0, True)])
def test_beam_size_one_is_greedy(length_penalty, early_stopping):
    model = _decoder_model(eos_bias=2.0, pad_bias=-1e4)
    src, mask = _src(1, B=6)
    tokens, logprobs = greedy_decode(model, src, mask, max_len=10)
    beam = beam_search(model, src, mask, beam_size=1, max_len=10, length_penalty=length_penalty,
                       early_stopping=early_stopping)
    np.testing.assert_array_equal(beam.tokens[:, 0], tokens)
    np.testing.assert_allclose(beam.logprobs[:, 0], logprobs, rtol=1e-5)
    ended = (tokens == DEC.eos_id).any(1)
    assert ended.any() and not ended.all()  # the case mixes finished and max-length outputs


def test_beams_are_sorted_and_their_scores_are_true():
    model = _decoder_model(seed=2)
    src, mask = _src(3)
    K, L, alpha = 4, 9, 0.7
    beam = beam_search(model, src, mask, beam_size=K, max_len=L, length_penalty=alpha)
    assert beam.tokens.shape == (4, K, L) and np.isfinite(beam.scores).all()
    assert (np.diff(beam.scores, axis=1) <= 1e-6).all()  # best first
    lp, lengths = _rescore(model, np.repeat(src, K, 0), np.repeat(mask, K, 0), beam.tokens.reshape(4 * K, L))
    np.testing.assert_allclose(beam.logprobs.ravel(), lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(beam.scores.ravel(), lp / lengths ** alpha, rtol=1e-4, atol=1e-4)
    greedy_lp, greedy_len = _rescore(model, src, mask, greedy_decode(model, src, mask, max_len=L)[0])
    assert (beam.scores[:, 0] >= greedy_lp / greedy_len ** alpha - 1e-5).all()  # never worse than greedy


def test_a_beam_wider_than_the_search_space_is_exhaustive():
    cfg = DEC.replace(vocab_size=6)
    model = _decoder_model(cfg, seed=4, eos_bias=0.5)
    src, mask = np.array([[3, 4, 5, 1]], np.int32), np.array([[1, 1, 1, 0]], np.int32)
    L, alpha = 3, 0.5
    hyps = [p + (cfg.eos_id,) for n in range(L) for p in itertools.product([t for t in range(6) if t != 2], repeat=n)]
    hyps += list(itertools.product([t for t in range(6) if t != 2], repeat=L))  # unfinished at max_len
    seqs = np.array([list(h) + [cfg.pad_id] * (L - len(h)) for h in hyps])
    lp, lengths = _rescore(model, np.repeat(src, len(seqs), 0), np.repeat(mask, len(seqs), 0), seqs, cfg)
    best = np.sort(lp / lengths ** alpha)[::-1]
    beam = beam_search(model, src, mask, beam_size=len(hyps), max_len=L, length_penalty=alpha)
    np.testing.assert_allclose(beam.scores[0], best, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the whole loop

def _reverse_task(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    letters = list("abcdefghij")
    for split, n in (("train", 3000), ("val", 64), ("test", 64)):
        with (root / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                w = list(rng.choice(letters, rng.integers(3, 7)))
                f.write(json.dumps({"source": " ".join(w), "target": " ".join(w[::-1])}) + "\n")
    return root


def _args(data: Path, run: Path, steps: int) -> list[str]:
    return ["train", "--config", "seq2seq_tiny", "--no-progress", f"--seq2seq.data_dir={data}", "--seq2seq.task=null",
            "--seq2seq.min_bucket=8", "--model.vocab_size=300", f"--train.run_dir={run}", f"--train.steps={steps}",
            "--train.batch_size=32", "--train.eval_every=1000", "--train.ckpt_every=1000"]


def test_a_reversal_task_is_learned(tmp_path, capsys):
    """`jaxformer train` on an encoder-decoder config runs the seq2seq loop; the model learns to reverse."""
    data = _reverse_task(tmp_path)
    code, out, err = main_in_process(capsys, *_args(data, tmp_path / "run", 400))
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    assert report["model"]["bleu"] > 90, report
    assert "bleu" in out and "rougeL" in out and "BLEU signature: nrefs:1" in out
    assert report["examples"] == 64 and report["decoding"]["beam_size"] == 2
    # `jaxformer eval` on the run: greedy this time, a table and a JSON report
    code, out, err = main_in_process(capsys, "eval", "--ckpt", tmp_path / "run", "--split", "val", "--beam-size", "1",
                                     "--json", tmp_path / "val.json")
    assert code == 0, err
    val = json.loads((tmp_path / "val.json").read_text())
    assert "model (greedy)" in out and val["split"] == "val" and val["model"]["bleu"] > 80
    assert math.isclose(val["model"]["perplexity"], math.exp(val["model"]["loss"]), rel_tol=1e-9)


def test_resume_continues_exactly(tmp_path, capsys):
    """A 6-step run cut back to its step-3 checkpoint (as a kill after step 3 leaves it) resumes bitwise."""
    import shutil

    data = _reverse_task(tmp_path)
    quick = ["--seq2seq.eval_max_examples=8", "--train.ckpt_every=3", "--train.log_every=1", "--train.keep_last=2"]
    assert main_in_process(capsys, *_args(data, tmp_path / "a", 6), *quick)[0] == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for stale in ("checkpoints/6", "model"):
        shutil.rmtree(tmp_path / "b" / stale)
    code, out, err = main_in_process(capsys, *_args(data, tmp_path / "b", 6), *quick, "--resume")
    assert code == 0, err
    assert "resumed from step 3" in out
    losses = [[r["loss"] for r in read_metrics(tmp_path / run) if r["kind"] == "train"] for run in "ab"]
    assert len(losses[1]) == 6 and losses[0] == losses[1]  # floats from JSON: equal means bitwise equal


def test_loss_chunk_is_refused_for_the_encoder_decoder(tmp_path, capsys):
    """`--train.loss_chunk` reads a decoder LM's hidden states; the seq2seq loss needs its whole logits: a clear
    error before any data is prepared, not an option silently ignored."""
    code, out, err = main_in_process(capsys, *_args(tmp_path / "absent", tmp_path / "run", 2), "--train.loss_chunk=64")
    assert code != 0 and "train.loss_chunk=64 is for decoder-only models" in err, err
    assert not (tmp_path / "run").exists()
