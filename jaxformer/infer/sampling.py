"""Next-token sampling: temperature, top-k, top-p and penalties, with every row its own settings.

`SamplingParams` describes one request; `apply_penalties` and `sample_rows` take one setting per row,
which is what the engine needs when unrelated requests share a decode step. This is the only sampler:
the CLI, the server and the training run's sample all decode through jaxformer.infer.generate.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

MAX_TOP_LOGPROBS = 20  # OpenAI's chat limit; completions allow 5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded; the defaults are OpenAI's (temperature 1, no filters, no penalties)."""

    max_new_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # nucleus sampling (Holtzman et al. 2019); 1: off
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019) over prompt + generated tokens; 1: off
    frequency_penalty: float = 0.0  # OpenAI: logit -= count * f over generated tokens
    presence_penalty: float = 0.0  # OpenAI: logit -= p once a token was generated
    seed: int | None = None  # None: a fresh random seed per request
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer); the match is cut from the text
    logprobs: int | None = None  # None: none; 0: the chosen tokens' logprobs; n: also the top n

    def __post_init__(self) -> None:
        for name in ("stop_token_ids", "stop"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             "max_new_tokens must be an integer >= 1"),
            (_num(self.temperature) and 0 <= self.temperature, "temperature must be a number >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (_num(self.top_p) and 0 <= self.top_p <= 1, "top_p must be a number in [0, 1]"),
            (_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (_num(self.frequency_penalty) and abs(self.frequency_penalty) <= 2, "frequency_penalty must be in [-2, 2]"),
            (_num(self.presence_penalty) and abs(self.presence_penalty) <= 2, "presence_penalty must be in [-2, 2]"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an integer"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
             f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def apply_penalties(logits: jax.Array, counts: jax.Array, seen: jax.Array, repetition: jax.Array,
                    frequency: jax.Array, presence: jax.Array) -> jax.Array:
    """logits [B, V]; counts [B, V] of generated tokens; seen [B, V] prompt+generated; penalties [B]."""
    rep = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per-row top-k then top-p filtering of logits [B, V] (filtered entries become -inf).

    top-p keeps the smallest set of most likely tokens whose mass reaches top_p (at least one);
    tokens tied with the last kept one are kept too.
    """
    V = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V)  # [B]
    rank = jnp.arange(V)[None, :]
    desc = jnp.where(rank < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.clip(jnp.sum(mass_before < top_p[:, None], axis=-1), 1, k)  # [B]
    cutoff = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)  # [B, 1]
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """One token per row of logits [B, V], each row with its own key and settings; temperature 0 is greedy."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
        scaled = filter_top_k_top_p(logits / t, top_k, top_p)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)
