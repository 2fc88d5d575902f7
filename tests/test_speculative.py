"""Speculative decoding: prompt-lookup and draft-model drafts, verified by the target in one call.

Greedy output must be the target's plain greedy output token for token; sampled output must be distributed as
the target's own (Leviathan et al. 2023, Chen et al. 2023). The statistical checks draw thousands of rows in one
verify call on a 12-token vocabulary and compare the emitted tokens' frequencies with the target distribution,
computed here in numpy from the model's logits (softmax of temperature-scaled, top-k-filtered logits).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.infer import Engine, SamplingParams, generate
from jaxformer.infer.draft_model import ModelDrafter
from jaxformer.infer.engine import RowSettings, Slots
from jaxformer.infer.generate import Sequence
from jaxformer.infer.paged_batcher import PagedBatcher
from jaxformer.infer.paged_engine import PagedEngine
from jaxformer.infer.speculative import NgramDrafter, verify_step
from jaxformer.models import DecoderLM, KVCache

CFG = ModelConfig.llama(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                        init_std=0.3)


@pytest.fixture(scope="module")
def model():
    return DecoderLM(CFG, rngs=nnx.Rngs(0))


def _run(engine, prompts, params, drafter):
    batcher = PagedBatcher(engine, drafter=drafter)
    seqs = [Sequence(p, params, max_len=engine.max_len) for p in prompts]
    waiting = collections.deque(seqs)
    while waiting or batcher.active:
        while waiting and batcher.free_slots():
            batcher.add(waiting.popleft())
        batcher.step()
    return seqs, batcher.stats()


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    d = NgramDrafter(k=3)
    assert d.propose([1, 2, 3, 9, 9, 1, 2, 3], 5) == [9, 9, 1]  # 3-gram "1 2 3" seen before: what followed it
    assert d.propose([5, 1, 2, 7, 4, 8, 2], 5) == [7, 4, 8]  # only the 1-gram "2" matches
    assert d.propose([1, 2, 3], 5) == [] and d.propose([4, 4], 0) == []
    assert d.propose([3, 4, 5, 3, 4], 1) == [5]  # never more than the limit
    with pytest.raises(ValueError, match="draft tokens >= 1"):
        NgramDrafter(k=0)


def test_greedy_speculation_is_the_plain_greedy_output(model):
    """Repetitive and random prompts, 4 rows: prompt lookup, the target drafting for itself (every draft kept)
    and a small random draft model (almost none kept) all give the dense engine's greedy tokens."""
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, 97, 6)) * 5 for _ in range(3)] + [list(rng.integers(0, 97, n)) for n in (3, 17)]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, logprobs=2)
    plain = generate(Engine(model, max_batch=4), prompts, params)
    small = DecoderLM(ModelConfig.llama(vocab_size=97, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                                        max_seq_len=64), rngs=nnx.Rngs(5))
    for name in ("ngram", "self", "small"):
        engine = PagedEngine(model, max_batch=4, page_size=4)
        drafter = {"ngram": lambda: NgramDrafter(4), "self": lambda: ModelDrafter(model, engine, 3),
                   "small": lambda: ModelDrafter(small, engine, 3)}[name]()
        seqs, stats = _run(engine, prompts, params, drafter)
        for p, s in zip(plain, seqs):
            assert s.tokens == p.tokens, name
            assert np.abs(np.subtract(s.logprobs, p.logprobs)).max() <= 1e-5 * max(1.0, np.abs(p.logprobs).max())
            assert [[t for t, _ in row] for row in s.top_logprobs] == [[t for t, _ in row] for row in p.top_logprobs]
        assert stats["spec_drafted"] > 0, name
        if name == "self":
            assert stats["spec_accepted"] == stats["spec_drafted"]


def test_rows_with_penalties_are_never_drafted(model):
    params = SamplingParams(temperature=0.0, max_new_tokens=8, repetition_penalty=1.3)
    prompts = [[1, 2, 3, 4] * 4]
    plain = generate(Engine(model, max_batch=2), prompts, params)
    seqs, stats = _run(PagedEngine(model, max_batch=2, page_size=4), prompts, params, NgramDrafter(4))
    assert seqs[0].tokens == plain[0].tokens and stats["spec_drafted"] == 0


# ----------------------------------------------------------------------------- the distribution

V, ROWS, K = 12, 6000, 2
SMALL = ModelConfig.llama(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=16,
                          init_std=0.6)


def _target(logits: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    """numpy: softmax of logits / T over the top-k entries (float64)."""
    z = logits.astype(np.float64) / temperature
    keep = z >= np.sort(z)[-top_k]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    return p / p.sum()


def _verify_rows(model, prompt, drafts, q, temperature, top_k):
    """ROWS copies of one prompt (its last token not yet fed), drafts [ROWS, K], distinct keys: one verify step.
    Returns (emitted [ROWS, K+1], n_emit [ROWS])."""
    P = len(prompt)
    S = 16
    cache = KVCache.init(model.config, ROWS, S)
    ctx = jnp.broadcast_to(jnp.asarray(prompt[:-1], jnp.int32), (ROWS, P - 1))
    _, cache = model.extend(ctx, cache)
    history = np.zeros((ROWS, S), np.int32)
    history[:, :P] = prompt
    f = lambda x: jnp.full((ROWS,), x, jnp.float32)  # noqa: E731
    settings = RowSettings(f(temperature), jnp.full((ROWS,), top_k, jnp.int32), f(1.0), f(1.0), f(0.0), f(0.0))
    slots = Slots(cache=cache, history=jnp.asarray(history), prompt_len=jnp.full((ROWS,), P, jnp.int32),
                  keys=jax.random.split(jax.random.key(7), ROWS), settings=settings)
    qs = None if q is None else jnp.broadcast_to(jnp.asarray(q, jnp.float32), (ROWS, K, V))
    _, (emitted, n_emit) = jax.jit(lambda s: verify_step(model, s, jnp.asarray(drafts, jnp.int32),
                                                         jnp.full((ROWS,), K, jnp.int32), qs,
                                                         jnp.ones((ROWS,), bool), n_top=None))(slots)
    return np.asarray(emitted), np.asarray(n_emit)


def _next_logits(model, tokens) -> np.ndarray:
    return np.asarray(model(jnp.asarray([tokens], jnp.int32)))[0, -1]


def _assert_frequencies(tokens: np.ndarray, p: np.ndarray, what: str) -> None:
    """Frequencies of `tokens` against p: every entry within 4.5 standard deviations of a binomial count."""
    n = len(tokens)
    assert n > 500, f"{what}: only {n} samples"
    freq = np.bincount(tokens, minlength=len(p)) / n
    sigma = np.sqrt(p * (1 - p) / n) + 1e-12
    worst = np.max(np.abs(freq - p) / np.maximum(sigma, 1.0 / n))
    assert worst <= 4.5, f"{what}: frequency off by {worst:.1f} sigma\n{np.round(freq, 3)}\n{np.round(p, 3)}"


@pytest.mark.parametrize("drafter", ["point", "soft"])
def test_sampled_speculation_is_distributed_as_the_target(drafter):
    """First emitted token ~ p_0; second emitted token, among rows that kept a given draft 0, ~ p_1 (the target
    after that token). Point drafts are prompt lookup's (the same two tokens in every row); soft drafts are drawn
    per row from a fixed q, as a draft model's are."""
    model = DecoderLM(SMALL, rngs=nnx.Rngs(3))
    prompt, temperature, top_k = [3, 7, 1, 9], 0.9, 8
    p0 = _target(_next_logits(model, prompt), temperature, top_k)
    rng = np.random.default_rng(0)
    if drafter == "point":
        q = None
        drafts = np.tile([int(np.argsort(p0)[-2]), int(np.argsort(p0)[-1])], (ROWS, 1))  # likely, not the likeliest
    else:
        q = rng.dirichlet(np.full(V, 0.5), size=K)
        drafts = np.stack([rng.choice(V, ROWS, p=q[i]) for i in range(K)], axis=1)
    emitted, n_emit = _verify_rows(model, prompt, drafts, q, temperature, top_k)
    _assert_frequencies(emitted[:, 0], p0, "first token")
    assert 0.05 < (n_emit >= 2).mean() < 0.95  # rejection and acceptance both exercised
    d0 = np.bincount(drafts[n_emit >= 2, 0], minlength=V).argmax()  # the draft 0 most often kept
    rows = (n_emit >= 2) & (drafts[:, 0] == d0)
    p1 = _target(_next_logits(model, prompt + [int(d0)]), temperature, top_k)
    _assert_frequencies(emitted[rows, 1], p1, f"second token after draft 0 = {d0}")
