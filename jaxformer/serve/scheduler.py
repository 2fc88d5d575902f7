"""The serving loop: one thread owns the engine; requests join and leave between decode steps.

Each iteration the thread (1) applies cancellations (client gone, shutdown deadline), (2) admits
waiting sequences into free slots (prefill), (3) runs one decode step for every active sequence,
and (4) hands each request its new text/tokens through its asyncio queue. A request that arrives
while others decode therefore joins at the next step (continuous batching). Admission is bounded:
with all slots busy and `max_queue` sequences waiting, submit() answers 429.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import Sequence as Seq

from jaxformer.infer.generate import Sequence, batcher_for
from jaxformer.serve.protocol import APIError

log = logging.getLogger("jaxformer.serve")


@dataclasses.dataclass
class Event:
    """What one choice of a request gained in one iteration (or its error)."""

    index: int
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: APIError | None = None


class Ticket:
    """A submitted request: its sequences (choices) and the asyncio queue their events arrive on."""

    def __init__(self, seqs: Seq[Sequence], loop: asyncio.AbstractEventLoop):
        self.seqs = list(seqs)
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.sent = [0] * len(self.seqs)  # tokens already handed out, per choice
        self.cancelled = False

    def push(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class Scheduler:
    """Continuous batching over an engine (a dense Engine's slots or a PagedEngine's pages), driven by a background
    thread."""

    def __init__(self, engine, *, max_queue: int = 64, drain_timeout: float = 30.0, prefill_chunk: int | None = None,
                 drafter=None):
        paged = hasattr(engine, "pool")
        if drafter is not None and not paged:
            raise ValueError("speculative decoding needs the paged engine")
        self._batcher_kw = {k: v for k, v in (("chunk", prefill_chunk), ("drafter", drafter)) if v is not None and paged}
        self.engine, self.batcher = engine, batcher_for(engine, **self._batcher_kw)
        self.max_queue, self.drain_timeout = max_queue, drain_timeout
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._owner: dict[int, tuple[Ticket, int]] = {}  # id(seq) -> (ticket, choice index), until done
        self._cancels: list[Ticket] = []
        self._paused = self._stopping = False
        self._budget: int | None = None  # iterations left before pausing again (None: no limit)
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.stats = collections.Counter()

    # ------------------------------------------------------------------------- called from the server

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jaxformer-scheduler", daemon=True)
            self._thread.start()

    def submit(self, seqs: Seq[Sequence], loop: asyncio.AbstractEventLoop) -> Ticket:
        """Queue a request's sequences; 429 when the queue is full, 503 while shutting down."""
        ticket = Ticket(seqs, loop)
        with self._cv:
            if self._stopping:
                raise APIError(503, "the server is shutting down", code="server_shutting_down")
            capacity = self.engine.max_batch + self.max_queue
            if len(self._owner) + len(seqs) > capacity:
                self.stats["rejected"] += 1
                raise APIError(429, f"the server is at capacity ({self.engine.max_batch} running, "
                                    f"{self.max_queue} queued); retry later", code="queue_full")
            for i, seq in enumerate(seqs):
                self._owner[id(seq)] = (ticket, i)
                self._waiting.append(seq)
            self.stats["requests"] += 1
            self._cv.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request's sequences at the next iteration and free their slots (client went away)."""
        with self._cv:
            if not ticket.cancelled and any(id(s) in self._owner for s in ticket.seqs):
                ticket.cancelled = True
                self._cancels.append(ticket)
                self._cv.notify()

    def pause(self) -> None:
        """Hold the loop after its current iteration (requests still queue, up to the bound)."""
        with self._cv:
            self._paused = True

    def resume(self, iterations: int | None = None) -> None:
        """Run again; with `iterations`, pause after that many admit-and-step rounds (single-stepping)."""
        with self._cv:
            self._paused, self._budget = False, iterations
            self._cv.notify()

    def snapshot(self) -> dict:
        with self._cv:
            pool = self.engine.pool.stats() if hasattr(self.engine, "pool") else {}
            return {"slots": self.engine.max_batch, "active": len(self.batcher.active), "waiting": len(self._waiting),
                    "max_queue": self.max_queue, "paused": self._paused, "stopping": self._stopping,
                    **(self.batcher.stats() if hasattr(self.batcher, "stats") else {}), **pool, **self.stats}

    def begin_shutdown(self, drain_timeout: float | None = None) -> None:
        """Refuse new requests and end waiting ones (503); running ones finish, or are cut at the deadline."""
        timeout = self.drain_timeout if drain_timeout is None else drain_timeout
        with self._cv:
            self._stopping, self._paused, self._budget = True, False, None
            deadline = time.monotonic() + timeout
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            while self._waiting:
                self._fail(self._waiting.popleft(), APIError(503, "the server is shutting down",
                                                             code="server_shutting_down"))
            self._cv.notify()

    def close(self, drain_timeout: float | None = None) -> None:
        """begin_shutdown, then wait for the loop to end."""
        self.begin_shutdown(drain_timeout)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------------- the loop

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._cancels) and (self._paused or not (self._waiting
                                                                                        or self.batcher.active)):
                    self._cv.wait()
                self._apply_cancels()  # even while paused: a client that left frees its slot at once
                if self._stopping and self._deadline is not None and time.monotonic() >= self._deadline:
                    for seq in self.batcher.active:
                        self.batcher.cancel(seq, "abort")
                        self._emit(seq, "")
                if self._stopping and not self.batcher.active:
                    return
                if self._paused:
                    continue
                admit = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.batcher.free_slots()))]
                if self._budget is not None:
                    self._budget -= 1
                    self._paused = self._budget <= 0
            try:
                for seq in admit:
                    self.stats["prefills"] += 1
                    self._emit(seq, self.batcher.add(seq))
                if self.batcher.active:
                    self.stats["max_active"] = max(self.stats["max_active"], len(self.batcher.active))
                    self.stats["steps"] += 1
                    for seq, delta in self.batcher.step():
                        self._emit(seq, delta)
            except Exception:  # an engine failure: fail what was running, start over with clean slots
                log.exception("generation failed")
                for seq in set(self.batcher.active) | set(admit):
                    self._fail(seq, APIError(500, "internal error during generation", code="internal_error"))
                self.batcher = batcher_for(self.engine, **self._batcher_kw)
                self.engine.reset()

    def _apply_cancels(self) -> None:
        for ticket in self._cancels:
            for seq in ticket.seqs:
                if seq in self._waiting:
                    self._waiting.remove(seq)
                    seq.finish("abort")
                elif not seq.done:
                    self.batcher.cancel(seq, "abort")
                if self._owner.pop(id(seq), None) is not None:
                    self.stats["cancelled"] += 1
        self._cancels.clear()

    def _emit(self, seq: Sequence, delta: str) -> None:
        owner = self._owner.get(id(seq))
        if owner is None:
            return
        ticket, i = owner
        start, ticket.sent[i] = ticket.sent[i], len(seq.tokens)
        ticket.push(Event(i, delta, seq.tokens[start:], seq.logprobs[start:], seq.top_logprobs[start:],
                          seq.finish_reason))
        if seq.done:
            with self._cv:
                self._owner.pop(id(seq), None)
                self.stats["completed"] += 1

    def _fail(self, seq: Sequence, error: APIError) -> None:
        owner = self._owner.pop(id(seq), None)
        seq.finish("error")
        if owner is not None:
            owner[0].push(Event(owner[1], finish_reason="error", error=error))
