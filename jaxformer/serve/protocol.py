"""OpenAI request bodies -> validated generation requests; every bad input becomes an APIError (4xx).

Supported fields follow OpenAI's /v1/completions and /v1/chat/completions; extensions (as in
vLLM): top_k, repetition_penalty, stop_token_ids. Fields with no meaning here (user, ...) are
ignored; fields that would change the output in ways the server cannot honour (logit_bias,
tools, suffix, best_of != n, non-text content) are rejected with 400.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxformer.data.tokenizer import Tokenizer
from jaxformer.infer.sampling import SamplingParams

MAX_N = 8  # choices per prompt
MAX_PROMPTS = 32  # prompts per /v1/completions request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions "logprobs" (OpenAI's limit)
MAX_CHAT_TOP_LOGPROBS = 20  # /v1/chat/completions "top_logprobs"
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):  # noqa: A002 (OpenAI's field name)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        default = "invalid_request_error" if status < 500 else "server_error"
        self.type = type or {401: "authentication_error", 429: "rate_limit_error"}.get(status, default)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """What validation needs to know about the served model."""

    model_name: str
    max_len: int  # context: prompt + completion tokens
    vocab_size: int
    tokenizer: Tokenizer | None


@dataclasses.dataclass(frozen=True)
class GenRequest:
    """A validated request: prompts (token ids), settings, and how to answer."""

    kind: str  # "completion" | "chat"
    prompts: tuple[tuple[int, ...], ...]
    prompt_texts: tuple[str | None, ...]  # for echo
    params: tuple[SamplingParams, ...]  # one per prompt (max_tokens may differ per prompt)
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    stop_ids: frozenset[int]  # EOS (and, for chat, end-of-turn tokens) on top of stop_token_ids


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    x = body.get(name)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not lo <= x <= hi:
        raise _bad(f"{x!r} is not a valid value for '{name}': expected a number in [{lo}, {hi}]", name)
    return float(x)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    x = body.get(name)
    if x is None:
        return default
    if not _is_int(x) or x < lo or (hi is not None and x > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise _bad(f"{x!r} is not a valid value for '{name}': expected an integer {rng}", name)
    return x


def _flag(body: dict, name: str, default: bool = False) -> bool:
    x = body.get(name, default)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise _bad(f"{x!r} is not a valid value for '{name}': expected true or false", name)
    return x


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP:
        raise _bad(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
    return tuple(s for s in stop if s)


def _unsupported(body: dict, *names: str) -> None:
    for name in names:
        if body.get(name) not in (None, {}, [], False):
            raise _bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")


def check_model(body: Any, info: ServerInfo) -> dict:
    """The body as a dict naming the served model (400 for non-objects, 404 for other models)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("you must provide a model parameter", "model")
    if model != info.model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{info.model_name}'",
                       param="model", code="model_not_found")
    return body


def _sampling(body: dict, info: ServerInfo, *, logprobs: int | None) -> dict:
    """SamplingParams fields shared by both endpoints (max_new_tokens is set per prompt)."""
    top_k = _integer(body, "top_k", 0, -1, info.vocab_size)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(_is_int(t) and 0 <= t < info.vocab_size for t in stop_ids):
        raise _bad("'stop_token_ids' must be a list of token ids in the vocabulary", "stop_token_ids")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad(f"{seed!r} is not a valid value for 'seed': expected an integer", "seed")
    stop = _stops(body)
    if stop and info.tokenizer is None:
        raise _bad("stop strings need a tokenizer, which this server does not have", "stop")
    return dict(temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                top_k=max(top_k, 0), repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-3, 100.0),
                frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
                seed=seed, stop=stop, stop_token_ids=tuple(stop_ids), logprobs=logprobs)


def _budget(prompt: tuple[int, ...], requested: int | None, default: int | None, info: ServerInfo,
            param: str) -> int:
    """max new tokens for one prompt, checked against the context."""
    room = info.max_len - len(prompt)
    if room < 1:
        raise _bad(f"This model's maximum context length is {info.max_len} tokens, but the prompt has {len(prompt)} "
                   "tokens and leaves no room for a completion; shorten the prompt", "prompt",
                   "context_length_exceeded")
    if requested is None:
        return room if default is None else min(default, room)
    if len(prompt) + requested > info.max_len:
        raise _bad(f"This model's maximum context length is {info.max_len} tokens. However, you requested "
                   f"{len(prompt) + requested} tokens ({len(prompt)} in the prompt, {requested} for the completion). "
                   f"Reduce the prompt or '{param}'", param, "context_length_exceeded")
    return requested


def _common(body: dict, info: ServerInfo) -> tuple[int, bool, bool]:
    n = _integer(body, "n", 1, 1, MAX_N)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = _flag(options or {}, "include_usage")
    return n, stream, include_usage


def parse_completion(body: Any, info: ServerInfo) -> GenRequest:
    """Validate a /v1/completions body."""
    body = check_model(body, info)
    _unsupported(body, "logit_bias", "suffix")
    n, stream, include_usage = _common(body, info)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise _bad("'best_of' other than n is not supported", "best_of", "unsupported_parameter")
    prompts, texts = _completion_prompts(body.get("prompt"), info)
    echo = _flag(body, "echo")
    logprobs = _integer(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    max_tokens = _integer(body, "max_tokens", None, 1)
    common = _sampling(body, info, logprobs=logprobs)
    params = tuple(SamplingParams(max_new_tokens=_budget(p, max_tokens, 16, info, "max_tokens"), **common)
                   for p in prompts)
    stop_ids = info.tokenizer.eos_ids if info.tokenizer else frozenset()
    return GenRequest("completion", prompts, texts, params, n, stream, include_usage, echo, frozenset(stop_ids))


def _completion_prompts(prompt: Any, info: ServerInfo) -> tuple[tuple, tuple]:
    """prompt: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if prompt is None:
        raise _bad("you must provide a prompt", "prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise _bad("'prompt' must be a non-empty string, list of strings, or list of token ids", "prompt")
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise _bad("the prompt is empty", "prompt")
            if info.tokenizer is None:
                raise _bad("this server has no tokenizer: send prompts as lists of token ids", "prompt")
            ids.append(tuple(info.tokenizer.encode_prompt(p)))
            texts.append(p)
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            if not all(0 <= t < info.vocab_size for t in p):
                raise _bad(f"prompt token ids must lie in [0, {info.vocab_size})", "prompt")
            ids.append(tuple(p))
            texts.append(info.tokenizer.decode(p) if info.tokenizer else None)
        else:
            raise _bad("each prompt must be a non-empty string or a non-empty list of token ids", "prompt")
        if not ids[-1]:
            raise _bad("the prompt is empty after tokenization", "prompt")
    if len(ids) > MAX_PROMPTS:
        raise _bad(f"at most {MAX_PROMPTS} prompts per request", "prompt")
    return tuple(ids), tuple(texts)


def parse_chat(body: Any, info: ServerInfo) -> GenRequest:
    """Validate a /v1/chat/completions body."""
    body = check_model(body, info)
    _unsupported(body, "logit_bias", "tools", "functions", "tool_choice", "function_call", "audio", "prediction")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise _bad("only response_format {'type': 'text'} is supported", "response_format", "unsupported_parameter")
    if info.tokenizer is None:
        raise _bad("chat needs a tokenizer, which this server does not have; use /v1/completions with token ids")
    n, stream, include_usage = _common(body, info)
    messages = _messages(body.get("messages"))
    want_logprobs = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", None, 0, MAX_CHAT_TOP_LOGPROBS)
    if top is not None and not want_logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    try:
        text = info.tokenizer.apply_chat_template(messages)
    except Exception as e:  # a template's raise_exception or a render error: the messages do not fit it
        raise _bad(f"the messages do not fit the model's chat template: {e}", "messages") from None
    prompt = tuple(info.tokenizer.encode(text))  # the template writes its own BOS (as transformers' encode_chat)
    if not prompt:
        raise _bad("the chat prompt is empty", "messages")
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, param, None, 1)
    common = _sampling(body, info, logprobs=(top or 0) if want_logprobs else None)
    params = (SamplingParams(max_new_tokens=_budget(prompt, max_tokens, None, info, param), **common),)
    return GenRequest("chat", (prompt,), (text,), params, n, stream, include_usage, False,
                      info.tokenizer.chat_stop_ids)


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise _bad(f"messages[{i}] must be an object with a role in {list(CHAT_ROLES)}", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    if not any(m["content"] for m in out):
        raise _bad("the messages are empty", "messages")
    return out
