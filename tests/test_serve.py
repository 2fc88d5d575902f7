"""The OpenAI-compatible server end to end: the real `openai` client against a server on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import openai
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.data.tokenizer import Tokenizer
from jaxformer.models import DecoderLM
from jaxformer.serve import ServerThread, create_app
from tests.test_infer import uncached_greedy

MODEL = "tiny-llama"
KEY = "test-key-123"


@pytest.fixture(scope="module")
def tok(tokenizer):
    return Tokenizer(tokenizer.tok)


@pytest.fixture(scope="module")
def model(tokenizer):
    cfg = ModelConfig.llama(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            d_ff=64, max_seq_len=128, init_std=0.3)
    return DecoderLM(cfg, rngs=nnx.Rngs(11))


def start(model, tok, **kw) -> ServerThread:
    kw = {"model_name": MODEL, "max_batch": 4, "max_queue": 16, **kw}
    return ServerThread(create_app(model, tok, **kw)).start()


@pytest.fixture(scope="module")
def server(model, tok):
    srv = start(model, tok)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(model, tok, prompt_ids, max_tokens, stop_ids) -> str:
    """Greedy text by re-running the uncached forward each step (independent of the engine and server)."""
    return tok.decode(uncached_greedy(model, prompt_ids, max_tokens, stop_ids))


# ----------------------------------------------------------------------------- happy paths

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4


def test_completion_matches_uncached_reference(client, model, tok):
    prompt = "def parse(text):\n    "
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, logprobs=2)
    choice = r.choices[0]
    assert choice.text == reference(model, tok, tok.encode_prompt(prompt), 20, tok.eos_ids)
    assert r.usage.prompt_tokens == len(tok.encode_prompt(prompt))
    assert r.usage.completion_tokens == len(choice.logprobs.tokens) and choice.finish_reason in ("length", "stop")
    assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs)  # tokens with equal text share a key
    assert all(lp <= max(top.values()) + 1e-6 for lp, top in zip(choice.logprobs.token_logprobs,
                                                                  choice.logprobs.top_logprobs))

    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_completion_token_prompts_echo_n_and_seed(client, model, tok):
    ids = tok.encode("import sys\n")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert r.choices[0].text == tok.decode(ids) + reference(model, tok, ids, 8, tok.eos_ids)
    r = client.completions.create(model=MODEL, prompt=["a = ", "b = "], n=2, max_tokens=6, temperature=0.9, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    again = client.completions.create(model=MODEL, prompt=["a = ", "b = "], n=2, max_tokens=6, temperature=0.9, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded sampling reproduces


def test_chat_matches_uncached_reference(client, model, tok):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, logprobs=True,
                                       top_logprobs=3)
    prompt = tok.encode_chat(messages)  # what transformers' apply_chat_template(tokenize=True) gives
    expected = reference(model, tok, prompt, 16, tok.chat_stop_ids)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == expected
    assert r.usage.prompt_tokens == len(prompt)
    assert all(len(t.top_logprobs) == 3 for t in r.choices[0].logprobs.content)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings_cut_the_text(client):
    base = client.completions.create(model=MODEL, prompt="x = 1\n", max_tokens=24, temperature=0).choices[0].text
    stop = next(base[i:i + 2] for i in range(3, len(base) - 2)  # a 2-character stop first seen mid-text
                if base[i:i + 2].strip() and base[i:i + 2] not in base[:i + 1])
    r = client.completions.create(model=MODEL, prompt="x = 1\n", max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == base[:base.index(stop)] and r.choices[0].finish_reason == "stop"


def test_fifty_concurrent_requests_equal_their_solo_runs(server, client):
    """50 greedy requests from 10 threads share decode steps and each equals its output when run alone."""
    prompts = [("def f%d(x):\n" % i) * (1 + i % 4) for i in range(50)]
    lengths = [4 + (7 * i) % 21 for i in range(50)]

    def ask(i):
        return client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i], temperature=0)

    solo = [ask(i).choices[0].text for i in range(50)]
    before = httpx.get(server.url + "/health").json()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        together = list(pool.map(ask, range(50)))
    assert [r.choices[0].text for r in together] == solo
    assert all(r.usage.completion_tokens <= lengths[i] for i, r in enumerate(together))
    after = httpx.get(server.url + "/health").json()
    assert after["max_active"] > 1 and after["completed"] - before["completed"] == 50
    assert after["steps"] - before["steps"] < sum(r.usage.completion_tokens for r in together)  # shared steps


# ----------------------------------------------------------------------------- bad inputs

BAD_REQUESTS = [  # (route, body, status)
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", {"prompt": "x"}, 400),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404),
    ("/v1/completions", {"model": MODEL}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [[]]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [10 ** 9]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 400}, 400),  # longer than the context
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10 ** 6}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "12"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 2.5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": -0.1}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": None, "n": 0}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 6}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 10}}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": ""}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 300}]}, 400),
    ("/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("/v1/nothing", {}, 404),
]


@pytest.mark.parametrize("route,body,status", BAD_REQUESTS, ids=[f"{i}" for i in range(len(BAD_REQUESTS))])
def test_bad_input_gets_a_4xx_error_body(server, route, body, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + route, headers={"Content-Type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]


def test_openai_client_raises_on_bad_input(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=5000)
    assert httpx.get(str(client.base_url).rstrip("/") + "/completions").status_code == 405


def test_oversized_bodies_get_413_before_parsing_and_long_prompts_400(model, tok):
    srv = start(model, tok, max_body_bytes=2048, warmup=False)
    try:
        big = b'{"model": "' + MODEL.encode() + b'", "prompt": "' + b"x" * 4096 + b'"}'
        r = httpx.post(srv.url + "/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "2048" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/chat/completions", content=iter([b"{" + b" " * 1500, b" " * 1500 + b"}"]),
                       headers={"Content-Type": "application/json"})  # chunked: no Content-Length to trust
        assert r.status_code == 413
        r = httpx.post(srv.url + "/v1/completions", content=b"{" + b" " * 3000, headers={"Content-Type": "x"})
        assert r.status_code == 413  # not 400 for bad JSON: the size check comes first
        ids = list(range(10, 10 + 200))  # a token prompt longer than the 128-token context
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1})
        assert r.status_code == 400
        assert "128" in r.json()["error"]["message"] and "200" in r.json()["error"]["message"]
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- auth, queue, disconnects, shutdown

def test_api_key_guards_every_route_but_health(model, tok):
    srv = start(model, tok, api_key=KEY, warmup=False)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.get(srv.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = httpx.post(srv.url + "/v1/completions", headers=headers, json={"model": MODEL, "prompt": "x"})
            assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        assert ok.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0).choices[0].text is not None
    finally:
        srv.stop()


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_full_queue_answers_429_and_disconnects_free_slots(model, tok):
    srv = start(model, tok, max_batch=1, max_queue=1, warmup=False)
    sched = srv.app.state.scheduler
    body = {"model": MODEL, "prompt": "x", "max_tokens": 5, "temperature": 0}
    try:
        sched.pause()
        results = []
        threads = [threading.Thread(target=lambda: results.append(httpx.post(srv.url + "/v1/completions", json=body,
                                                                             timeout=60))) for _ in range(2)]
        for t in threads:
            t.start()
        _wait(lambda: sched.snapshot()["waiting"] == 2)  # one slot + one queue place: full
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        sched.resume()
        for t in threads:
            t.join()
        assert [x.status_code for x in results] == [200, 200]

        # a streaming client that goes away mid-stream frees its slot (even while the loop is paused)
        long = {**body, "max_tokens": 100, "stream": True}
        sched.pause()
        with httpx.stream("POST", srv.url + "/v1/completions", json=long, timeout=30) as resp:
            sched.resume(iterations=1)  # admit it and decode one step, then hold
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            _wait(lambda: sched.snapshot()["paused"])
            assert sched.snapshot()["active"] == 1
        _wait(lambda: sched.snapshot()["active"] == 0)
        assert sched.snapshot()["cancelled"] == 1
        sched.resume()
        assert httpx.post(srv.url + "/v1/completions", json=body, timeout=30).status_code == 200
    finally:
        sched.resume()
        srv.stop()


def test_shutdown_ends_in_flight_streams_cleanly(model, tok):
    srv = start(model, tok, max_batch=2, warmup=False)
    sched = srv.app.state.scheduler
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
    sched.pause()
    stream = client.completions.create(model=MODEL, prompt="x", max_tokens=100, temperature=0, stream=True)
    sched.resume(iterations=1)  # admitted, one step decoded, then held: mid-generation when shutdown starts
    first = next(iter(stream))
    stopper = threading.Thread(target=srv.stop, kwargs={"drain_timeout": 0.0})
    stopper.start()
    rest = list(stream)  # the stream ends with a final chunk and [DONE], not a broken connection
    stopper.join(30)
    assert not stopper.is_alive() and not srv.thread.is_alive()
    assert first.choices[0].finish_reason is None and rest[-1].choices[0].finish_reason == "abort"
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health")
