"""Peak memory of one tokenize worker against the size of its input file.

Writes one JSONL input of the bundled sample corpus (every document of every file) repeated 1x, 4x
and 16x with new ids, trains a tokenizer on the corpus, and tokenizes each input in a fresh process
(`tokenize_file`, what one worker does), which reports its peak resident memory (VmHWM) before
(imports and tokenizer loaded) and after. With `--before DIR` the same runs are made with the code in
DIR too (a checkout of an earlier commit), for a before/after table. Writes a Markdown table to
bench/results/<date>-tokenize-memory.md.

    git archive <commit> data_pipeline | tar -x -C /tmp/before   # optional: the code to compare
    python bench/tokenize_memory.py [--sizes 1 4 16] [--before /tmp/before]
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


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: unlike `ru_maxrss`, not carried over from
    the parent that forked it)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def worker(code: str, input_path: str, output: str, tokenizer: str) -> None:
    """Child process: tokenize one file with the code under `code`; print peak memory as JSON."""
    sys.path.insert(0, code)
    from data_pipeline.tokenize import TokenizeSettings, tokenize_file
    from data_pipeline.tokenizer import Tokenizer

    Tokenizer(tokenizer)
    baseline = peak_rss()
    settings = TokenizeSettings(source="bench", tokenizer_path=tokenizer, val_fraction=0.01)
    t0 = time.perf_counter()
    part = tokenize_file(0, Path(input_path), Path(output), settings)
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    stats = part["stats"]
    tokens, docs = sum(stats["tokens_written"].values()), stats["documents_in"]
    print(json.dumps({"baseline": baseline, "peak": peak, "tokens": tokens, "docs": docs, "s": seconds}))


def measure(code: Path, input_path: Path, output: Path, tokenizer: Path) -> dict:
    """Run `worker` in a fresh interpreter and return what it printed."""
    output.mkdir(parents=True)
    args = [sys.executable, __file__, "--worker", str(code), str(input_path), str(output), str(tokenizer)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Write the inputs, run one worker per (code, size) and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="times the corpus is repeated")
    parser.add_argument("--before", type=Path, help="a folder holding an earlier data_pipeline to compare")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / f"{datetime.date.today()}-tokenize-memory.md"
    )
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    import torch

    sys.path.insert(0, str(ROOT))
    from bench.report import provenance, publish
    from data_pipeline.tokenizer import document_lines, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="tokenize-memory-"))
    docs = [json.loads(line) for p in sorted(CORPUS.glob("*.jsonl")) for line in p.read_text().splitlines() if line]
    tokenizer = work / "tok.model"
    train_tokenizer(document_lines(d["text"] for d in docs), tokenizer, vocab_size=args.vocab_size)
    inputs = {}
    for size in args.sizes:
        inputs[size] = work / f"x{size}.jsonl"
        with open(inputs[size], "w") as f:
            for copy in range(size):
                for d in docs:
                    f.write(json.dumps({"id": f"{d['id']}-{copy}", "text": d["text"]}) + "\n")
    codes = ([("before", args.before.resolve())] if args.before else []) + [("this commit", ROOT)]
    lines = ["# Peak memory of one tokenize worker against its input file's size", ""]
    lines += [f"- {line}" for line in provenance(torch.device("cpu"), "n/a")]
    lines += [
        f"- input: the bundled sample corpus ({len(docs):,} documents, {inputs[args.sizes[0]].stat().st_size / 1e6:.1f}"
        f" MB of JSONL at {args.sizes[0]}x) repeated with new ids into one JSONL file; vocab {args.vocab_size}",
        "- each run is `tokenize_file` (one worker's work on one file) in a fresh process; baseline = its peak"
        " resident memory after imports and loading the tokenizer, growth = peak - baseline",
        "",
        "| code | input | JSONL MB | documents | tokens | baseline MB | peak MB | growth MB | growth bytes/token |"
        " tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, code in codes:
        for size, path in inputs.items():
            r = measure(code, path, work / f"out-{name.replace(' ', '-')}-{size}", tokenizer)
            growth = r["peak"] - r["baseline"]
            lines.append(
                f"| {name} | {size}x | {path.stat().st_size / 1e6:.1f} | {r['docs']:,} | {r['tokens']:,} | "
                f"{r['baseline'] / 1e6:.0f} | {r['peak'] / 1e6:.0f} | {growth / 1e6:.0f} | "
                f"{growth / r['tokens']:.1f} | {r['tokens'] / r['s']:,.0f} |"
            )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
