"""Document deduplication within a source: exact (content hash) and near (MinHash LSH).

Exact: the SHA-256 of the text with whitespace runs collapsed; the first document wins. Near: each
document's set of word `shingle`-grams (lowercased, punctuation stripped) is sketched with MinHash
(`datasketch`, `num_perm` permutations) and looked up in an LSH index tuned for Jaccard similarity
`threshold`; a document whose estimated similarity to one already kept reaches the threshold is
dropped, so of two editions of one book (LLaMA-1 removed books with more than 90% content overlap)
the first is kept. Both are generators over document dicts and count drops in a `Tally`, naming the
document kept in the example.
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
    docs: Iterable[dict], tally: Tally, threshold: float = 0.9, num_perm: int = 128, shingle: int = 5, seed: int = 1
) -> Iterator[dict]:
    """The documents not near-duplicates (estimated Jaccard >= `threshold`) of one kept before them
    (reason `near_duplicate`)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-dedup threshold must be in (0, 1], got {threshold}")
    from datasketch import MinHash, MinHashLSH

    index = MinHashLSH(threshold=threshold, num_perm=num_perm)
    sketches: dict[str, MinHash] = {}
    for n, doc in enumerate(docs):
        sketch = MinHash(num_perm=num_perm, seed=seed)
        sketch.update_batch(list(shingles(doc["text"], shingle)))
        # LSH finds candidates; keep only those whose estimated similarity really reaches the threshold
        similar = [k for k in index.query(sketch) if sketches[k].jaccard(sketch) >= threshold]
        if similar:
            tally.drop("near_duplicate", f"{doc['id']} (~ {similar[0]})", doc["text"])
            continue
        key = f"{n}:{doc['id']}"
        index.insert(key, sketch)
        sketches[key] = sketch
        yield doc
