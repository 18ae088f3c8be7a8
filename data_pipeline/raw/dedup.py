"""Document deduplication within a source: exact (content hash) and near (MinHash LSH).

Exact: the SHA-256 of the text with whitespace runs collapsed; the first document wins. Near: each
document's set of word `shingle`-grams (lowercased, punctuation stripped) is sketched with MinHash
(`datasketch`, `num_perm` permutations) and looked up in an LSH index; a document whose estimated
content overlap with one already kept (containment: the share of the smaller one's shingles in the
other) reaches `threshold` is dropped, so of two editions of one book (LLaMA-1 removed books with
more than 90% content overlap) the first is kept, even when the later one adds a preface or notes.
Both are generators over document dicts and count drops in a `Tally`, naming the document kept in
the example. They hold a source's keys in memory: the recipe runs the same rules split into hash
buckets on disk (`bucketed.py`, sharing `content_key`, `MinHasher` and `containment` with them), and
its tests compare the two.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Iterator

import numpy as np

from data_pipeline.raw.common import Tally

_WORD = re.compile(r"\w+", re.UNICODE)


def content_key(text: str) -> bytes:
    """What two exact duplicates share: the hash of the text with whitespace runs collapsed."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).digest()


def exact_dedup(docs: Iterable[dict], tally: Tally) -> Iterator[dict]:
    """The documents whose text was not seen before (reason `exact_duplicate`)."""
    seen: dict[bytes, str] = {}
    for doc in docs:
        key = content_key(doc["text"])
        if key in seen:
            tally.drop("exact_duplicate", f"{doc['id']} (same as {seen[key]})", doc["text"])
            continue
        seen[key] = doc["id"]
        yield doc


def shingles(text: str, size: int) -> set[bytes]:
    """The document's distinct runs of `size` consecutive words, lowercased (all words if fewer)."""
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + size]).encode("utf-8") for i in range(len(words) - size + 1)}


def containment(jaccard, size_a, size_b):
    """The share of the smaller of two shingle sets found in the other, estimated from their MinHash
    Jaccard J and sizes (|A ∩ B| = J (|A| + |B|) / (1 + J)); numbers or numpy arrays alike."""
    return jaccard * (size_a + size_b) / (1 + jaccard) / np.minimum(size_a, size_b)


class MinHasher:
    """MinHash sketches (datasketch, `num_perm` permutations drawn once from `seed` and shared by every
    sketch) and the LSH banding for candidates at Jaccard `min(candidate_jaccard, threshold)`."""

    def __init__(self, threshold: float, num_perm: int = 128, seed: int = 1, candidate_jaccard: float = 0.7) -> None:
        from datasketch import MinHash

        self.num_perm, self.seed, self.threshold = num_perm, seed, threshold
        self.candidate_jaccard = min(candidate_jaccard, threshold)
        index = self.index()
        self.bands, self.rows = index.b, index.r
        self.template = MinHash(num_perm=num_perm, seed=seed)

    def index(self):
        """An empty LSH index with this banding."""
        from datasketch import MinHashLSH

        return MinHashLSH(threshold=self.candidate_jaccard, num_perm=self.num_perm)

    def sketch(self, text: str, shingle: int = 5):
        """(the MinHash of the text's word `shingle`-grams, the number of distinct shingles)."""
        from datasketch import MinHash

        grams = shingles(text, shingle)
        t = self.template
        sketch = MinHash(num_perm=self.num_perm, seed=self.seed, permutations=t.permutations, scheme=t.scheme)
        sketch.update_batch(list(grams))
        return sketch, len(grams)


def near_dedup(
    docs: Iterable[dict],
    tally: Tally,
    threshold: float = 0.9,
    num_perm: int = 128,
    shingle: int = 5,
    seed: int = 1,
    candidate_jaccard: float = 0.7,
) -> Iterator[dict]:
    """The documents that do not overlap one kept before them by `threshold` or more (reason
    `near_duplicate`).

    Overlap is containment: the share of the smaller document's shingles found in the other, so an
    edition with a new preface or notes still matches the old one. It is estimated from the MinHash
    Jaccard J and the two set sizes (|A ∩ B| = J (|A| + |B|) / (1 + J)); candidates come from an LSH
    index at Jaccard `candidate_jaccard` (0.7 finds containment 0.9 up to a ~15% difference in size).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-dedup threshold must be in (0, 1], got {threshold}")
    from datasketch import LeanMinHash

    hasher = MinHasher(threshold, num_perm, seed, candidate_jaccard)
    index = hasher.index()
    kept: dict[str, tuple[LeanMinHash, int, str]] = {}  # key -> (sketch, shingle count, document id)
    for n, doc in enumerate(docs):
        sketch, grams = hasher.sketch(doc["text"], shingle)
        match = None
        for key in index.query(sketch):
            other, size, doc_id = kept[key]
            if containment(other.jaccard(sketch), size, grams) >= threshold:
                match = doc_id
                break
        if match is not None:
            tally.drop("near_duplicate", f"{doc['id']} (~ {match})", doc["text"])
            continue
        key = str(n)
        lean = LeanMinHash(sketch)
        index.insert(key, lean)
        kept[key] = (lean, grams, doc["id"])
        yield doc
