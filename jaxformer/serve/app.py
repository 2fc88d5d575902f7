"""An OpenAI-compatible HTTP server over the engine: /v1/models, /v1/completions, /v1/chat/completions, /health.

Responses follow OpenAI's shapes (streaming as server-sent events ending in `data: [DONE]`);
errors are {"error": {...}} bodies with 4xx codes for anything a client sent wrong. With an API
key every route but /health needs `Authorization: Bearer KEY`. Requests go to one Scheduler
thread (continuous batching); a client that disconnects frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxformer.data.tokenizer import Tokenizer
from jaxformer.infer.paged_batcher import DEFAULT_CHUNK
from jaxformer.infer.paged_engine import PagedEngine
from jaxformer.infer.generate import Sequence
from jaxformer.serve.protocol import APIError, GenRequest, ServerInfo, parse_chat, parse_completion
from jaxformer.serve.scheduler import Event, Scheduler, Ticket

log = logging.getLogger("jaxformer.serve")


MAX_BODY_BYTES = 1 << 20  # request bodies above this get 413 before any parsing


def create_app(model, tokenizer: Tokenizer | None, *, model_name: str = "jaxformer", api_key: str | None = None,
               max_batch: int = 8, max_queue: int = 64, max_len: int | None = None, drain_timeout: float = 30.0,
               engine=None, warmup: bool = True, max_body_bytes: int = MAX_BODY_BYTES,
               prefill_chunk: int = DEFAULT_CHUNK, drafter=None) -> FastAPI:
    """The FastAPI app serving `model` (its scheduler starts and stops with the app's lifespan); the engine is a
    PagedEngine unless one is given (infer.Engine or PagedEngine); `drafter` turns on speculative decoding."""
    engine = engine or PagedEngine(model, max_batch=max_batch, max_len=max_len)
    scheduler = Scheduler(engine, max_queue=max_queue, drain_timeout=drain_timeout, prefill_chunk=prefill_chunk,
                          drafter=drafter)
    info = ServerInfo(model_name, engine.max_len, engine.config.vocab_size, tokenizer)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if warmup:
            await asyncio.to_thread(engine.warmup)
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="jaxformer", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.engine, app.state.info = scheduler, engine, info

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "You didn't provide an API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, str(e.errors())).body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, "internal server error", code="internal_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        snap = scheduler.snapshot()
        return {"status": "shutting_down" if snap["stopping"] else "ok", "model": model_name, **snap}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "jaxformer",
                "max_model_len": info.max_len}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request):
        authorize(request)
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        return await respond(request, parse_completion(await read_json(request, max_body_bytes), info))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        return await respond(request, parse_chat(await read_json(request, max_body_bytes), info))

    async def respond(request: Request, req: GenRequest):
        seqs = []
        for prompt, params in zip(req.prompts, req.params):
            for j in range(req.n):
                p = params if params.seed is None else params.replace(seed=params.seed + j)
                try:
                    seqs.append(Sequence(prompt, p, max_len=engine.max_len, tokenizer=tokenizer,
                                         stop_ids=req.stop_ids))
                except ValueError as e:  # validation should have caught it; still the client's input
                    raise APIError(400, str(e)) from None
        ticket = scheduler.submit(seqs, asyncio.get_running_loop())
        answer = Answer(req, tokenizer, model_name, len(seqs), seqs)
        if req.stream:
            return StreamingResponse(stream(ticket, answer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(request, ticket, answer)

    async def collect(request: Request, ticket: Ticket, answer: "Answer"):
        get: asyncio.Future | None = None
        try:
            while not answer.finished:
                get = get or asyncio.ensure_future(ticket.queue.get())
                done, _ = await asyncio.wait({get}, timeout=1.0)
                if not done:
                    if await request.is_disconnected():
                        return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
                    continue
                event, get = get.result(), None
                if event.error is not None:
                    raise event.error
                answer.add(event)
            return answer.full()
        finally:
            if get is not None:
                get.cancel()
            if not answer.finished:
                scheduler.cancel(ticket)

    async def stream(ticket: Ticket, answer: "Answer") -> AsyncIterator[str]:
        try:
            for chunk in answer.opening():
                yield sse(chunk)
            while not answer.finished:
                event = await ticket.queue.get()
                if event.error is not None:
                    yield sse(event.error.body())
                    break
                chunk = answer.add(event)
                if chunk is not None:
                    yield sse(chunk)
            if answer.req.include_usage and answer.finished:
                yield sse(answer.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:  # also reached when the client disconnects (the response task is cancelled)
            if not answer.finished:
                scheduler.cancel(ticket)

    return app


async def read_json(request: Request, limit: int = MAX_BODY_BYTES):
    """The request's JSON body; 413 for a body over `limit` bytes (checked before parsing, while reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is over {limit} bytes ({size} seen), the most this server accepts "
                    "(jaxformer serve --max-body-bytes)", code="request_too_large")


def _first_wins(pairs) -> dict:
    """{text: logprob} keeping the likelier of tokens that print the same (pairs come most likely first)."""
    out: dict = {}
    for text, lp in pairs:
        out.setdefault(text, lp)
    return out


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Answer:
    """Accumulates a request's events into OpenAI response objects (whole, or chunk by chunk)."""

    def __init__(self, req: GenRequest, tokenizer: Tokenizer | None, model: str, n_choices: int,
                 seqs: list | None = None):
        self.req, self.tok, self.model, self.seqs = req, tokenizer, model, seqs or []
        self.chat = req.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text = [""] * n_choices
        self.tokens: list[list[int]] = [[] for _ in range(n_choices)]
        self.logprobs: list[list] = [[] for _ in range(n_choices)]
        self.tops: list[list] = [[] for _ in range(n_choices)]
        self.finish: list[str | None] = [None] * n_choices
        self.offset = [len(self._echo(i)) for i in range(n_choices)]  # text_offset of the next token

    @property
    def finished(self) -> bool:
        return all(f is not None for f in self.finish)

    def _echo(self, i: int) -> str:
        return (self.req.prompt_texts[i // self.req.n] or "") if self.req.echo else ""

    def _token_text(self, t: int) -> str:
        return self.tok.token_text(t) if self.tok is not None else str(t)

    def add(self, ev: Event) -> dict | None:
        """Record an event; returns its streaming chunk (None when it carries nothing to show)."""
        i = ev.index
        self.text[i] += ev.text
        self.tokens[i] += ev.tokens
        self.logprobs[i] += ev.logprobs
        self.tops[i] += ev.top_logprobs
        self.finish[i] = ev.finish_reason
        want_lp = self.req.params[0].logprobs is not None and ev.tokens
        if not (ev.text or ev.finish_reason or want_lp):
            return None
        lp = self._logprobs(i, ev.tokens, ev.logprobs, ev.top_logprobs) if want_lp else None
        if self.chat:
            delta = {"content": ev.text} if ev.text else {}
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}
            return self._chunk([choice])
        return self._chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])

    def _logprobs(self, i: int, tokens, lps, tops) -> dict:
        texts = [self._token_text(t) for t in tokens]
        top = [[(self._token_text(t), lp) for t, lp in row] for row in tops]
        if self.chat:
            entry = lambda s, lp: {"token": s, "logprob": lp, "bytes": list(s.encode())}  # noqa: E731
            return {"content": [{**entry(s, lp), "top_logprobs": [entry(ts, tlp) for ts, tlp in row]}
                                for s, lp, row in zip(texts, lps, top)]}
        offsets = []
        for s in texts:
            offsets.append(self.offset[i])
            self.offset[i] += len(s)
        with_top = self.req.params[0].logprobs > 0
        return {"tokens": texts, "token_logprobs": list(lps), "text_offset": offsets,
                "top_logprobs": [_first_wins(row) for row in top] if with_top else None}

    def _chunk(self, choices: list) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def opening(self) -> list[dict]:
        """Chunks sent before any token: the assistant role (chat) or the echoed prompt (completions)."""
        if self.chat:
            return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for i in range(len(self.text))]
        return [self._chunk([{"index": i, "text": self._echo(i), "logprobs": None, "finish_reason": None}])
                for i in range(len(self.text)) if self._echo(i)]

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.req.prompts)
        completion = sum(len(t) for t in self.tokens)
        cached = sum(s.cached_tokens or 0 for s in self.seqs[::self.req.n])  # each prompt's first choice
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def usage_chunk(self) -> dict:
        return {**self._chunk([]), "usage": self.usage()}

    def full(self) -> dict:
        """The non-streaming response."""
        self.offset = [len(self._echo(i)) for i in range(len(self.text))]
        choices = []
        for i, text in enumerate(self.text):
            lp = (self._logprobs(i, self.tokens[i], self.logprobs[i], self.tops[i])
                  if self.req.params[0].logprobs is not None else None)
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": self._echo(i) + text, "logprobs": lp,
                                "finish_reason": self.finish[i]})
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage()}


# ----------------------------------------------------------------------------- running it

def _uvicorn_server(app: FastAPI, host: str, port: int, log_level: str):
    import uvicorn

    scheduler: Scheduler = app.state.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl-C / SIGTERM: drain the scheduler first
            scheduler.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(scheduler.drain_timeout) + 5)
    return Server(config)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app in this thread until interrupted; shutdown lets running requests end cleanly."""
    _uvicorn_server(app, host, port, log_level).run()


class ServerThread:
    """The app on a background thread (tests, benchmarks): start(), .url, stop()."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host = app, host
        self.server = _uvicorn_server(app, host, port, log_level)
        self.thread = threading.Thread(target=self.server.run, name="jaxformer-server", daemon=True)
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, drain_timeout: float | None = None, timeout: float = 60.0) -> None:
        """Shut down as on Ctrl-C: running requests end (cut at the drain deadline), then the thread exits."""
        self.app.state.scheduler.begin_shutdown(drain_timeout)
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("the server did not stop")

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
