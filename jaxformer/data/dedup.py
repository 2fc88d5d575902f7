"""Document deduplication for `jaxformer prepare --dedup`: exact (normalised text) and near (MinHash + LSH).

Each document gets a key where it is read (in a prepare worker): a digest of its normalised text (`exact`), or a
MinHash signature of its word 5-grams (`minhash`, Broder 1997, via datasketch). One Deduplicator then sees the
keys in corpus order and keeps a document unless an earlier one had the same digest, or, for MinHash, a
signature whose estimated Jaccard similarity is at least `threshold` (LSH finds the candidates, Leskovec et al.,
Mining of Massive Datasets, ch. 3). The first copy wins, so the output does not depend on the worker count.
"""

from __future__ import annotations

import hashlib
import re

from jaxformer.data.formats import need

METHODS = ("none", "exact", "minhash")
NUM_PERM = 128  # MinHash permutations: the Jaccard estimate's standard error is ~1/sqrt(128) = 0.09
SHINGLE = 5  # words per shingle
THRESHOLD = 0.8  # estimated Jaccard similarity at which two documents are near duplicates
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed: how `exact` compares documents."""
    return " ".join(text.lower().split())


def exact_key(text: str) -> bytes:
    """16-byte digest of the normalised text."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def minhash_key(text: str):
    """MinHash signature (a datasketch LeanMinHash of NUM_PERM values) of the document's word 5-grams (its words,
    when it has fewer)."""
    words = _WORD.findall(text.lower())
    shingles = {" ".join(words[i:i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))}
    datasketch = need("datasketch", "--dedup minhash")
    m = datasketch.MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch([s.encode("utf-8") for s in shingles])
    return datasketch.LeanMinHash(m)


def key_fn(method: str):
    """text -> key for a method ('none': None)."""
    if method not in METHODS:
        raise ValueError(f"dedup must be one of {METHODS}, got {method!r}")
    return {"none": None, "exact": exact_key, "minhash": minhash_key}[method]


class Deduplicator:
    """Keeps the first document of each duplicate group, seeing keys in corpus order."""

    def __init__(self, method: str, threshold: float = THRESHOLD):
        key_fn(method)
        self.method, self.threshold = method, threshold
        self.kept = self.removed = 0
        self._seen: set[bytes] = set()
        self._lsh = None
        if method == "minhash":
            self._lsh = need("datasketch", "--dedup minhash").MinHashLSH(threshold=threshold, num_perm=NUM_PERM)

    def keep(self, key) -> bool:
        """True for a document to write; False for a duplicate of one already kept."""
        if self.method == "none":
            new = True
        elif self.method == "exact":
            new = key not in self._seen
            self._seen.add(key)
        else:
            new = not self._lsh.query(key)
            if new:
                self._lsh.insert(str(self.kept), key, check_duplication=False)
        self.kept += new
        self.removed += not new
        return new

    def report(self) -> dict:
        """The manifest's "dedup" entry."""
        out = {"method": self.method, "kept": self.kept, "removed": self.removed}
        if self.method == "minhash":
            out.update(threshold=self.threshold, num_perm=NUM_PERM, shingle_words=SHINGLE)
        return out
