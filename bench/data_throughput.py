"""Tokenization and loader throughput on the bundled corpus (repeated to a few tens of MB).

Measures, in one run: raw `SentencePieceProcessor.encode` on one thread over the same texts, our
tokenization with 1 and 2 worker processes (tokens/s overall and per worker, and the per-worker ratio
to raw encode), and the packed loader reading global batches of `seq_len`-token samples in one
process, without and with document positions (`data.document_attention`), over the same tokens cut
into 8, 1,000 and 10,000 shards (`--shards`), with and without the background sha256 check of the
shards (`verify_shards`; its CPU counts, the thread's time being the process's), and the time that
check takes alone. Each loader run is a fresh process that counts its CPU seconds; with `--before DIR`
the loader runs are repeated with the code in DIR (a checkout of an earlier commit) for a before/after
table. Writes a Markdown table to bench/results/<date>-data-throughput.md.

    git archive <commit> data_pipeline | tar -x -C /tmp/before   # optional: the loader to compare
    python bench/data_throughput.py [--copies 24] [--files 8] [--seq-len 2048] [--before /tmp/before]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data_pipeline" / "sample_corpus"


def loader_worker(
    code: str, root: str, seq_len: int, batch: int, micro: int, positions: int, verify: int, seconds: float
) -> None:
    """Child process: read batches with the loader under `code` for `seconds` of CPU; print JSON. With
    `verify` 0, the shards' background sha256 check is off (an older loader has none: pass 1)."""
    sys.path.insert(0, code)
    from data_pipeline.loader import BatchLoader, PackedSamples

    t0 = time.perf_counter()
    samples = PackedSamples(root, seq_len=seq_len, seed=0)
    opened = time.perf_counter() - t0
    off = {} if verify else {"verify_shards": False}
    loader = BatchLoader(samples, batch, micro, with_positions=bool(positions), **off)
    loader.next_batch()  # first touch of the pages and caches
    batches, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while time.process_time() - cpu0 < seconds or batches < 3:
        loader.next_batch()
        batches += 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    check = None
    if verify and hasattr(loader, "verifier"):  # the check alone, on shards not yet checked
        fresh = PackedSamples(root, seq_len=seq_len, seed=0)
        t0 = time.perf_counter()
        BatchLoader(fresh, batch, micro).verifier.wait()
        check = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "open_s": opened,
                "batches": batches,
                "tokens": batches * batch * seq_len,
                "cpu": cpu,
                "wall": wall,
                "check_s": check,
            }
        )
    )


def cut_into_shards(tokens: Path, n_shards: int, output: Path) -> int:
    """Rewrite the train stream of the source folder `tokens` as `n_shards` shards of whole documents
    (near-equal document counts) under `output`, with a manifest; return the tokens per shard."""
    import numpy as np

    from data_pipeline.shards import Manifest, ShardWriter, SourceShards

    stream = SourceShards(tokens, "train")
    starts = np.concatenate([s.offsets[:-1].astype(np.int64) + b for s, b in zip(stream.shards, stream.starts)])
    if n_shards > len(starts):
        raise SystemExit(f"--shards {n_shards}: only {len(starts)} documents; raise --copies")
    bounds = np.append(starts, stream.n_tokens)
    output.mkdir(parents=True)
    manifest = Manifest(**{k: v for k, v in vars(stream.manifest).items() if k not in ("shards", "stats")})
    for k, docs in enumerate(np.array_split(np.arange(len(starts)), n_shards)):
        lo, hi = int(bounds[docs[0]]), int(bounds[docs[-1] + 1])
        with ShardWriter(output, f"train-{k:05d}", "train", np.dtype(manifest.dtype), []) as shard:
            shard.write(stream.read(lo, hi - lo), np.diff(bounds[docs[0] : docs[-1] + 2]))
        manifest.shards.append(shard.info)
    manifest.save(output)
    return stream.n_tokens // n_shards


def main() -> None:
    """Run the measurements and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=24, help="times the corpus is repeated")
    parser.add_argument("--files", type=int, default=8, help="input files the text is split into")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16, help="samples per global batch (micro-batches of 4)")
    parser.add_argument("--shards", type=int, nargs="+", default=[8, 1000, 10000], help="shard counts for the loader")
    parser.add_argument("--loader-seconds", type=float, default=3.0, help="CPU seconds per loader run")
    parser.add_argument("--before", type=Path, help="a folder holding an earlier data_pipeline to compare")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / f"{datetime.date.today()}-data-throughput.md"
    )
    parser.add_argument("--loader-worker", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loader_worker:
        code, root, *numbers = args.loader_worker
        return loader_worker(code, root, *map(int, numbers[:-1]), float(numbers[-1]))

    import sentencepiece as spm
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.report import provenance, publish
    from data_pipeline.sources import read_jsonl
    from data_pipeline.tokenize import TokenizeSettings, tokenize_source
    from data_pipeline.tokenizer import document_lines, train_tokenizer

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

    layouts = {
        n: (cut_into_shards(work / "tokens-w1" / "src", n, work / f"shards-{n}" / "src"), work / f"shards-{n}")
        for n in args.shards
    }
    codes = ([("before", args.before.resolve())] if args.before else []) + [("this commit", ROOT)]
    loader_rows = []
    shard_mb = 2 * max(per_shard * n for n, (per_shard, _) in layouts.items()) / 1e6  # uint16 tokens
    for name, code in codes:
        for n, (per_shard, root) in layouts.items():
            for positions, verify in [(0, 1), (1, 1)] + ([(0, 0), (1, 0)] if code == ROOT else []):
                numbers = [args.seq_len, args.batch, 4, positions, verify, args.loader_seconds]
                cmd = [sys.executable, __file__, "--loader-worker", str(code), str(root), *map(str, numbers)]
                r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                checked = "no" if not verify or r["check_s"] is None else f"yes ({r['check_s']:.2f} s alone)"
                loader_rows.append(
                    f"| {name} | {n:,} | {per_shard:,} | {'yes' if positions else 'no'} | {checked} | "
                    f"{r['open_s']:.2f} | {r['batches']:,} | {r['tokens'] / r['cpu']:,.0f} | "
                    f"{r['tokens'] / r['wall']:,.0f} |"
                )

    table = ["# Data pipeline throughput", ""]
    table += [f"- {line}" for line in provenance(torch.device("cpu"), "n/a")]
    table += [
        f"- input: the bundled corpus x{args.copies} in {args.files} JSONL files, {mb:.1f} MB, {len(texts):,} "
        f"documents, {raw_tokens:,} tokens (vocab {sp.get_piece_size()})",
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
    table += [
        "",
        f"Loader: the same train tokens cut into N shards of whole documents; global batches of {args.batch} x "
        f"{args.seq_len} tokens (micro-batches of 4), one process, each run a fresh process reading for "
        f"{args.loader_seconds:g} CPU seconds after a first batch; open = building `PackedSamples` (reading every "
        f"shard's index); sha256 = the shards' ({shard_mb:.0f} MB) background check, with the time it takes alone.",
        "",
        "| code | shards | tokens per shard | positions | sha256 | open s | batches | tokens per CPU-second | "
        "tokens/s (wall) |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
        *loader_rows,
    ]
    publish(table, args.out)


if __name__ == "__main__":
    main()
