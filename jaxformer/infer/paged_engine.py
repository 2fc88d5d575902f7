"""The paged inference engine: B rows over one pool of KV pages, prefix reuse, chunked prefill, a mesh.

Device state is the dense engine's (infer.engine.Slots: token history, prompt lengths, keys and sampling
settings per row) with a PagedKVCache in place of the per-row cache, so memory follows the tokens held, not
B x max_len. The host owns the pages (infer.pages.PagePool) and each row's page list; page tables go to the
device when they change. Per row:

  admit(row, tokens, prompt_len, ...)  reserve pages for the tokens (the prompt, or, after a preemption, the
                                       prompt and what was generated); full pages of a prompt seen before are
                                       shared instead of computed (prefix caching). None when pages are short.
  prefill(row, n)                      run the next n of the row's uncached tokens through the model (a chunk:
                                       long prompts go in chunks between decode steps); after the last chunk
                                       the row's first new token is sampled.
  grow(rows)                           a page for each row whose next token starts one; False if the pool ran
                                       dry (the caller preempts). Layers that all slide free pages the window
                                       left behind.
  decode(active)                       one token for every active row (dense engine's decode step).
  release(row)                         the row's pages go back (cached prompt pages stay for reuse).

Compiles: one decode step, one prefill per bucket of chunk lengths. Under `mesh`, weights are laid out by the
logical-axis table (tensor parallel over heads, the pools' kv heads over "tensor") and every step runs on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import secrets
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxformer import sharding
from jaxformer.infer.engine import RowSettings, Slots, StepOut, choose, decode_step, host_out, prompt_buckets
from jaxformer.infer.pages import PagePool, page_hashes
from jaxformer.infer.sampling import SamplingParams
from jaxformer.infer.speculative import verify_step
from jaxformer.models.paged_cache import SCRATCH_PAGE, PagedKVCache

DEFAULT_PAGE_SIZE = 16


@dataclasses.dataclass
class Row:
    """What the host knows of one row: its tokens, pages, and how far prefill has gone."""

    tokens: list[int]  # prompt (+ generated, after a preemption): what prefill must cache
    prompt_len: int
    seed: int
    settings: RowSettings
    pages: list[int]  # page i holds positions [i*P, (i+1)*P); SCRATCH_PAGE once a sliding window left it
    hashes: list[bytes]  # prefix hashes of the prompt's full pages
    cached: int  # tokens whose keys/values are in the pages (prefix hits + prefilled chunks)
    registered: int = 0  # prompt pages offered to the prefix cache so far
    hit: int = 0  # tokens taken from the prefix cache at admission


class PagedEngine:
    """Prefill, decode and page bookkeeping for `max_batch` rows of up to `max_len` tokens over `num_pages` pages."""

    def __init__(self, model: nnx.Module, *, max_batch: int = 8, max_len: int | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, num_pages: int | None = None, kv_memory: int | None = None,
                 smallest_bucket: int = 16, prefix_cache: bool = True, mesh: Mesh | None = None):
        cfg = model.config
        self.config, self.mesh = cfg, mesh
        self.max_batch = int(max_batch)
        self.max_len = min(int(max_len or cfg.max_seq_len), cfg.max_seq_len)
        if self.max_batch < 1 or self.max_len < 2 or page_size < 1:
            raise ValueError(f"need max_batch >= 1, max_len >= 2 and page_size >= 1, got {max_batch}, {max_len}, "
                             f"{page_size}")
        if cfg.attention_impl == "pallas" and (page_size < 16 or page_size & (page_size - 1)):
            raise ValueError(f"page_size={page_size}: the Pallas paged decode kernel reads pages of a power of two "
                             ">= 16 tokens; choose --page-size 16, 32, 64 or 128")
        self.page_size = int(page_size)
        self.max_pages = -(-self.max_len // self.page_size)
        self.graphdef, state = nnx.split(model)
        leaves, self.state_def = jax.tree.flatten(state)
        self._leaves = self._place(state, leaves)  # first: the free memory the pool may take is what they leave
        page_bytes = self.page_size * cfg.kv_bytes_per_token(jnp.dtype(cfg.compute_dtype).itemsize)
        if num_pages is None:  # --kv-memory, else what the accelerator has free, else the dense engine's tokens
            kv_memory = kv_memory or free_device_memory(mesh)
            num_pages = kv_memory // page_bytes if kv_memory else self.max_batch * self.max_pages
            num_pages += 1  # the scratch page
        if num_pages - 1 < self.max_pages:
            raise ValueError(f"{num_pages - 1} pages of {self.page_size} tokens ({num_pages * page_bytes / 2**20:.1f} "
                             f"MiB) cannot hold one sequence of max_len={self.max_len}; give more --kv-memory or a "
                             f"smaller max_len")
        # a RoPE that depends on the sequence's length makes a page's keys depend on the prompt that wrote it
        scaling = cfg.rope.scaling.rope_type if cfg.rope.scaling is not None else None
        # and a linear_attention / conv layer's state after a prefix lives in no page: such models prefill it all
        self.prefix_cache = prefix_cache and scaling not in ("dynamic", "longrope") and not cfg.has_state_layers
        self.sliding_only = all(cfg.layer_window(i) is not None for i in range(cfg.n_layers))
        self.pool = PagePool(int(num_pages), self.page_size)
        self.buckets = prompt_buckets(self.max_len, smallest_bucket)
        self._prefill, self._decode, self._verify = compiled_paged_steps(self.graphdef, self.state_def)
        self.rows: list[Row | None] = [None] * self.max_batch
        self._lengths = np.zeros(self.max_batch, np.int64)  # tokens in each row's cache
        self._table = np.full((self.max_batch, self.max_pages), SCRATCH_PAGE, np.int32)
        self._dirty = True
        self.slots = self._init_slots()
        self._active: tuple[np.ndarray, jax.Array] | None = None

    # ------------------------------------------------------------------------- setup

    def _on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _place(self, state, leaves) -> list[jax.Array]:
        """Weights on the device(s): as they are, or laid out over the mesh by the logical-axis table."""
        if self.mesh is None:
            return [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in leaves]
        with self._on_mesh():
            placed = jax.device_put(state, sharding.param_shardings(state, self.mesh, self.config))
        return jax.tree.leaves(placed)

    def _init_slots(self) -> Slots:
        B = self.max_batch
        with self._on_mesh():
            cache = PagedKVCache.init(self.config, B, self.max_len, self.pool.num_pages, self.page_size)
            return Slots(cache=cache, history=jnp.zeros((B, self.max_len), jnp.int32),
                         prompt_len=jnp.zeros((B,), jnp.int32), keys=jax.random.split(jax.random.key(0), B),
                         settings=RowSettings.neutral(B))

    def warmup(self) -> None:
        """Compile the decode step and the smallest prefill bucket, so a first request starts at once."""
        self.admit(0, [0], 1, SamplingParams(temperature=0.0, max_new_tokens=1))
        self.prefill(0)
        self.grow([0])
        self.decode(np.arange(self.max_batch) == 0)
        self.release(0)

    def reset(self) -> None:
        """Fresh slots and pages (after a failed call, whose donated buffers are gone)."""
        self.pool = PagePool(self.pool.num_pages, self.page_size)
        self.rows = [None] * self.max_batch
        self._lengths[:] = 0
        self._table[:] = SCRATCH_PAGE
        self._dirty = True
        self.slots = self._init_slots()

    def cache_bytes(self) -> int:
        """Bytes the page pools reserve."""
        return self.slots.cache.nbytes()

    def used_bytes(self) -> int:
        """Bytes of the pages sequences hold now."""
        return self.pool.used * self.slots.cache.page_bytes()

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"{n} tokens exceed the engine's context of {self.max_len}")

    # ------------------------------------------------------------------------- pages

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def admit(self, row: int, tokens: Sequence[int], prompt_len: int, params: SamplingParams,
              seed: int | None = None) -> int | None:
        """Reserve pages for `tokens` in `row` (free); returns how many of them the prefix cache already holds,
        or None when the pool cannot give the pages now."""
        if self.rows[row] is not None:
            raise ValueError(f"row {row} is in use")
        n = len(tokens)
        if not 0 < n < self.max_len:
            raise ValueError(f"{n} tokens: need 1 to {self.max_len - 1} (the engine's context is {self.max_len})")
        bad = [t for t in tokens if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        hashes = page_hashes(tokens[:prompt_len], self.page_size) if self.prefix_cache else []
        shared = self.pool.match(hashes[:(n - 1) // self.page_size])  # at least one token is computed
        self.pool.hold(shared)
        fresh = self.pool.take(self.pages_for(n) - len(shared))
        if fresh is None:
            self.pool.release(shared)
            return None
        self.pool.lookups += n
        self.pool.hits += len(shared) * self.page_size
        seed = secrets.randbits(32) if seed is None else seed % 2**32
        self.rows[row] = Row(list(tokens), prompt_len, seed, RowSettings.of(params), shared + fresh, hashes,
                             cached=len(shared) * self.page_size, registered=len(shared),
                             hit=len(shared) * self.page_size)
        self._lengths[row] = self.rows[row].cached
        self._set_table(row)
        return self.rows[row].hit

    def prefix_in_flight(self, tokens: Sequence[int]) -> bool:
        """True when some full page of this prompt's prefix is being prefilled by a row right now, and not cached
        yet: admitted after it, the prompt would share those pages instead of computing them again."""
        if not self.prefix_cache:
            return False
        hashes = page_hashes(tokens, self.page_size)
        computing = {h for r in self.rows if r is not None and r.cached < len(r.tokens)
                     for h in r.hashes[r.registered:]}
        for h in hashes:
            if h in computing:
                return True
            if h not in self.pool.cached:
                return False
        return False

    def grow(self, rows: Sequence[int], extra: Sequence[int] | None = None) -> bool:
        """Give every listed row the pages its next 1 + extra[i] tokens need (and free pages a sliding window left);
        False when the pool has too few (nothing is taken then)."""
        extra = [0] * len(rows) if extra is None else list(extra)
        need = {r: self.pages_for(min(self.length(r) + 1 + e, self.max_len)) - len(self.rows[r].pages)
                for r, e in zip(rows, extra)}
        if sum(max(0, n) for n in need.values()) > self.pool.available:
            return False
        for r, n in need.items():
            if n > 0:
                self.rows[r].pages += self.pool.take(n)
                self._set_table(r)
        if self.sliding_only:
            for r in rows:
                self._drop_out_of_window(r)
        return True

    def _drop_out_of_window(self, r: int) -> None:
        row, window = self.rows[r], self.config.attention.sliding_window
        first_seen = self.length(r) + 1 - window  # the oldest position the next query attends to
        gone = [i for i, p in enumerate(row.pages) if p != SCRATCH_PAGE and (i + 1) * self.page_size <= first_seen]
        if gone:
            self.pool.release([row.pages[i] for i in gone])
            for i in gone:
                row.pages[i] = SCRATCH_PAGE
            self._set_table(r)

    def release(self, row: int) -> None:
        """The row's pages go back to the pool; it is free for another sequence."""
        r = self.rows[row]
        if r is None:
            return
        self.pool.release([p for p in r.pages if p != SCRATCH_PAGE])
        self.rows[row] = None
        self._lengths[row] = 0
        self._table[row] = SCRATCH_PAGE
        self._dirty = True

    def _set_table(self, row: int) -> None:
        pages = self.rows[row].pages
        self._table[row] = SCRATCH_PAGE
        self._table[row, :len(pages)] = pages
        self._dirty = True

    def length(self, row: int) -> int:
        """Tokens of the row in its cache: prefilled ones, then one more per decode step."""
        return int(self._lengths[row])

    def set_cached(self, row: int, n: int, tokens: Sequence[int] | None = None) -> None:
        """Say the row's cache holds its first n tokens (a drafter cuts back what the target did not keep); with
        `tokens`, the row's tokens become these."""
        r = self.rows[row]
        if tokens is not None:
            r.tokens = list(tokens)
        r.cached = self._lengths[row] = n

    def run(self, step, *args):
        """step(weights, slots, *args) -> (slots, out): a jitted step of another module over this engine's weights
        and rows (a draft model's), on its mesh with its page tables current; returns out."""
        self._sync_table()
        with self._on_mesh():
            self.slots, out = step(self._leaves, self.slots, *args)
        return out

    # ------------------------------------------------------------------------- device steps

    def _sync_table(self) -> None:
        if self._dirty:
            with self._on_mesh():
                table = jnp.asarray(self._table)
            self.slots = dataclasses.replace(self.slots, cache=self.slots.cache.replace(page_table=table))
            self._dirty = False

    def remaining(self, row: int) -> int:
        """Tokens of the row still to prefill."""
        r = self.rows[row]
        return len(r.tokens) - r.cached

    def prefill(self, row: int, n: int | None = None, n_top: int | None = None, sample: bool = True
                ) -> StepOut | None:
        """Prefill the row's next n uncached tokens (all by default); after its last chunk, sample its first new
        token and return it (arrays of length 1), else (or with sample=False) None."""
        r = self.rows[row]
        n = min(self.remaining(row) if n is None else n, self.remaining(row))
        if n < 1:
            raise ValueError(f"row {row} has nothing left to prefill")
        start, last = r.cached, r.cached + n == len(r.tokens) and sample
        tokens = np.zeros((1, self.bucket(n)), np.int32)
        tokens[0, :n] = r.tokens[start:start + n]
        history = np.zeros((1, self.max_len), np.int32)  # the whole row: tokens a prefix hit skipped count too
        history[0, :len(r.tokens)] = r.tokens
        self._sync_table()
        with self._on_mesh():
            self.slots, out = self._prefill(self._leaves, self.slots, jnp.int32(row), jnp.asarray(tokens),
                                            jnp.asarray(history), jnp.int32(start), jnp.int32(n),
                                            jnp.int32(r.prompt_len), jnp.uint32(r.seed), r.settings, sample=last,
                                            n_top=n_top)
        r.cached += n
        self._lengths[row] = r.cached
        self._register(row)
        return host_out(out, 1) if last else None

    def _register(self, row: int) -> None:
        """Offer the row's prompt pages that are now computed and full to the prefix cache."""
        r = self.rows[row]
        if not self.prefix_cache:
            return
        done = min(r.cached, r.prompt_len) // self.page_size
        for i in range(r.registered, min(done, len(r.hashes))):
            self.pool.register(r.pages[i], r.hashes[i])
        r.registered = max(r.registered, min(done, len(r.hashes)))

    def decode(self, active: Sequence[bool] | np.ndarray, n_top: int | None = None) -> StepOut:
        """One token for every active row (which must be prefilled and grown); arrays of length B."""
        active = np.asarray(active, bool)
        if active.shape != (self.max_batch,):
            raise ValueError(f"active must have one flag per row ({self.max_batch}), got shape {active.shape}")
        if self._active is None or not np.array_equal(self._active[0], active):
            with self._on_mesh():
                self._active = (active, jnp.asarray(active))
        self._sync_table()
        with self._on_mesh():
            self.slots, out = self._decode(self._leaves, self.slots, self._active[1], n_top=n_top)
        self._lengths[active] += 1
        return host_out(out, self.max_batch)

    def verify(self, active: Sequence[bool] | np.ndarray, drafts: np.ndarray, n_draft: np.ndarray,
               q: jax.Array | None = None, n_top: int | None = None) -> tuple[np.ndarray, ...]:
        """Speculative step (infer.speculative.verify_step) for the active rows, their pages grown for their drafts:
        (tokens [B, K+1], n_emit [B], logprobs [B, K+1], top ids, top logprobs [B, K+1, n]) on the host."""
        active = np.asarray(active, bool)
        self._sync_table()
        with self._on_mesh():
            self.slots, out = self._verify(self._leaves, self.slots, jnp.asarray(drafts, jnp.int32),
                                           jnp.asarray(n_draft, jnp.int32), q, jnp.asarray(active), n_top=n_top)
        out = jax.device_get(out)
        self._lengths += out[1]
        B, K1 = out[0].shape
        if len(out) == 2:
            out = (*out, np.zeros((B, K1), np.float32), np.zeros((B, K1, 0), np.int32),
                   np.zeros((B, K1, 0), np.float32))
        return tuple(np.asarray(x) for x in out)

    def lengths(self) -> np.ndarray:
        """Tokens in the cache per row."""
        return np.asarray(jax.device_get(self.slots.cache.lengths))


FREE_MEMORY_FRACTION = 0.9  # of what the accelerator has free once the weights are placed, for KV pages


def free_device_memory(mesh: Mesh | None) -> int | None:
    """Bytes of KV pages the devices can hold (all of them together: the pools split over "tensor"): 90% of the
    first device's free memory times the tensor ways; None where the runtime reports no memory (CPU)."""
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    ways = dict(mesh.shape).get("tensor", 1) if mesh is not None else 1
    return int(FREE_MEMORY_FRACTION * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * ways)


@functools.lru_cache(maxsize=32)
def compiled_paged_steps(graphdef: nnx.GraphDef, state_def):
    """Jitted (prefill chunk, decode) for one model structure."""
    def prefill(leaves, slots, row, tokens, history, start, n, prompt_len, seed, settings, *, sample, n_top):
        model = nnx.merge(graphdef, jax.tree.unflatten(state_def, leaves))
        return prefill_chunk(model, slots, row, tokens, history, start, n, prompt_len, seed, settings,
                             sample=sample, n_top=n_top)

    def idle_rows_write_scratch(step):
        """Idle rows (free, or mid-prefill) are computed too: their writes must go to the scratch page, never into
        pages that hold a prompt (a shared prefix, or chunks prefilled so far)."""
        def run(leaves, slots, *args, n_top):
            active = args[-1]
            table = slots.cache.page_table
            idle = slots.cache.replace(page_table=jnp.where(active[:, None], table, SCRATCH_PAGE))
            model = nnx.merge(graphdef, jax.tree.unflatten(state_def, leaves))
            slots, out = step(model, dataclasses.replace(slots, cache=idle), *args, n_top=n_top)
            return dataclasses.replace(slots, cache=slots.cache.replace(page_table=table)), out
        return run

    prefill_jit = jax.jit(prefill, static_argnames=("sample", "n_top"), donate_argnames=("slots",))
    jit = functools.partial(jax.jit, static_argnames=("n_top",), donate_argnames=("slots",))
    return prefill_jit, jit(idle_rows_write_scratch(decode_step)), jit(idle_rows_write_scratch(verify_step))


def prefill_chunk(model, slots: Slots, row, tokens, history_row, start, n, prompt_len, seed, settings: RowSettings,
                  *, sample: bool, n_top):
    """Tokens [1, T] (the first n real) at positions start.. of `row`, written into its pages, and the row's token
    history [1, S] (what penalties count); with `sample`, the row's next token is drawn from the last real
    position's logits."""
    T = tokens.shape[1]
    positions = (start + jnp.minimum(jnp.arange(T, dtype=jnp.int32), n - 1))[None]  # padding repeats the last
    cache = slots.cache
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, row, 1)  # noqa: E731 - the row's table, its layers' states
    view = cache.replace(page_table=take(cache.page_table), lengths=start[None],
                         states=jax.tree.map(take, cache.states))
    valid = (jnp.arange(T) < n)[None]  # [1, T]: the padding moves no linear_attention / conv state
    logits, written = model.extend(tokens, view, positions, valid)  # [1, T, V]
    put = lambda big, new: jax.lax.dynamic_update_slice_in_dim(big, new, row, 0)  # noqa: E731
    cache = cache.replace(k=written.k, v=written.v, states=jax.tree.map(put, cache.states, written.states),
                          lengths=cache.lengths.at[row].set(start + n))
    history = jax.lax.dynamic_update_slice(slots.history, history_row, (row, 0))
    put_row = lambda big, new: big.at[row].set(new[0])  # noqa: E731
    key = jax.random.key(seed)
    slots = Slots(cache=cache.constrained(), history=history, prompt_len=slots.prompt_len.at[row].set(prompt_len),
                  keys=slots.keys.at[row].set(key), settings=jax.tree.map(put_row, slots.settings, settings))
    if not sample:
        return slots, (jnp.zeros((1,), jnp.int32),)
    last_logits = jax.lax.dynamic_index_in_dim(logits[0], n - 1, axis=0, keepdims=True)  # [1, V]
    row_history = jax.lax.dynamic_slice_in_dim(history, row, 1)  # [1, S]
    out = choose(last_logits, row_history, (start + n)[None], prompt_len[None], settings, key[None], n_top)
    slots = dataclasses.replace(slots, history=slots.history.at[row, start + n].set(out[0][0], mode="drop"))
    return slots, out
