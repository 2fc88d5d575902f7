"""The host side of a paged KV cache: which pages are free, which sequence holds which, and prefix reuse.

A PagePool hands out page ids of a PagedKVCache (page 0 is scratch and never handed out). Pages are
reference-counted: a sequence holds its pages; pages that hold a full page of a prompt are also *cached*,
keyed by a hash of their tokens and of everything before them (vLLM's automatic prefix caching), so a later
sequence whose prompt starts with the same full pages takes them instead of computing them again. A cached
page nobody holds stays in the pool, least recently used first to go, until a new page is needed and no page
is free. `take(n)` returns None when the pool cannot give n pages: the scheduler then waits or preempts.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

from jaxformer.models.paged_cache import SCRATCH_PAGE


def page_hashes(tokens: Sequence[int], page_size: int) -> list[bytes]:
    """The chained hash of each full page of tokens: page i's covers tokens [0, (i + 1) * page_size)."""
    out, h = [], b""
    for i in range(len(tokens) // page_size):
        chunk = ",".join(map(str, tokens[i * page_size:(i + 1) * page_size])).encode()
        h = hashlib.blake2b(h + chunk, digest_size=16).digest()
        out.append(h)
    return out


class PagePool:
    """Free pages, per-page reference counts, and the prefix cache (hash -> page, least recently used first)."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (page {SCRATCH_PAGE} is scratch), got {num_pages}")
        self.num_pages, self.page_size = num_pages, page_size
        self.free: collections.deque[int] = collections.deque(p for p in range(num_pages) if p != SCRATCH_PAGE)
        self.refs = [0] * num_pages
        self.hash_of: dict[int, bytes] = {}  # page -> its prefix hash, for cached pages
        self.cached: dict[bytes, int] = {}  # prefix hash -> page
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld: LRU first
        self.hits = self.lookups = 0  # tokens found in the cache / looked for

    @property
    def available(self) -> int:
        """Pages take() can give: free ones and cached ones nobody holds."""
        return len(self.free) + len(self.idle)

    @property
    def used(self) -> int:
        """Pages some sequence holds."""
        return self.num_pages - 1 - self.available

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest prefix of `hashes` (not yet held: call hold() on them)."""
        pages = []
        for h in hashes:
            page = self.cached.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def hold(self, pages: Sequence[int]) -> None:
        """A sequence takes these (cached) pages too."""
        for p in pages:
            self.refs[p] += 1
            self.idle.pop(p, None)

    def take(self, n: int) -> list[int] | None:
        """n pages for one sequence (free ones first, then the least recently used cached ones), or None."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self.free:
                page = self.free.popleft()
            else:
                page, _ = self.idle.popitem(last=False)
                del self.cached[self.hash_of.pop(page)]
            self.refs[page] = 1
            out.append(page)
        return out

    def register(self, page: int, h: bytes) -> None:
        """Mark a held page as holding the full prefix page `h` (reusable by later prompts)."""
        if h in self.cached or page in self.hash_of:
            return  # an equal page is cached already: this one stays private
        self.cached[h], self.hash_of[page] = page, h

    def release(self, pages: Sequence[int]) -> None:
        """A sequence lets its pages go: cached ones wait as idle (most recent last), the rest are free."""
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                if p in self.hash_of:
                    self.idle[p] = None
                else:
                    self.free.append(p)

    def stats(self) -> dict:
        return {"pages": self.num_pages - 1, "page_size": self.page_size, "pages_used": self.used,
                "pages_cached_idle": len(self.idle), "prefix_hit_tokens": self.hits,
                "prefix_lookup_tokens": self.lookups}
