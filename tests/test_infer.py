"""KV-cache engine: cached decode vs the uncached forward, ragged batches, sampling, stops, the generate CLI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.infer import Engine, KVCache, SamplingParams, generate
from jaxformer.infer.engine import prompt_buckets
from jaxformer.infer.generate import Sequence
from jaxformer.infer.sampling import apply_penalties, filter_top_k_top_p, sample_rows
from jaxformer.models import DecoderLM

FAMILIES = {
    "gpt2": ModelConfig.gpt2(vocab_size=400, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64,
                             init_std=0.3),
    "llama_gqa": ModelConfig.llama(vocab_size=400, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                   max_seq_len=64, init_std=0.3),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return DecoderLM(FAMILIES[request.param], rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def llama():
    return DecoderLM(FAMILIES["llama_gqa"], rngs=nnx.Rngs(3))


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def last_logits(model, ids) -> np.ndarray:
    """The uncached forward's logits after `ids` (fixed-size buffer: one compile per model shape)."""
    buf = np.zeros((1, model.config.max_seq_len), np.int32)
    buf[0, :len(ids)] = ids
    return np.asarray(_forward(model, jnp.asarray(buf)))[0, len(ids) - 1]


def uncached_greedy(model, prompt, n, stop_ids=(), with_logprobs=False):
    """Greedy continuation by re-running the full forward each step: the cache-free reference."""
    ids, logprobs = list(prompt), []
    for _ in range(min(n, model.config.max_seq_len - len(ids))):
        z = last_logits(model, ids)
        nxt = int(np.argmax(z))
        if nxt in stop_ids:
            break
        ids.append(nxt)
        logprobs.append(float(z[nxt] - np.log(np.exp(z - z.max()).sum()) - z.max()))
    return (ids[len(prompt):], logprobs) if with_logprobs else ids[len(prompt):]


def _close(a, b, scale):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * max(1.0, scale))


def test_cached_decode_equals_uncached_forward_every_step(model):
    """Prefill 7 tokens, then one token at a time: every step's logits equal the full forward's (ragged rows)."""
    cfg = model.config
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, cfg.vocab_size)
    full = _forward(model, tokens)  # [2, 40, V]
    scale = float(jnp.abs(full).max())
    step = nnx.jit(lambda m, t, c: m.extend(t, c))
    cache = KVCache.init(cfg, 2, cfg.max_seq_len)
    logits, cache = step(model, tokens[:, :7], cache)
    _close(logits, full[:, :7], scale)
    for t in range(7, 40):
        logits, cache = step(model, tokens[:, t:t + 1], cache)
        _close(logits[:, 0], full[:, t], scale)
    assert list(np.asarray(cache.lengths)) == [40, 40]

    # ragged: row 0 holds 12 tokens, row 1 holds 30; one decode call continues both
    ragged = KVCache.init(cfg, 2, cfg.max_seq_len)
    _, ragged = step(model, tokens[:, :30], ragged)
    ragged = ragged.replace(lengths=jnp.asarray([12, 30], jnp.int32))  # row 0's slots 12.. are now stale
    logits, _ = step(model, jnp.stack([tokens[0, 12:13], tokens[1, 30:31]]), ragged)
    _close(logits[0, 0], full[0, 12], scale)
    _close(logits[1, 0], full[1, 30], scale)


def test_ragged_batch_equals_each_sequence_alone(model):
    """Six prompts of different lengths over four slots (they queue and join as slots free up) == each
    generated alone by the uncached forward; every chosen token's logprob is that forward's log-softmax."""
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, model.config.vocab_size, n)) for n in (3, 11, 17, 30, 1, 8)]
    seqs = generate(Engine(model, max_batch=4), prompts, SamplingParams(temperature=0.0, max_new_tokens=12,
                                                                          logprobs=0))
    for p, s in zip(prompts, seqs):
        tokens, logprobs = uncached_greedy(model, p, 12, with_logprobs=True)
        assert s.tokens == tokens and s.finish_reason == "length"
        _close(s.logprobs, logprobs, float(np.abs(logprobs).max()))  # logprobs reach -3.3: relative to that


def test_prefill_compiles_once_per_bucket(llama):
    engine = Engine(llama, max_batch=4)
    assert engine.buckets == prompt_buckets(64) == (16, 32, 64)
    params = SamplingParams(temperature=0.0, max_new_tokens=2)
    generate(engine, [[1, 2, 3]], params)
    prefill, decode = engine._prefill, engine._decode
    before = prefill._cache_size(), decode._cache_size()
    for n in (1, 5, 9, 16):  # all in the 16 bucket: nothing new to compile
        generate(engine, [list(range(1, n + 1))], params)
    other = Engine(llama, max_batch=4)  # a second engine of the same shapes shares the compilations
    generate(other, [[7, 8]], params)
    assert other._prefill is prefill and (prefill._cache_size(), decode._cache_size()) == before


def test_context_limit_and_bad_prompts(llama):
    engine = Engine(llama, max_batch=4)
    [seq] = generate(engine, [list(range(1, 61))], SamplingParams(temperature=0.0, max_new_tokens=50))
    assert len(seq.tokens) == 4 and seq.finish_reason == "length"  # 60 + 4 fills the 64-token context
    for bad in ([], list(range(64)), [400]):
        with pytest.raises(ValueError):
            generate(engine, [bad], SamplingParams())


def test_pallas_decode_kernel_path_matches_xla(llama, monkeypatch):
    """attention_impl="pallas": decode steps run pallas_kernels.decode_attention (interpreted on CPU)."""
    monkeypatch.setenv("JAXFORMER_PALLAS_INTERPRET", "1")
    pallas = DecoderLM(FAMILIES["llama_gqa"].replace(attention_impl="pallas"), rngs=nnx.Rngs(0))
    nnx.update(pallas, nnx.state(llama, nnx.Param))
    tokens = jax.random.randint(jax.random.key(4), (2, 22), 0, 400)
    full = _forward(llama, tokens)  # xla, uncached
    step = nnx.jit(lambda m, t, c: m.extend(t, c))
    cache = KVCache.init(pallas.config, 2, 32)
    _, cache = step(pallas, tokens[:, :20], cache)  # 20 > 16 new tokens: the xla path
    for t in range(20, 22):  # one token: the Pallas decode kernel
        logits, cache = step(pallas, tokens[:, t:t + 1], cache)
        _close(logits[:, 0], full[:, t], float(jnp.abs(full).max()))


# ----------------------------------------------------------------------------- sampling

def _draws(logits, n, **kw):
    """n samples from one row of logits with n different keys."""
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    keys = jax.random.split(jax.random.key(123), n)
    vec = lambda x, dt: jnp.full((n,), x, dt)  # noqa: E731
    out = sample_rows(rows, keys, vec(kw.get("temperature", 1.0), jnp.float32), vec(kw.get("top_k", 0), jnp.int32),
                      vec(kw.get("top_p", 1.0), jnp.float32))
    return np.bincount(np.asarray(out), minlength=len(logits)) / n


LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
# frequencies of 20,000 draws: a probability near 0.5 has standard deviation 0.0035, so 0.015 is 4.2 of them; the
# keys are fixed, so a run draws the same samples on every machine


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax(temperature):
    freq = _draws(LOGITS, 20000, temperature=temperature)
    assert np.abs(freq - _softmax(LOGITS / temperature)).max() < 0.015


def test_top_k_support_and_weights():
    freq = _draws(LOGITS, 20000, top_k=3)
    assert set(np.flatnonzero(freq)) == {0, 1, 2}
    assert np.abs(freq[:3] - _softmax(LOGITS[:3])).max() < 0.015


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    p = _softmax(LOGITS)  # cumulative: .41, .66, .81, .90, ...
    freq = _draws(LOGITS, 20000, top_p=0.8)
    keep = int(np.searchsorted(np.cumsum(p), 0.8)) + 1  # 3 tokens reach 0.8
    assert set(np.flatnonzero(freq)) == set(range(keep))
    assert np.abs(freq[:keep] - p[:keep] / p[:keep].sum()).max() < 0.015
    assert set(np.flatnonzero(_draws(LOGITS, 2000, top_p=0.0))) == {0}  # p=0 keeps only the top token


def test_greedy_and_filters_per_row():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    out = sample_rows(logits, jax.random.split(jax.random.key(0), 4), jnp.asarray([0.0, 1.0, 0.0, 1.0]),
                      jnp.asarray([0, 1, 0, 0]), jnp.asarray([1.0, 1.0, 1.0, 1e-6]))
    np.testing.assert_array_equal(np.asarray(out), np.argmax(np.asarray(logits), -1))  # top_k=1, p~0 = greedy
    filtered = np.asarray(filter_top_k_top_p(logits, jnp.asarray([5, 0, 50, 0]), jnp.asarray([1.0, 1.0, 1.0, 0.5])))
    assert (np.isfinite(filtered).sum(-1)[:3] == [5, 50, 50]).all()


def test_penalties_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 10)).astype(np.float32)
    counts = rng.integers(0, 3, (2, 10)).astype(np.int32)
    seen = (counts > 0) | (rng.random((2, 10)) < 0.3)
    rep, freq, pres = np.array([1.3, 1.0]), np.array([0.5, -0.2]), np.array([0.0, 1.0])
    ref = np.where(seen, np.where(logits > 0, logits / rep[:, None], logits * rep[:, None]), logits)
    ref = ref - freq[:, None] * counts - pres[:, None] * (counts > 0)
    got = apply_penalties(jnp.asarray(logits), jnp.asarray(counts), jnp.asarray(seen), *(jnp.asarray(x, jnp.float32)
                                                                                         for x in (rep, freq, pres)))
    # elementwise relative to the largest logit: the subtractions make some entries near zero (measured 1.9e-8)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_engine_penalties_equal_a_numpy_reference_loop(llama):
    """Greedy with repetition/frequency/presence penalties == uncached forward + numpy penalties, step by step."""
    prompt = [5, 9, 5, 14, 2]
    params = SamplingParams(temperature=0.0, max_new_tokens=15, repetition_penalty=1.5, frequency_penalty=0.7,
                            presence_penalty=0.4)
    [seq] = generate(Engine(llama, max_batch=4), [prompt], params)
    V, ids, counts = 400, list(prompt), np.zeros(400)
    for _ in range(15):
        z = last_logits(llama, ids).astype(np.float64)
        seen = np.isin(np.arange(V), ids)
        z = np.where(seen, np.where(z > 0, z / 1.5, z * 1.5), z) - 0.7 * counts - 0.4 * (counts > 0)
        ids.append(int(np.argmax(z)))
        counts[ids[-1]] += 1
    assert seq.tokens == ids[len(prompt):]


def test_seeds_reproduce_and_rows_are_independent(llama):
    engine = Engine(llama, max_batch=4)
    p = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=7)
    a = generate(engine, [[1, 2, 3]], p)[0].tokens
    assert generate(engine, [[1, 2, 3]], p)[0].tokens == a
    assert generate(engine, [[1, 2, 3]], p.replace(seed=8))[0].tokens != a
    # the same request beside others (other slots, other seeds) samples the same tokens
    crowd = generate(engine, [[4, 4], [1, 2, 3], [9] * 20, [1, 2, 3]],
                     [p.replace(seed=1), p, p.replace(seed=2, temperature=0.0), p])
    assert crowd[1].tokens == a and crowd[3].tokens == a


def test_stop_ids_stop_strings_and_text_deltas(llama, tokenizer):
    from jaxformer.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer.tok)
    assert tokenizer.vocab_size <= 400
    engine = Engine(llama, max_batch=4)
    prompt = tok.encode("def main():\n    return")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24)
    [free] = generate(engine, [prompt], greedy, tokenizer=tok)
    assert free.text == tok.decode(free.tokens) and free.finish_reason == "length"

    k = next(i for i in range(3, len(free.tokens)) if free.tokens[i] not in free.tokens[:i])
    [by_id] = generate(engine, [prompt], greedy.replace(stop_token_ids=(free.tokens[k],)))
    assert by_id.tokens == free.tokens[:k] and by_id.finish_reason == "stop"

    text = free.text
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2)  # a 2-character stop first seen mid-text
                if text[i:i + 2].strip() and text[i:i + 2] not in text[:i + 1])
    deltas = []
    [by_text] = generate(engine, [prompt], greedy.replace(stop=("@@never@@", stop)), tokenizer=tok,
                         on_text=lambda i, d: deltas.append(d))
    assert by_text.text == text[:text.index(stop)] and by_text.finish_reason == "stop"
    assert "".join(deltas) == by_text.text  # streamed deltas never showed the stop string


def test_sequence_holds_back_partial_stop_strings():
    class Tok:  # a fake tokenizer: token i is the character chr(i)
        def decode(self, ids):
            return "".join(map(chr, ids))

    seq = Sequence([1], SamplingParams(max_new_tokens=10, stop=("xyz",)), max_len=50, tokenizer=Tok())
    out = lambda t: type("Out", (), {"tokens": [t], "logprobs": [0.0], "top_ids": np.zeros((1, 0)),  # noqa: E731
                                     "top_logprobs": np.zeros((1, 0))})()
    assert [seq.append(out(ord(c)), 0) for c in "abxy"] == ["a", "b", "", ""]
    assert seq.append(out(ord("q")), 0) == "xyq"  # not the stop after all: released
    assert [seq.append(out(ord(c)), 0) for c in "xyz"] == ["", "", ""]
    assert seq.text == "abxyq" and seq.finish_reason == "stop"


def test_generate_cli_streams_the_greedy_continuation(tmp_path, tokenizer, capsys):
    from jaxformer.cli import main
    from jaxformer.data.tokenizer import load_tokenizer_for
    from jaxformer.interop import native

    model = DecoderLM(FAMILIES["gpt2"].replace(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(6))  # ids < vocab
    native.save(model, tmp_path / "m")
    tokenizer.save(tmp_path / "m")
    main(["generate", "--ckpt", str(tmp_path / "m"), "--prompt", "import os\n", "--max-new-tokens", "12",
          "--temperature", "0"])
    tok = load_tokenizer_for(tmp_path / "m")
    ids = uncached_greedy(model, tok.encode_prompt("import os\n"), 12, stop_ids=tok.eos_ids)
    captured = capsys.readouterr()
    assert captured.out == "import os\n" + tok.decode(ids) + "\n"
    assert "tokens in" in captured.err

    (tmp_path / "bare").mkdir()
    native.save(model, tmp_path / "bare" / "m")  # no tokenizer beside it
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt", str(tmp_path / "bare" / "m"), "--prompt", "x"])
    assert "no tokenizer" in capsys.readouterr().err
