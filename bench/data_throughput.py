"""Tokenization and loader throughput on the bundled corpus (repeated to a few tens of MB).

Measures, in one run: raw `SentencePieceProcessor.encode` on one thread over the same texts, our
tokenization with 1 and 2 worker processes (tokens/s overall and per worker, and the per-worker ratio
to raw encode), and the packed loader reading global batches of `seq_len`-token samples from the shards
in one process. Writes a Markdown table to bench/results/<date>-data-throughput.md.

    python bench/data_throughput.py [--copies 8] [--files 8] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from data_pipeline.loader import BatchLoader, PackedSamples
from data_pipeline.sources import read_jsonl
from data_pipeline.tokenize import TokenizeSettings, tokenize_source
from data_pipeline.tokenizer import document_lines, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data_pipeline" / "sample_corpus"


def main() -> None:
    """Run the measurements and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8, help="times the corpus is repeated")
    parser.add_argument("--files", type=int, default=8, help="input files the text is split into")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--loader-batches", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="data-bench-"))
    lines = [line for p in sorted(CORPUS.glob("*.jsonl")) for line in p.read_text().split("\n") if line]
    docs = [json.loads(line) for line in lines]
    inputs = [work / f"in{k}.jsonl" for k in range(args.files)]
    for k, path in enumerate(inputs):
        with open(path, "w") as f:
            for c in range(args.copies):
                for i, d in enumerate(docs[k :: args.files]):
                    f.write(json.dumps({"id": f"{d['id']}-{c}-{i}", "text": d["text"]}) + "\n")
    texts = [d.text for p in inputs for d in read_jsonl(p)]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tokenizer = work / "tok.model"
    train_tokenizer(document_lines(d["text"] for d in docs), tokenizer, vocab_size=32000 if mb > 500 else 8192)

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    t0 = time.perf_counter()
    raw_tokens = sum(len(ids) for ids in sp.encode(texts, num_threads=1))
    raw = raw_tokens / (time.perf_counter() - t0)

    rows = []
    for workers in (1, 2):
        out = work / f"tokens-w{workers}" / "src"
        settings = TokenizeSettings(source="src", tokenizer_path=str(tokenizer), val_fraction=0.0)
        t0 = time.perf_counter()
        stats = tokenize_source(inputs, out, settings, workers=workers)
        secs = time.perf_counter() - t0
        tokens = sum(stats.tokens_written.values())
        rows.append((workers, tokens / secs, tokens / secs / workers, stats.documents_in / secs))

    samples = PackedSamples(work / "tokens-w1", seq_len=args.seq_len, seed=0)
    loader = BatchLoader(samples, global_batch_size=16, micro_batch_size=4)
    t0 = time.perf_counter()
    for _ in range(args.loader_batches):
        loader.next_batch()
    loader_tps = args.loader_batches * 16 * args.seq_len / (time.perf_counter() - t0)

    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    date = datetime.date.today().isoformat()
    table = [
        f"# Data pipeline throughput ({date})",
        "",
        f"- machine: {cpu}; input: the bundled corpus x{args.copies} in {args.files} JSONL files, "
        f"{mb:.1f} MB, {len(texts):,} documents, {raw_tokens:,} tokens (vocab {sp.get_piece_size()})",
        "- command: `python bench/data_throughput.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
        + "`",
        "",
        "| what | tokens/s | tokens/s per worker | vs raw encode per worker | documents/s |",
        "|---|---|---|---|---|",
        f"| raw `SentencePieceProcessor.encode`, 1 thread | {raw:,.0f} | {raw:,.0f} | 100% | |",
    ]
    for workers, tps, per_worker, dps in rows:
        table.append(
            f"| `tokenize_source`, {workers} worker(s) | {tps:,.0f} | {per_worker:,.0f} | "
            f"{per_worker / raw:.0%} | {dps:,.0f} |"
        )
    table.append(f"| loader, global batches of 16 x {args.seq_len} tokens, 1 process | {loader_tps:,.0f} | | | |")
    text = "\n".join(table) + "\n"
    print(text)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{date}-data-throughput.md").write_text(text)


if __name__ == "__main__":
    main()
