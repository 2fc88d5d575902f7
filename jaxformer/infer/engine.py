"""KV-cache inference engine: jitted prefill and one-token decode over a fixed set of slots.

The engine owns B slots: rows of a preallocated KVCache (one key and one value tensor per layer),
of a token history [B, S] (prompt + generated, which the penalties count), and of per-row sampling
settings and PRNG keys. Shapes never depend on a request:

  prefill(slot, prompt)  the prompt is right-padded to a bucket length (powers of two from 16,
                         then S), run through the model against a fresh [1, bucket] cache, and
                         written into the slot's rows; its first token is sampled. One compile
                         per bucket, so a new prompt length never recompiles.
  decode(active)         every slot feeds its newest token [B, 1] through the model against the
                         cache, then each active row samples with its own settings and key.
                         One compile in all (per logprobs mode); every slot is computed, so a
                         lone request costs a full batch step (size max_batch to the load).

Rows are independent: a row's logits depend only on its own cache entries (the causal mask
stops at its own length), and its samples only on its own key, fold_in(key(seed), step).
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.infer.sampling import MAX_TOP_LOGPROBS, SamplingParams, apply_penalties, sample_rows
from jaxformer.models.cache import KVCache
from jaxformer.models.paged_cache import SCRATCH_PAGE, PagedKVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSettings:
    """Sampling settings, one entry per row ([B] arrays)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition: jax.Array
    frequency: jax.Array
    presence: jax.Array

    @classmethod
    def of(cls, p: SamplingParams) -> "RowSettings":
        f = lambda x: jnp.asarray([x], jnp.float32)  # noqa: E731
        return cls(f(p.temperature), jnp.asarray([p.top_k], jnp.int32), f(p.top_p), f(p.repetition_penalty),
                   f(p.frequency_penalty), f(p.presence_penalty))

    @classmethod
    def neutral(cls, batch: int) -> "RowSettings":
        ones = lambda: jnp.ones((batch,), jnp.float32)  # noqa: E731  (distinct buffers: the slots are donated)
        zeros = lambda: jnp.zeros((batch,), jnp.float32)  # noqa: E731
        return cls(zeros(), jnp.zeros((batch,), jnp.int32), ones(), ones(), zeros(), zeros())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    """Device state of all slots: the cache and, per row, what the next decode step reads."""

    cache: KVCache
    history: jax.Array  # [B, S] int32: prompt then generated tokens; history[b, lengths[b]] is not cached yet
    prompt_len: jax.Array  # [B] int32
    keys: jax.Array  # [B] PRNG keys, one per request
    settings: RowSettings


class StepOut(NamedTuple):
    """Host copies of one step's results: tokens [B], logprobs [B], top ids / logprobs [B, n]."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def host_out(out, batch: int) -> StepOut:
    """One transfer for a step's outputs; without logprobs only the tokens come back."""
    if len(out) == 1:
        return StepOut(np.asarray(jax.device_get(out[0])), np.zeros((batch,), np.float32),
                       np.zeros((batch, 0), np.int32), np.zeros((batch, 0), np.float32))
    return StepOut(*jax.device_get(out))


def prompt_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Padded prompt lengths: powers of two from `smallest` below max_len, then max_len itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


def logprobs_mode(requests: Sequence[int | None]) -> int | None:
    """The decode variant a set of logprobs requests needs: None (none), 0 (chosen), or the top-n size."""
    wanted = [n for n in requests if n is not None]
    if not wanted:
        return None
    return MAX_TOP_LOGPROBS if max(wanted) > 0 else 0


def choose(logits: jax.Array, history: jax.Array, n_tokens: jax.Array, prompt_len: jax.Array, s: RowSettings,
           keys: jax.Array, n_top: int | None):
    """Next token per row of logits [B, V] with the row's settings; logprobs are of the model's distribution.

    history [B, S] holds each row's n_tokens tokens so far (the first prompt_len of them the prompt);
    the row's key for this token is fold_in(key, tokens generated so far).
    """
    def penalized():  # token counts only when some row asks for a penalty
        (B, S), V = history.shape, logits.shape[-1]
        pos, rows = jnp.arange(S)[None, :], jnp.arange(B)[:, None]
        valid = pos < n_tokens[:, None]
        seen = jnp.zeros((B, V), bool).at[rows, jnp.where(valid, history, V)].set(True, mode="drop")
        counts = jnp.zeros((B, V), jnp.int32).at[rows, history].add(valid & (pos >= prompt_len[:, None]))
        return apply_penalties(logits, counts, seen, s.repetition, s.frequency, s.presence)

    active = (s.repetition != 1) | (s.frequency != 0) | (s.presence != 0)
    scores = jax.lax.cond(jnp.any(active), penalized, lambda: logits)
    step_keys = jax.vmap(jax.random.fold_in)(keys, n_tokens - prompt_len)
    tokens = sample_rows(scores, step_keys, s.temperature, s.top_k, s.top_p)  # [B]
    B = logits.shape[0]
    if n_top is None:
        return (tokens,)
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    if n_top == 0:
        return tokens, chosen, jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), jnp.float32)
    top_lp, top_ids = jax.lax.top_k(logp, n_top)
    return tokens, chosen, top_ids.astype(jnp.int32), top_lp


class Engine:
    """Prefill and decode for `max_batch` slots of up to `max_len` tokens each (prompt + generated).

    The engine takes the model's weights when it is built (later changes to the model are not seen).
    """

    def __init__(self, model: nnx.Module, *, max_batch: int = 8, max_len: int | None = None,
                 smallest_bucket: int = 16, kv_dtype: str | None = None):
        cfg = model.config
        self.config = cfg
        if kv_dtype not in (None, "int8"):
            raise ValueError(f"kv_dtype must be None (the compute dtype) or 'int8', got {kv_dtype!r}")
        self.kv_dtype = kv_dtype  # "int8": keys/values stored int8 with a scale per position and kv head
        self.max_batch = int(max_batch)
        self.max_len = min(int(max_len or cfg.max_seq_len), cfg.max_seq_len)
        if self.max_batch < 1 or self.max_len < 2:
            raise ValueError(f"need max_batch >= 1 and max_len >= 2, got {max_batch} and {max_len}")
        self.buckets = prompt_buckets(self.max_len, smallest_bucket)
        self.graphdef, state = nnx.split(model)
        leaves, state_def = jax.tree.flatten(state)  # a flat list dispatches fastest
        self._leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in leaves]  # host weights: once
        self._prefill, self._decode = compiled_steps(self.graphdef, state_def)
        self.slots = self._init_slots()
        self._active: tuple[np.ndarray, jax.Array] | None = None

    def _init_slots(self) -> Slots:
        B = self.max_batch
        return Slots(cache=KVCache.init(self.config, B, self.max_len, self.kv_dtype),
                     history=jnp.zeros((B, self.max_len), jnp.int32), prompt_len=jnp.zeros((B,), jnp.int32),
                     keys=jax.random.split(jax.random.key(0), B),
                     settings=RowSettings.neutral(B))

    def warmup(self) -> None:
        """Compile the decode step and the smallest prefill bucket, so a first request starts at once."""
        self.prefill(0, [0], SamplingParams(temperature=0.0, max_new_tokens=1))
        self.decode(np.zeros(self.max_batch, bool))

    def reset(self) -> None:
        """Fresh slots (after a failed call, whose donated buffers are gone)."""
        self.slots = self._init_slots()

    def cache_bytes(self) -> int:
        return self.slots.cache.nbytes()

    def bucket(self, n: int) -> int:
        """The padded length a prompt of n tokens is prefilled at."""
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"prompt of {n} tokens exceeds the engine's context of {self.max_len}")

    # ------------------------------------------------------------------------- host API

    def prefill(self, slot: int, prompt: Sequence[int], params: SamplingParams,
                n_top: int | None = None) -> StepOut:
        """Load `prompt` into `slot` (replacing what was there) and sample its first token (arrays of length 1)."""
        n = len(prompt)
        if n == 0:
            raise ValueError("prompt is empty: give at least one token")
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is out of range [0, {self.max_batch})")
        bad = [t for t in prompt if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        tokens = np.zeros((1, self.bucket(n)), np.int32)
        tokens[0, :n] = prompt
        seed = secrets.randbits(32) if params.seed is None else params.seed % 2**32
        self.slots, out = self._prefill(self._leaves, self.slots, jnp.int32(slot), jnp.asarray(tokens), jnp.int32(n),
                                        jnp.uint32(seed), RowSettings.of(params), n_top=n_top)
        return host_out(out, 1)

    def decode(self, active: Sequence[bool] | np.ndarray, n_top: int | None = None) -> StepOut:
        """One token for every active slot (inactive rows are computed and ignored); arrays of length B."""
        active = np.asarray(active, bool)
        if active.shape != (self.max_batch,):
            raise ValueError(f"active must have one flag per slot ({self.max_batch}), got shape {active.shape}")
        if self._active is None or not np.array_equal(self._active[0], active):
            self._active = (active, jnp.asarray(active))  # most steps reuse the previous mask
        self.slots, out = self._decode(self._leaves, self.slots, self._active[1], n_top=n_top)
        return host_out(out, self.max_batch)

    def decode_hlo(self, n_top: int | None = None) -> str:
        """The decode step as XLA optimized it (HLO text): what runs per token, fusions and all."""
        active = jnp.ones((self.max_batch,), bool)
        return self._decode.lower(self._leaves, self.slots, active, n_top=n_top).compile().as_text()

    def lengths(self) -> np.ndarray:
        """Tokens in the cache per slot."""
        return np.asarray(jax.device_get(self.slots.cache.lengths))


@functools.lru_cache(maxsize=32)
def compiled_steps(graphdef: nnx.GraphDef, state_def):
    """Jitted (prefill, decode) for one model structure; engines over same-shaped models share them.

    The graphdef is bound here once: as a static argument it would be hashed on every call.
    """
    def prefill(leaves, slots, slot, tokens, length, seed, row, *, n_top):
        model = nnx.merge(graphdef, jax.tree.unflatten(state_def, leaves))
        return prefill_step(model, slots, slot, tokens, length, seed, row, n_top=n_top)

    def decode(leaves, slots, active, *, n_top):
        return decode_step(nnx.merge(graphdef, jax.tree.unflatten(state_def, leaves)), slots, active, n_top=n_top)

    jit = functools.partial(jax.jit, static_argnames=("n_top",), donate_argnames=("slots",))
    return jit(prefill), jit(decode)


def prefill_step(model, slots: Slots, slot, tokens, length, seed, row: RowSettings, *, n_top):
    """Prefill tokens [1, T] (the first `length` real) into row `slot` and sample its first token."""
    cfg = model.config
    T = tokens.shape[1]
    # padding sits at the last real position: RoPE scalings that read the sequence length (dynamic NTK,
    # longrope) then see the prompt's length, not the bucket's
    positions = jnp.minimum(jnp.arange(T, dtype=jnp.int32), length - 1)[None]  # [1, T]
    valid = (jnp.arange(T) < length)[None]  # [1, T]: the padding moves no linear_attention / conv state
    logits, fresh = model.extend(tokens, KVCache.init(cfg, 1, T, slots.cache.dtype), positions, valid)  # [1, T, V]
    put = lambda big, new: jax.tree.map(  # noqa: E731  (an int8 cache entry is values and scales)
        lambda b, n: jax.lax.dynamic_update_slice(b, n.astype(b.dtype), (slot,) + (0,) * (b.ndim - 1)), big, new)
    cache = slots.cache.replace(k=tuple(map(put, slots.cache.k, fresh.k)),
                                v=tuple(map(put, slots.cache.v, fresh.v)),
                                states=tuple(map(put, slots.cache.states, fresh.states)),
                                lengths=slots.cache.lengths.at[slot].set(length))
    last_logits = jax.lax.dynamic_index_in_dim(logits[0], length - 1, axis=0, keepdims=True)  # [1, V]
    key = jax.random.key(seed)[None]
    out = choose(last_logits, tokens, length[None], length[None], row, key, n_top)
    history = jax.lax.dynamic_update_slice(slots.history, tokens, (slot, 0)).at[slot, length].set(out[0][0])
    put_row = lambda big, new: big.at[slot].set(new[0])  # noqa: E731
    slots = Slots(cache=cache.constrained(), history=history, prompt_len=slots.prompt_len.at[slot].set(length),
                  keys=slots.keys.at[slot].set(key[0]), settings=jax.tree.map(put_row, slots.settings, row))
    return slots, out


def _reencode(model, history, rows, n: int, cache: KVCache) -> KVCache:
    """Rows' first n cache entries recomputed from their tokens with the RoPE of n + 1 tokens.

    Phi-3's longrope switches to its long factors once a sequence passes n = original context; transformers
    then drops the cache and re-encodes the whole sequence with them (Phi3ForCausalLM.
    prepare_inputs_for_generation), and so does this, once per row, at that step.
    """
    B, S = history.shape
    if isinstance(cache, PagedKVCache):  # rewritten in place: the other rows' writes go to the scratch page
        view = cache.replace(page_table=jnp.where(rows[:, None], cache.page_table, SCRATCH_PAGE),
                             lengths=jnp.zeros_like(cache.lengths))
        written = model.extend(history[:, :n + 1], view).cache
        return cache.replace(k=written.k, v=written.v)
    fresh = model.extend(history[:, :n + 1], KVCache.init(model.config, B, S, cache.dtype)).cache
    pick = lambda new, old: jax.tree.map(  # noqa: E731
        lambda a, b: jnp.where(rows.reshape((B,) + (1,) * (a.ndim - 1)), a, b), new, old)
    return cache.replace(k=tuple(map(pick, fresh.k, cache.k)), v=tuple(map(pick, fresh.v, cache.v)))


def decode_step(model, slots: Slots, active, *, n_top):
    """Feed every row's newest token [B, 1], then sample the next one for active rows."""
    (B, S), lengths = slots.history.shape, slots.cache.lengths
    last = jnp.take_along_axis(slots.history, jnp.minimum(lengths, S - 1)[:, None], axis=1)  # [B, 1]
    cache = slots.cache
    switch = model.config.rope_switch_len
    if switch is not None and switch < S:
        crossing = active & (lengths == switch)  # [B]
        cache = jax.lax.cond(crossing.any(), functools.partial(_reencode, model, slots.history, crossing, switch),
                             lambda c: c, cache)
    positions = jnp.where(active, lengths, 0)[:, None]  # idle rows must not lengthen what longrope/NTK see
    logits, cache = model.extend(last, cache, positions, active[:, None])  # [B, 1, V]; idle rows' states stay
    cache = cache.replace(lengths=jnp.where(active, cache.lengths, lengths))
    out = choose(logits[:, 0], slots.history, lengths + 1, slots.prompt_len, slots.settings, slots.keys, n_top)
    at = jnp.where(active, lengths + 1, S)  # S: dropped (inactive rows, or a row that filled its context)
    history = slots.history.at[jnp.arange(B), at].set(out[0], mode="drop")
    return dataclasses.replace(slots, cache=cache.constrained(), history=history), out
