"""Host side of generation: per-request bookkeeping (stops, text deltas) and continuous batching.

`Sequence` follows one request: its tokens, logprobs, stop token ids, stop strings and the text
it has released so far. Text is released in deltas that never end inside a multi-byte character
and never show the start of what may become a stop string.

`Batcher` runs sequences over an Engine's slots: a sequence joins a free slot (prefill) between
decode steps and leaves when it finishes, so requests share every decode step (continuous
batching). `generate` is the offline loop over it; jaxformer.serve's scheduler is the online one.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable
from typing import Sequence as Seq

import numpy as np

from jaxformer.data.tokenizer import Tokenizer
from jaxformer.infer.engine import Engine, StepOut, logprobs_mode
from jaxformer.infer.sampling import SamplingParams


class Sequence:
    """One request's state on the host: prompt, generated tokens, logprobs, text, finish reason."""

    def __init__(self, prompt: Seq[int], params: SamplingParams, *, max_len: int,
                 tokenizer: Tokenizer | None = None, stop_ids: Iterable[int] = ()):
        if not prompt:
            raise ValueError("prompt is empty: give at least one token")
        if len(prompt) >= max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the context of {max_len} tokens")
        if params.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer (use stop_token_ids with token-id prompts)")
        self.prompt, self.params, self.tokenizer = list(prompt), params, tokenizer
        self.stop_ids = frozenset(params.stop_token_ids) | frozenset(stop_ids)
        self.limit = min(params.max_new_tokens, max_len - len(prompt))
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None
        self.seed: int | None = None  # the sampling seed once admitted (a paged engine keeps it across preemptions)
        self.cached_tokens: int | None = None  # prompt tokens a paged engine found in its prefix cache
        self.preemptions = 0  # times a paged engine put it back in the queue to free pages
        self.text = ""  # released text (the full text once finished)
        self._pending = ""  # decoded but not yet released (may be the start of a stop string)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def append(self, out: StepOut, row: int) -> str:
        """Take row `row` of a step's output; returns the newly released text ("" without a tokenizer)."""
        return self.extend(out.tokens[row:row + 1], out.logprobs[row:row + 1], out.top_ids[row:row + 1],
                           out.top_logprobs[row:row + 1])

    def extend(self, tokens, logprobs, top_ids, top_logprobs) -> str:
        """Take several tokens in order (a speculative step's), up to where the sequence ends; returns the newly
        released text."""
        delta = ""
        for j in range(len(tokens)):
            if self.done:
                break
            delta += self._take(int(tokens[j]), logprobs[j], top_ids[j], top_logprobs[j])
        return delta

    def _take(self, token: int, logprob, top_ids, top_logprobs) -> str:
        if token in self.stop_ids:
            return self.finish("stop")
        self.tokens.append(token)
        if self.params.logprobs is not None:
            self.logprobs.append(float(logprob))
            n = self.params.logprobs
            self.top_logprobs.append([(int(i), float(lp)) for i, lp in zip(top_ids[:n], top_logprobs[:n])])
        delta = self._release() if self.tokenizer is not None else ""
        if not self.done and len(self.tokens) >= self.limit:
            delta += self.finish("length")
        return delta

    def finish(self, reason: str) -> str:
        """End the sequence; returns the text still held back (none after a stop string)."""
        if self.done:
            return ""
        self.finish_reason = reason
        rest, self._pending = self._pending, ""
        self.text += rest
        return rest

    def _release(self) -> str:
        new = self.tokenizer.decode(self.tokens)[len(self.text):]
        matches = [at for stop in self.params.stop if (at := new.find(stop)) >= 0]
        if matches:  # released text never holds a whole stop string nor ends in the start of one
            delta = new[:min(matches)]
            self.text += delta
            self._pending = ""
            self.finish_reason = "stop"
            return delta
        hold = max((k for stop in self.params.stop for k in range(1, min(len(stop), len(new) + 1))
                    if new.endswith(stop[:k])), default=0)
        hold = max(hold, len(new) - len(new.rstrip("\ufffd")))  # a character split across tokens: wait for it
        delta = new[:len(new) - hold]
        self.text += delta
        self._pending = new[len(new) - hold:]
        return delta


class Batcher:
    """Sequences over an engine's slots: add() prefills into a free slot, step() decodes all of them."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.slots: list[Sequence | None] = [None] * engine.max_batch

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def free_slots(self) -> int:
        return self.slots.count(None)

    def add(self, seq: Sequence) -> str:
        """Prefill `seq` into a free slot and take its first token; returns its first text delta."""
        slot = self.slots.index(None)  # ValueError when full: callers check free_slots()
        out = self.engine.prefill(slot, seq.prompt, seq.params, n_top=logprobs_mode([seq.params.logprobs]))
        self.slots[slot] = seq
        delta = seq.append(out, 0)
        self._free_finished()
        return delta

    def step(self) -> list[tuple[Sequence, str]]:
        """One decode step for every active sequence; returns (sequence, text delta) for each."""
        active = np.array([s is not None for s in self.slots])
        if not active.any():
            return []
        out = self.engine.decode(active, n_top=logprobs_mode([s.params.logprobs for s in self.active]))
        events = [(s, s.append(out, i)) for i, s in enumerate(self.slots) if s is not None]
        self._free_finished()
        return events

    def cancel(self, seq: Sequence, reason: str = "abort") -> None:
        """Stop `seq` now and free its slot."""
        seq.finish(reason)
        self._free_finished()

    def _free_finished(self) -> None:
        self.slots = [None if s is not None and s.done else s for s in self.slots]


def batcher_for(engine, **kwargs):
    """The batcher an engine needs: Batcher over a dense Engine's slots, PagedBatcher over a PagedEngine's pages."""
    from jaxformer.infer.paged_batcher import PagedBatcher  # imports this module (Sequence)
    from jaxformer.infer.paged_engine import PagedEngine

    return PagedBatcher(engine, **kwargs) if isinstance(engine, PagedEngine) else Batcher(engine)


def generate(engine: Engine, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams], *,
             tokenizer: Tokenizer | None = None, stop_ids: Iterable[int] = (),
             on_text: Callable[[int, str], None] | None = None, **batcher_kw) -> list[Sequence]:
    """Generate for every prompt (continuous batching over the engine's slots); finished Sequences in order.
    A PagedEngine's batcher takes `chunk` (prefill tokens per step) and `drafter` (speculative decoding)."""
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling settings")
    stop_ids = frozenset(stop_ids)
    seqs = [Sequence(p, sp, max_len=engine.max_len, tokenizer=tokenizer, stop_ids=stop_ids)
            for p, sp in zip(prompts, params)]
    index = {id(s): i for i, s in enumerate(seqs)}
    waiting, batcher = collections.deque(seqs), batcher_for(engine, **batcher_kw)

    def emit(seq: Sequence, delta: str) -> None:
        if on_text is not None and delta:
            on_text(index[id(seq)], delta)

    while waiting or batcher.active:
        while waiting and batcher.free_slots():
            seq = waiting.popleft()
            emit(seq, batcher.add(seq))
        for seq, delta in batcher.step():
            emit(seq, delta)
    return seqs
