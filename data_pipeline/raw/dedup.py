"""Document deduplication within a source: exact (content hash) and near (MinHash LSH).

Exact: the SHA-256 of the text with whitespace runs collapsed; the first document wins. Near: each
document's set of word `shingle`-grams (lowercased, punctuation stripped) is sketched with MinHash
(`datasketch`, `num_perm` permutations) and looked up in an LSH index; a document whose estimated
content overlap with one already kept (containment: the share of the smaller one's shingles in the
other) reaches `threshold` is dropped, so of two editions of one book (LLaMA-1 removed books with
more than 90% content overlap) the first is kept, even when the later one adds a preface or notes.
Both are generators over document dicts and count drops in a `Tally`, naming the document kept in
the example.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Iterator

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
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    index = MinHashLSH(threshold=min(candidate_jaccard, threshold), num_perm=num_perm)
    template = MinHash(num_perm=num_perm, seed=seed)  # its permutations are drawn once, shared by every sketch
    kept: dict[str, tuple[LeanMinHash, int, str]] = {}  # key -> (sketch, shingle count, document id)
    for n, doc in enumerate(docs):
        grams = shingles(doc["text"], shingle)
        sketch = MinHash(num_perm=num_perm, seed=seed, permutations=template.permutations, scheme=template.scheme)
        sketch.update_batch(list(grams))
        match = None
        for key in index.query(sketch):
            other, size, doc_id = kept[key]
            jaccard = other.jaccard(sketch)
            overlap = jaccard * (size + len(grams)) / (1 + jaccard) / min(size, len(grams))
            if overlap >= threshold:
                match = doc_id
                break
        if match is not None:
            tally.drop("near_duplicate", f"{doc['id']} (~ {match})", doc["text"])
            continue
        key = str(n)
        lean = LeanMinHash(sketch)
        index.insert(key, lean)
        kept[key] = (lean, len(grams), doc["id"])
        yield doc
