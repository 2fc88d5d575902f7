"""The paged KV cache: the model over page tables, the page pool's prefix cache, and the paged engine.

The references are independent of paging: the model's own uncached forward, and the dense Engine (one
[max_len] cache row per slot), whose tokens and log-probabilities the paged engine must reproduce whatever
the page size, the pool size (preemption), the prefill chunk and the prefix reuse.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.infer import Engine, SamplingParams, generate
from jaxformer.infer.pages import PagePool, page_hashes
from jaxformer.infer.paged_engine import PagedEngine
from jaxformer.models import DecoderLM
from jaxformer.models.paged_cache import PagedKVCache
from tests.conftest import run_on_eight_devices

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "llama_gqa": ModelConfig.llama(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                   max_seq_len=64, init_std=0.3),
    "sliding_softcap": ModelConfig.llama(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=64,
                                         max_seq_len=64, init_std=0.3, sliding_window=7, attn_logit_softcap=5.0,
                                         layer_types=("sliding_attention", "full_attention")),
    "gpt2": ModelConfig.gpt2(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, init_std=0.3),
    "moe": ModelConfig.llama(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                             init_std=0.3, n_experts=4, n_experts_per_token=2, moe_d_ff=32),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return DecoderLM(CONFIGS[request.param], rngs=nnx.Rngs(0))


def _prompts(seed: int, shared: int = 20):
    rng = np.random.default_rng(seed)
    system = list(rng.integers(0, 97, shared))
    return [system + list(rng.integers(0, 97, n)) for n in (3, 11, 17, 1, 8, 30)]


def test_extend_over_shuffled_pages_equals_the_full_forward(model):
    """Prefill 13 tokens, then one at a time, through pages scattered over the pool: the full forward's logits."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 30)), jnp.int32)
    full = np.asarray(model(tokens))
    cache = PagedKVCache.init(model.config, 2, 64, num_pages=40, page_size=4)
    pages = rng.permutation(np.arange(1, 40))
    table = np.zeros((2, 16), np.int32)
    table[0, :8], table[1, :8] = pages[:8], pages[8:16]
    cache = cache.replace(page_table=jnp.asarray(table))
    logits, cache = model.extend(tokens[:, :13], cache)
    steps = [np.asarray(logits)]
    for t in range(13, 30):
        logits, cache = model.extend(tokens[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    got = np.concatenate(steps, axis=1)
    assert np.abs(got - full).max() <= 1e-5 * np.abs(full).max()  # measured 1.2e-7 x max|ref|


def test_page_pool_prefix_cache_refcounts_and_lru():
    pool = PagePool(num_pages=6, page_size=2)  # pages 1..5
    assert pool.available == 5 and pool.take(6) is None
    h = page_hashes([1, 2, 3, 4, 5], 2)
    assert len(h) == 2 and h == page_hashes([1, 2, 3, 4, 9], 2) and h[1] != page_hashes([1, 2, 3, 5], 2)[1]
    a = pool.take(3)
    pool.register(a[0], h[0])
    pool.register(a[1], h[1])
    assert pool.match(h) == a[:2] and pool.match(page_hashes([1, 2, 9, 9], 2)) == a[:1]
    pool.hold(a[:2])  # a second sequence shares the two prefix pages
    pool.release(a)  # the first lets go: its shared pages stay held, its private page is free
    assert pool.used == 2 and pool.available == 3
    pool.release(a[:2])  # now nobody holds them: cached and idle, still found
    assert pool.used == 0 and pool.match(h) == a[:2] and len(pool.idle) == 2
    got = pool.take(4)  # 3 free pages, then the least recently used idle one (a[0]) is evicted
    assert sorted(got) == sorted([p for p in range(1, 6) if p != a[1]])
    assert pool.match(h) == []  # a[0] held h[0]: the chain breaks there


def test_paged_engine_reproduces_the_dense_engine(model):
    """Ragged prompts sharing a 20-token system prompt, 4 rows: greedy tokens equal, logprobs within 1e-5 x max."""
    prompts, params = _prompts(1), SamplingParams(temperature=0.0, max_new_tokens=12, logprobs=0)
    dense = generate(Engine(model, max_batch=4), prompts, params)
    engine = PagedEngine(model, max_batch=4, page_size=4)
    paged = generate(engine, prompts, params, chunk=7)  # prompts of up to 50 tokens prefilled 7 at a time
    for d, p in zip(dense, paged):
        assert p.tokens == d.tokens and p.finish_reason == d.finish_reason
        scale = max(1.0, np.abs(d.logprobs).max())
        assert np.abs(np.subtract(p.logprobs, d.logprobs)).max() <= 1e-5 * scale
    # the first computes the system prompt's 5 full pages; the others wait for them, then share them
    assert [p.cached_tokens for p in paged] == [0, 20, 20, 20, 20, 20]
    assert engine.pool.used == 0 and len(engine.pool.idle) >= 5


def test_a_small_pool_preempts_and_loses_nothing(model):
    """17 pages of 4 tokens for 4 rows of up to 62: sequences are preempted and recomputed; seeded sampling
    still draws exactly the dense engine's tokens."""
    prompts = _prompts(2)
    for params in (SamplingParams(temperature=0.0, max_new_tokens=14),
                   SamplingParams(temperature=1.0, top_k=20, max_new_tokens=14, seed=5, repetition_penalty=1.2)):
        dense = generate(Engine(model, max_batch=4), prompts, params)
        paged = generate(PagedEngine(model, max_batch=4, page_size=4, num_pages=17), prompts, params)
        assert [p.tokens for p in paged] == [d.tokens for d in dense]
        assert sum(p.preemptions for p in paged) > 0


def test_sliding_layers_free_the_pages_their_window_left():
    cfg = ModelConfig.llama(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128,
                            init_std=0.3, sliding_window=6)  # every layer slides
    model = DecoderLM(cfg, rngs=nnx.Rngs(1))
    params = SamplingParams(temperature=0.0, max_new_tokens=90)
    dense = generate(Engine(model, max_batch=1), [[5, 6, 7]], params)
    engine = PagedEngine(model, max_batch=1, page_size=4)
    peak = []
    from jaxformer.infer.paged_batcher import PagedBatcher
    from jaxformer.infer.generate import Sequence

    batcher, seq = PagedBatcher(engine), Sequence([5, 6, 7], params, max_len=engine.max_len)
    batcher.add(seq)
    while batcher.active:
        batcher.step()
        peak.append(engine.pool.used)
    assert seq.tokens == dense[0].tokens and len(seq.tokens) == 90
    assert max(peak) <= 4  # a 6-token window spans at most 3 pages of 4, plus the one being filled


def test_pool_takes_nine_tenths_of_free_accelerator_memory(monkeypatch):
    """On an accelerator the pool is 90% of the memory the weights left free, times the tensor ways."""
    from jaxformer.infer import paged_engine

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    class Mesh:
        def __init__(self, device, tensor):
            self.devices, self.shape = np.array([device]), {"data": 1, "tensor": tensor}

    gpu = Device({"bytes_limit": 80 * 2**30, "bytes_in_use": 16 * 2**30})
    assert paged_engine.free_device_memory(Mesh(gpu, 1)) == int(0.9 * 64 * 2**30)
    assert paged_engine.free_device_memory(Mesh(gpu, 4)) == int(0.9 * 64 * 2**30 * 4)
    assert paged_engine.free_device_memory(Mesh(Device(None), 1)) is None  # CPU: the dense engine's tokens
    assert paged_engine.free_device_memory(Mesh(Device({"bytes_in_use": 5}), 1)) is None


def test_engine_errors_name_the_fix(model):
    with pytest.raises(ValueError, match="cannot hold one sequence of max_len=64.*kv-memory"):
        PagedEngine(model, page_size=4, num_pages=10)
    engine = PagedEngine(model, max_batch=2, page_size=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.admit(0, [1, 500], 2, SamplingParams())
    with pytest.raises(ValueError, match="need 1 to 63"):
        engine.admit(0, list(range(64)), 64, SamplingParams())


def test_server_reports_cached_prompt_tokens(tmp_path):
    """Two completions of the same 40-token prompt: the second reports the 32 tokens of its two full 16-token
    pages as cached (the last page is never shared: its final token must be computed)."""
    import httpx

    from jaxformer.serve import ServerThread, create_app

    model = DecoderLM(CONFIGS["llama_gqa"], rngs=nnx.Rngs(0))
    srv = ServerThread(create_app(model, None, model_name="m", max_batch=2)).start()
    try:
        body = {"model": "m", "prompt": list(range(1, 41)), "max_tokens": 3, "temperature": 0}
        first = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()
        second = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()
        health = httpx.get(f"{srv.url}/health", timeout=10).json()
    finally:
        srv.stop()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert health["prefix_hit_tokens"] == 32 and health["page_size"] == 16


def test_sharded_engine_on_eight_fake_devices_matches_one(tmp_path):
    """Tensor parallel 4 (heads, MLP, vocab, the pages' kv heads); for a MoE model, expert 2 x tensor 2; the Pallas
    paged kernel (interpreted) per tensor shard, with and without attention sinks; latent attention on tensor 2:
    the greedy tokens equal the single-device engine's
    (tests/paged_mesh_worker.py runs both in one process)."""
    out = tmp_path / "report.json"
    run_on_eight_devices(str(ROOT / "tests" / "paged_mesh_worker.py"), str(out))
    report = json.loads(out.read_text())
    assert report["devices"] == 8
    for case in ("dense_tensor4", "moe_expert2_tensor2", "pallas_tensor2", "pallas_sinks_tensor2", "latent_tensor2"):
        r = report[case]
        assert r["tokens"] == r["tokens_one_device"] and len(r["tokens"][0]) == 10, case
        if case.startswith("latent"):  # a latent page holds one head: the same on every device
            assert "tensor" not in r["pool_spec"], case
        else:
            assert r["pool_spec"][2] == "tensor", case  # the pages' kv-head axis
