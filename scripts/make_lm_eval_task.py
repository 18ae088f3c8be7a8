"""Build the bundled lm-eval task `sample_continuation` from the held-out split of the sample corpus.

Each example is a passage of PASSAGE_WORDS words from a held-out document and four candidate
continuations of CONTINUATION_WORDS words: the words that follow it in the document, and three
spans taken from other held-out documents. The model picks the continuation it finds most likely
(chance: 25%). Held out means what `data_pipeline.tokenize.is_validation` holds out at the
pipeline's `tokenize.val_fraction` (configs/pipeline/sample.yaml), so a model trained on the
sample corpus has not seen these documents.

Deterministic: the same corpus, fraction and seed give the same file, byte for byte.

    .venv/bin/python scripts/make_lm_eval_task.py   # rewrites pretrain/lm_eval_tasks/sample_continuation.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline.tokenize import is_validation  # noqa: E402

PASSAGE_WORDS = 40
CONTINUATION_WORDS = 10
PER_DOCUMENT = 30  # at most this many examples from one document, so that no document dominates
CHOICES = 4


def held_out_documents(corpus: Path, val_fraction: float) -> list[tuple[str, str, list[str]]]:
    """(source, id, words) of every held-out document of the corpus, in file then line order."""
    docs = []
    for path in sorted(corpus.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if is_validation(path.stem, record["id"], val_fraction):
                    docs.append((path.stem, record["id"], record["text"].split()))
    return docs


def build_examples(corpus: Path, val_fraction: float, seed: int) -> list[dict]:
    """The task's examples: a passage, four continuations and the index of the true one."""
    window = PASSAGE_WORDS + CONTINUATION_WORDS
    chunks = []  # (document index, passage, continuation): non-overlapping windows, evenly spread
    docs = held_out_documents(corpus, val_fraction)
    for d, (_, _, words) in enumerate(docs):
        n = len(words) // window
        for k in range(min(n, PER_DOCUMENT)):
            start = (k * n // min(n, PER_DOCUMENT)) * window
            chunks.append(
                (
                    d,
                    " ".join(words[start : start + PASSAGE_WORDS]),
                    " ".join(words[start + PASSAGE_WORDS : start + window]),
                )
            )
    if len({d for d, _, _ in chunks}) < 2:
        raise ValueError(
            f"{corpus}: fewer than two held-out documents of {window}+ words at val_fraction={val_fraction}"
        )
    rng = random.Random(seed)
    examples = []
    for i, (d, passage, truth) in enumerate(chunks):
        others = [c for e, _, c in chunks if e != d]
        choices = rng.sample(others, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, truth)
        source, doc_id, _ = docs[d]
        examples.append({"id": f"{source}/{doc_id}/{i}", "passage": passage, "choices": choices, "label": label})
    return examples


def main(argv: list[str] | None = None) -> None:
    """Write the task's JSONL file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=ROOT / "data_pipeline" / "sample_corpus")
    parser.add_argument(
        "--pipeline",
        type=Path,
        default=ROOT / "configs" / "pipeline" / "sample.yaml",
        help="gives tokenize.val_fraction",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "pretrain" / "lm_eval_tasks" / "sample_continuation.jsonl"
    )
    args = parser.parse_args(argv)
    from omegaconf import OmegaConf

    val_fraction = OmegaConf.load(args.pipeline).tokenize.val_fraction
    examples = build_examples(args.corpus, float(val_fraction), args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    print(f"{args.output}: {len(examples)} examples from the held-out documents (val_fraction {val_fraction})")


if __name__ == "__main__":
    main()
