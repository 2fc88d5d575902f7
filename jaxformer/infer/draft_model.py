"""A draft model for speculative decoding: a smaller model with the target's tokenizer drafts K tokens per row.

The drafter runs its own PagedEngine whose rows follow the target's. Per round, for the rows that draft:

  catch up  the draft's cache takes the tokens the target accepted since (usually one: the target's own draw
            after the last kept draft; two when every draft was kept), and draws draft 0 from the last;
  step      K - 1 single-token steps draw drafts 1 .. K-1;

each draw from the draft's distribution q after the row's temperature / top-k / top-p (greedy rows: argmax),
which verify_step needs in full ([B, K, V] stays on the device). After the target's verdict the draft cache
keeps what is still right: everything up to the last kept draft.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.infer.engine import Slots
from jaxformer.infer.paged_engine import PagedEngine
from jaxformer.infer.speculative import DEFAULT_DRAFT_TOKENS, target_probs
from jaxformer.models.paged_cache import SCRATCH_PAGE

SEED_SALT = 0x5BD1E995  # the draft's keys differ from the target's: its draws must not echo the target's


class ModelDrafter:
    """Drafts from `model` (same vocabulary as the target) on its own paged cache (see the module doc)."""

    def __init__(self, model: nnx.Module, target: PagedEngine, k: int = DEFAULT_DRAFT_TOKENS):
        if k < 1:
            raise ValueError(f"need draft tokens >= 1, got {k}")
        if model.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({model.config.vocab_size} tokens) differs from the "
                             f"target's ({target.config.vocab_size}): draft with a model of the same tokenizer")
        if model.config.max_seq_len < target.max_len:
            raise ValueError(f"the draft model's context ({model.config.max_seq_len}) is shorter than the target "
                             f"engine's ({target.max_len}); serve with a max_len the draft can cover")
        self.k, self.target = k, target
        self.eng = PagedEngine(model, max_batch=target.max_batch, max_len=target.max_len,
                               page_size=target.page_size, prefix_cache=False, mesh=target.mesh)
        self._catch_up, self._step = compiled_draft_steps(self.eng.graphdef, self.eng.state_def)

    def draft(self, rows: dict[int, tuple[list[int], int]], batch: int):
        """(drafts [batch, k], counts [batch], q [batch, k, V] on the device) for {row: (tokens, most drafts)}."""
        table, n_draft = np.zeros((batch, self.k), np.int32), np.zeros(batch, np.int32)
        ready = [r for r, (tokens, limit) in rows.items() if limit > 0 and self._sync(r, tokens)]
        if not ready:
            return table, n_draft, None
        feed, count = np.zeros((batch, 2), np.int32), np.zeros(batch, np.int32)
        for r in ready:
            tokens, row = rows[r][0], self.eng.rows[r]
            behind = len(tokens) - row.cached
            feed[r, :behind], count[r] = tokens[row.cached:], behind
        if not self.eng.grow(ready, [int(count[r]) + self.k - 2 for r in ready]):
            return table, n_draft, None  # the draft's own pool is full: no drafts this step
        active = np.zeros(batch, bool)
        active[ready] = True
        eng, act = self.eng, jnp.asarray(active)
        starts = jnp.asarray([eng.length(r) for r in range(batch)], jnp.int32)  # the host's: a verdict cut them
        d, q = eng.run(self._catch_up, jnp.asarray(feed), jnp.asarray(count), starts, act)
        drafts, qs = [d], [q]
        for _ in range(self.k - 1):
            d, q = eng.run(self._step, act)
            drafts.append(d)
            qs.append(q)
        for r in ready:
            eng.set_cached(r, len(rows[r][0]) + self.k - 1, rows[r][0])
        table[:] = np.asarray(jnp.stack(drafts, axis=1))
        for r in ready:
            n_draft[r] = rows[r][1]
        return table, n_draft, jnp.stack(qs, axis=1)

    def verified(self, rows: dict[int, tuple[list[int], int]], n_emit: np.ndarray) -> None:
        """Keep the draft cache up to the last kept draft of each row that drafted."""
        for r, (tokens, _) in rows.items():
            row = self.eng.rows[r]
            if row is not None and row.cached > len(tokens) - 1:  # it drafted this round
                self.eng.set_cached(r, min(len(tokens) + int(n_emit[r]) - 1, row.cached))

    def release(self, row: int) -> None:
        """The row's sequence left (finished or preempted): its draft pages go too."""
        self.eng.release(row)

    def _sync(self, r: int, tokens: list[int]) -> bool:
        """Admit the row's sequence into the draft engine on first sight (its tokens but the last prefilled);
        False when the draft pool has no room for it (the row then goes without drafts)."""
        if self.eng.rows[r] is None:
            seq_row = self.target.rows[r]
            params = _params_of(seq_row.settings)
            if self.eng.admit(r, tokens[:-1], seq_row.prompt_len, params, seq_row.seed ^ SEED_SALT) is None:
                return False
            self.eng.prefill(r, sample=False)
        return len(tokens) - self.eng.rows[r].cached <= 2 or self._prefill_behind(r, tokens)

    def _prefill_behind(self, r: int, tokens: list[int]) -> bool:
        row = self.eng.rows[r]
        row.tokens = list(tokens[:-1])
        if row.cached < len(row.tokens):
            if not self.eng.grow([r], [len(row.tokens) - row.cached]):
                return False
            self.eng.prefill(r, sample=False)
        return True


def _params_of(settings):
    from jaxformer.infer.sampling import SamplingParams

    f = lambda a: float(np.asarray(a)[0])  # noqa: E731
    return SamplingParams(temperature=f(settings.temperature), top_k=int(np.asarray(settings.top_k)[0]),
                          top_p=f(settings.top_p))


@functools.lru_cache(maxsize=8)
def compiled_draft_steps(graphdef: nnx.GraphDef, state_def):
    """Jitted (catch_up, step) of a draft model (idle rows write to the scratch page)."""

    def masked(slots, active):
        return slots.cache.replace(page_table=jnp.where(active[:, None], slots.cache.page_table, SCRATCH_PAGE))

    def draw(slots: Slots, logits, lengths, active):
        q = target_probs(logits[:, None], slots.settings)[:, 0]  # [B, V]
        keys = jax.vmap(jax.random.fold_in)(slots.keys, lengths)
        drawn = jax.vmap(lambda k, p: jax.random.categorical(k, jnp.log(p)))(keys, q).astype(jnp.int32)
        token = jnp.where(slots.settings.temperature > 0, drawn, jnp.argmax(logits, -1).astype(jnp.int32))
        S = slots.history.shape[1]
        history = slots.history.at[jnp.arange(len(token)), jnp.where(active, lengths, S)].set(token, mode="drop")
        return history, token, q

    def catch_up(leaves, slots, feed, count, lengths, active):
        model = nnx.merge(graphdef, jax.tree.unflatten(state_def, leaves))
        positions = lengths[:, None] + jnp.minimum(jnp.arange(2)[None], jnp.maximum(count, 1)[:, None] - 1)
        logits, cache = model.extend(feed, masked(slots, active), jnp.where(active[:, None], positions, 0))
        last = jnp.take_along_axis(logits, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, V]
        new = jnp.where(active, lengths + count, lengths)
        history, token, q = draw(slots, last, new, active)
        cache = cache.replace(page_table=slots.cache.page_table, lengths=new)
        return dataclasses.replace(slots, cache=cache, history=history), (token, q)

    def step(leaves, slots, active):
        model = nnx.merge(graphdef, jax.tree.unflatten(state_def, leaves))
        lengths, S = slots.cache.lengths, slots.history.shape[1]
        fed = jnp.take_along_axis(slots.history, jnp.minimum(lengths, S - 1)[:, None], axis=1)  # [B, 1]
        logits, cache = model.extend(fed, masked(slots, active), jnp.where(active, lengths, 0)[:, None])
        new = jnp.where(active, lengths + 1, lengths)
        history, token, q = draw(slots, logits[:, 0], new, active)
        cache = cache.replace(page_table=slots.cache.page_table, lengths=new)
        return dataclasses.replace(slots, cache=cache, history=history), (token, q)

    jit = functools.partial(jax.jit, donate_argnames=("slots",))
    return jit(catch_up), jit(step)
