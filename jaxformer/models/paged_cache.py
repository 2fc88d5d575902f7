"""A paged key/value cache (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention"): one pool of fixed-size pages per layer, shared by every sequence through page tables.

Position s of sequence b lives in page page_table[b, s // P] at slot s % P, in every layer's pool. Pages are
handed out by the host (jaxformer.infer.pages.PagePool): a sequence holds only the pages its tokens fill, and
sequences that share a prompt prefix share its full pages. Page 0 is scratch: table entries a sequence does not
use point there, so writes past its pages (bucket padding, idle rows) land where nothing reads.
`DecoderLM.extend(tokens, cache)` takes a PagedKVCache as it takes a KVCache (attention.PagedLayer per layer).

Pools are [num_pages, P, K, H] with kv heads laid out over the mesh's "tensor" axis, like KVCache's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxformer.config import ModelConfig
from jaxformer.models.cache import first_entry, layer_entries, layer_states
from jaxformer.sharding import constrain

PAGE_AXES = (None, None, "act_kv_heads", None)  # [num_pages, P, K, H]
SCRATCH_PAGE = 0  # never given to a sequence


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Per-layer page pools, page tables [B, max_pages] int32 and cached lengths [B] int32."""

    k: tuple[jax.Array | None, ...]
    v: tuple[jax.Array | None, ...]
    page_table: jax.Array
    lengths: jax.Array
    states: tuple = ()  # per layer: None, or a linear_attention / conv layer's state for each row (cache.layer_states)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, num_pages: int, page_size: int,
             dtype=None) -> "PagedKVCache":
        """Zero pools of num_pages pages (page 0 is scratch), tables for `batch` rows of up to max_len tokens; a
        linear_attention / conv layer has no pool but a state per row."""
        if page_size < 1 or num_pages < 2:
            raise ValueError(f"need page_size >= 1 and num_pages >= 2 (page 0 is scratch), got {page_size} and "
                             f"{num_pages}")
        dtype = jnp.dtype(dtype or cfg.compute_dtype)
        zeros = lambda heads, dim: constrain(jnp.zeros((num_pages, page_size, heads, dim), dtype), PAGE_AXES)  # noqa: E731
        max_pages = -(-max_len // page_size)
        k, v = layer_entries(cfg, zeros)
        return cls(k=k, v=v, page_table=jnp.full((batch, max_pages), SCRATCH_PAGE, jnp.int32),
                   lengths=jnp.zeros((batch,), jnp.int32), states=layer_states(cfg, batch))

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def _pool(self) -> jax.Array:
        return first_entry(self.k)

    @property
    def page_size(self) -> int:
        return self._pool.shape[1]

    @property
    def num_pages(self) -> int:
        return self._pool.shape[0]

    @property
    def max_len(self) -> int:
        return self.page_table.shape[1] * self.page_size

    @property
    def dtype(self) -> jnp.dtype:
        return self._pool.dtype

    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves((self.k, self.v, self.states)))

    def page_bytes(self) -> int:
        """Bytes of one page across all layers, keys and values."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves((self.k, self.v))) // self.num_pages

    def replace(self, **changes) -> "PagedKVCache":
        return dataclasses.replace(self, **changes)

    def constrained(self) -> "PagedKVCache":
        """The same cache with its pools laid out on PAGE_AXES (inside jit, under a mesh)."""
        pin = lambda xs: tuple(None if x is None else constrain(x, PAGE_AXES) for x in xs)  # noqa: E731
        return self.replace(k=pin(self.k), v=pin(self.v))

    def rows(self, rows: jax.Array) -> "PagedKVCache":
        """A view for some rows (their tables and lengths) over the same pools."""
        return self.replace(page_table=self.page_table[rows], lengths=self.lengths[rows],
                            states=jax.tree.map(lambda s: s[rows], self.states))
