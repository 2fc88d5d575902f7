"""Continuous batching over a PagedEngine: admission by free pages, chunked prefill, preemption.

Same interface as infer.generate.Batcher (free_slots, add, step, cancel, active), so `generate` and the
server's scheduler drive either. Each step():

  1. admit   sequences waiting here (preempted ones first) take free rows while the pool has their pages;
             full prompt pages seen before are shared, not computed (their count is the sequence's
             cached_tokens). One that does not fit waits, and so does one whose prompt prefix another row is
             prefilling right now (it shares those pages once they are done): admission stays in arrival order.
  2. prefill at most `chunk` prompt tokens in all, oldest row first, so a long prompt is prefilled over
             several steps while the running sequences keep decoding; a row whose prompt is done samples its
             first token.
  3. grow    a page for every running sequence whose next token starts one; when the pool is dry the
             youngest sequence is preempted: its pages go back and it waits at the front of the queue, to be
             prefilled again from its prompt and what it generated (recomputation; nothing is lost, and its
             sampling keys continue where they were, so a seeded sequence draws the same tokens).
  4. decode  one token for every running sequence.
"""

from __future__ import annotations

import collections
import secrets

import numpy as np

from jaxformer.infer.engine import logprobs_mode
from jaxformer.infer.generate import Sequence
from jaxformer.infer.paged_engine import PagedEngine

DEFAULT_CHUNK = 512  # prompt tokens prefilled per step, across rows


class PagedBatcher:
    """Sequences over a PagedEngine's rows and pages (see the module doc)."""

    def __init__(self, engine: PagedEngine, *, chunk: int = DEFAULT_CHUNK, drafter=None):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 prompt tokens per step, got {chunk}")
        if drafter is not None and engine.config.rope_switch_len is not None:
            raise ValueError("speculative decoding does not cover longrope models (generation re-encodes the cache "
                             "once it passes the original context); serve this model without --speculate")
        if drafter is not None and engine.config.has_state_layers:
            raise ValueError("speculative decoding does not cover models with linear_attention / conv layers (a "
                             "rejected draft token would have to be taken back out of their recurrent state); serve "
                             "this model without --speculate")
        self.engine, self.chunk, self.drafter = engine, chunk, drafter
        self.drafted = self.accepted = 0  # draft tokens proposed / kept by the target
        self.verify_steps = 0  # target calls that checked drafts
        self.rows: list[Sequence | None] = [None] * engine.max_batch
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.admitted: list[int] = []  # rows in admission order (the last is the first preempted)
        self.preemptions = 0

    @property
    def active(self) -> list[Sequence]:
        """Sequences not finished: running, prefilling, or waiting here for pages."""
        return [s for s in self.rows if s is not None] + list(self.waiting)

    def free_slots(self) -> int:
        """How many more sequences add() takes now (free rows not already promised to waiting ones)."""
        return max(0, self.rows.count(None) - len(self.waiting))

    def add(self, seq: Sequence) -> str:
        """Queue a sequence; it is admitted and prefilled in step() (its first text comes from there)."""
        if seq.seed is None:
            seq.seed = seq.params.seed if seq.params.seed is not None else secrets.randbits(32)
        self.waiting.append(seq)
        return ""

    def cancel(self, seq: Sequence, reason: str = "abort") -> None:
        """Stop `seq` now and free its row and pages."""
        seq.finish(reason)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._free_finished()

    def step(self) -> list[tuple[Sequence, str]]:
        """Admit, prefill a chunk, grow, decode (the module doc); (sequence, text delta) per sequence that moved."""
        self._admit()
        events = self._prefill()
        running = [r for r, s in enumerate(self.rows) if s is not None and not s.done and self.engine.remaining(r) == 0]
        room = {r: self._room(r) for r in running} if self.drafter is not None else {}
        while running and not self.engine.grow(running, [room.get(r, 0) for r in running]):
            victim = self.admitted[-1]
            self._preempt(victim)
            if victim in running:
                running.remove(victim)
        if running:
            active = np.zeros(self.engine.max_batch, bool)
            active[running] = True
            n_top = logprobs_mode([self.rows[r].params.logprobs for r in running])
            drafted = self._drafts(running) if self.drafter is not None else None
            if drafted is None:  # no drafter, or no row has a draft this step: the plain (cheaper) decode step
                out = self.engine.decode(active, n_top=n_top)
                events += [(self.rows[r], self.rows[r].append(out, r)) for r in running]
            else:
                events += self._verify(running, active, drafted, n_top)
        self._free_finished()
        return events

    # ------------------------------------------------------------------------- speculative decoding

    def _room(self, row: int) -> int:
        """Drafts a row may take: none with penalties (its distribution moves token by token), and never past its
        token limit or the context."""
        seq = self.rows[row]
        p = seq.params
        if p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty:
            return 0
        return max(0, min(self.drafter.k, seq.limit - len(seq.tokens) - 1,
                          self.engine.max_len - 2 - self.engine.length(row)))

    def _drafts(self, running: list[int]):
        """(rows, drafts, counts, q) from the drafter, or None when no row got a draft."""
        rows = {r: (self.rows[r].prompt + self.rows[r].tokens, self._room(r)) for r in running}
        table, n_draft, q = self.drafter.draft({r: v for r, v in rows.items() if v[1] > 0}, self.engine.max_batch)
        if not n_draft.any():
            self.drafter.verified(rows, np.ones(self.engine.max_batch, np.int64))  # a plain step keeps one token
            return None
        return rows, table, n_draft, q

    def _verify(self, running: list[int], active: np.ndarray, drafted, n_top):
        rows, table, n_draft, q = drafted
        tokens, n_emit, logprobs, top_ids, top_lps = self.engine.verify(active, table, n_draft, q, n_top=n_top)
        self.drafter.verified(rows, n_emit)
        self.drafted += int(n_draft.sum())
        self.accepted += int(sum(n_emit[r] - 1 for r in running))
        self.verify_steps += 1
        return [(self.rows[r], self.rows[r].extend(tokens[r, :n_emit[r]], logprobs[r], top_ids[r], top_lps[r]))
                for r in running]

    def stats(self) -> dict:
        out = {"preemptions": self.preemptions}
        if self.drafter is not None:
            out.update(spec_drafted=self.drafted, spec_accepted=self.accepted, spec_verify_steps=self.verify_steps,
                       spec_acceptance=self.accepted / self.drafted if self.drafted else 0.0)
        return out

    # ------------------------------------------------------------------------- the parts of a step

    def _admit(self) -> None:
        while self.waiting and None in self.rows:
            seq, row = self.waiting[0], self.rows.index(None)
            if self.engine.prefix_in_flight(seq.prompt):
                return  # its prefix is being computed by another row: wait and share it (arrival order kept)
            hit = self.engine.admit(row, seq.prompt + seq.tokens, len(seq.prompt), seq.params, seq.seed)
            if hit is None:
                return  # not enough free pages: wait for running sequences to finish (arrival order kept)
            self.waiting.popleft()
            if seq.cached_tokens is None:
                seq.cached_tokens = hit
            self.rows[row] = seq
            self.admitted.append(row)

    def _prefill(self) -> list[tuple[Sequence, str]]:
        events, budget = [], self.chunk
        for row in list(self.admitted):
            if budget == 0:
                break
            left = self.engine.remaining(row)
            if left == 0:
                continue
            n = min(left, budget)
            budget -= n
            seq = self.rows[row]
            out = self.engine.prefill(row, n, n_top=logprobs_mode([seq.params.logprobs]))
            if out is not None:  # the prompt is in: its first token (this step's decode draws the next one)
                events.append((seq, seq.append(out, 0)))
        return events

    def _preempt(self, row: int) -> None:
        seq = self.rows[row]
        self.engine.release(row)
        if self.drafter is not None:
            self.drafter.release(row)
        self.rows[row] = None
        self.admitted.remove(row)
        self.waiting.appendleft(seq)
        seq.preemptions += 1
        self.preemptions += 1

    def _free_finished(self) -> None:
        for row, seq in enumerate(self.rows):
            if seq is not None and seq.done:
                self.engine.release(row)
                if self.drafter is not None:
                    self.drafter.release(row)
                self.rows[row] = None
                self.admitted.remove(row)
