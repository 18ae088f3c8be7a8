"""The recipe at scale: throughput per core against the number of workers, and the peak memory and time
of every stage of the dedup passes as the input grows at a fixed number of hash buckets.

1. Workers: the dedup chain (every stage after step 1) on the 4x input below with `workers=1` and
   `workers=2`: wall seconds, CPU seconds of all processes, text MB per wall second and per worker.
   (Step 1's rate per core, by source, is bench/raw_throughput.py's.)
2. Dedup memory: documents of real text (`data_pipeline/sample_corpus`, 3.7 MB: Wikipedia, Gutenberg,
   StackExchange, Python docs, LaTeX) as a CommonCrawl-kind source with line, exact and near (0.9) dedup;
   1x is 4 parts (4 copies of the corpus), 4x and 16x have 16 and 64. Every copy after the first has
   new ids and each word marked with the copy's number, so it is new text (no more duplicates than
   the corpus has itself) of the same shape. Step 1 is given (its outputs and markers written here),
   then each stage runs alone, as a Slurm array task would (`--stage S --machine 0/1 workers=1`), and
   its process's peak RSS and wall time are taken; `dedup_buckets` stays 16.
3. Buckets: 100 parts of the corpus's first 50 documents at `dedup_buckets` 16 and 4096 (the LLaMA-1
   config's), stage by stage interleaved: CPU seconds per input file, and the files and bytes the dedup
   passes leave under `work/`.

    python bench/recipe_scale.py [--sizes 1 4 16] [--workers-size 4] [--buckets-parts 100] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import provenance, publish  # noqa: E402
from data_pipeline.raw.common import Tally  # noqa: E402
from data_pipeline.raw.recipe import RawSourceConfig, RecipeConfig, _fingerprint, part_name  # noqa: E402
from data_pipeline.raw.stages import STAGES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data_pipeline" / "sample_corpus"


PEAK = (  # VmHWM: the peak RSS of this program alone (ru_maxrss keeps the forking parent's across exec)
    "import runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "sys.argv[0] = 'data_pipeline'\n"
    "try:\n"
    "    runpy.run_module('data_pipeline', run_name='__main__')\n"
    "except SystemExit as e:\n"
    "    assert not e.code, e.code\n"
    "peak = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]\n"
    "open(out, 'w').write(peak)\n"
)


def timed(args: list[str], work: Path) -> tuple[float, float]:
    """(CPU seconds, peak RSS in MB) of the process `python -m data_pipeline ARGS` (CPU time, not wall
    time: the figure holds on a machine shared with other work)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-c", PEAK, str(work / "peak"), *args], cwd=ROOT, capture_output=True)
    if result.returncode:
        raise SystemExit(f"{args} failed: {result.stderr.decode()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return cpu, int((work / "peak").read_text()) / 1024


def workers_rows(work: Path, size: int) -> list[str]:
    """The dedup chain (plan to report) over the `size`x input with 1 and 2 worker processes."""
    rows = [
        "| workers | wall s | CPU s (all processes) | text MB | text MB/s | text MB/s per worker |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for workers in (1, 2):
        folder = work / f"workers-{workers}"
        config = prepare(folder, 4 * size)
        mb = sum(json.loads(p.read_text())["tally"]["bytes_in"] for p in folder.glob("out/cc/files/*.done.json")) / 1e6
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        command = [sys.executable, "-m", "data_pipeline", "recipe", str(config), f"workers={workers}"]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        rows.append(f"| {workers} | {wall:.1f} | {cpu:.1f} | {mb:.0f} | {mb / wall:.2f} | {mb / wall / workers:.2f} |")
    return rows


def letters(n: int) -> str:
    """`n` in base 26 as letters (CCNet's line normal form maps digits to 0, letters stay)."""
    out = ""
    while True:
        n, r = divmod(n, 26)
        out = "abcdefghijklmnopqrstuvwxyz"[r] + out
        if not n:
            return out


def copy_of(doc: dict, copy: int) -> dict:
    """The document as copy `copy`: a new id and every word marked with the copy's number (new text)."""
    if copy == 0:
        return doc
    mark = "q" + letters(copy)
    lines = [" ".join(word + mark for word in line.split(" ")) for line in doc["text"].split("\n")]
    return {"id": f"{doc['id']}-copy{copy}", "text": "\n".join(lines), "meta": {"source": "commoncrawl"}}


def prepare(
    work: Path, parts: int, passes: tuple[str, ...] = ("line", "exact", "near"), buckets: int = 16, docs: int = 0
) -> Path:
    """Step 1's outputs and markers for `parts` copies of the corpus (its first `docs` documents when not 0),
    for a source with the dedup `passes` in `buckets` buckets; returns the recipe config's path."""
    limit = docs or None
    docs = [json.loads(line) for path in sorted(CORPUS.glob("*.jsonl")) for line in path.open(encoding="utf-8")]
    docs = docs[:limit]
    docs = [{"id": d["id"], "text": d["text"], "meta": {"source": "commoncrawl"}} for d in docs]
    inputs = work / "inputs"
    inputs.mkdir(parents=True)
    for copy in range(parts):
        (inputs / f"part-{copy:05d}.jsonl").write_text("")  # what the markers name as the input
    source = RawSourceConfig(
        name="cc",
        kind="commoncrawl",
        inputs=[str(inputs / "*.jsonl")],
        options={"line_dedup": "line" in passes},
        exact_dedup="exact" in passes,
        near_dedup=0.9 if "near" in passes else None,
    )
    files = work / "out" / "cc" / "files"
    files.mkdir(parents=True)
    for copy, entry in enumerate(sorted(inputs.glob("*.jsonl"))):
        tally = Tally()
        with gzip.open(files / f"{part_name(str(entry))}.jsonl.gz", "wt", encoding="utf-8") as f:
            for doc in docs:
                doc = copy_of(doc, copy)
                tally.read(doc["text"])
                f.write(json.dumps(tally.keep(doc), ensure_ascii=False) + "\n")
        tally.input_bytes = tally.bytes_in
        marker = {**_fingerprint(source, str(entry), Tally()), "tally": tally.to_dict()}
        (files / f"{part_name(str(entry))}.done.json").write_text(json.dumps(marker))
    from omegaconf import OmegaConf

    cfg = RecipeConfig(output=str(work / "out"), sources=[source], dedup_buckets=buckets, keep_work=True)
    config = work / "recipe.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return config


def memory_rows(work: Path, sizes: list[int]) -> list[str]:
    """Peak RSS and wall time of every stage at each input size."""
    header = "| stage | " + " | ".join(f"{s}x MB peak | {s}x CPU s" for s in sizes) + " |"
    rows, results, text_mb = [header, "|---|" + "---:|" * (2 * len(sizes))], {}, {}
    for size in sizes:
        folder = work / f"size-{size}"
        config = prepare(folder, 4 * size)
        text_mb[size] = sum(p.stat().st_size for p in (folder / "out" / "cc" / "files").glob("*.jsonl.gz")) / 1e6
        for stage in STAGES[1:]:
            results[stage, size] = timed(["recipe", str(config), "--stage", stage], work)
            print(stage, size, results[stage, size], flush=True)
        report = json.loads((folder / "out" / "cc" / "report.json").read_text())
        text_mb[size] = (
            text_mb[size],
            report["bytes_in"] / 1e6,
            report["docs_in"],
            report["docs_out"],
            report["dropped"],
        )
    for stage in STAGES[1:]:
        cells = " | ".join(f"{results[stage, s][1]:.0f} | {results[stage, s][0]:.1f}" for s in sizes)
        rows.append(f"| {stage} | {cells} |")
    rows.append("")
    for size in sizes:
        gz, mb, docs_in, docs_out, dropped = text_mb[size]
        rows.append(
            f"- {size}x: {4 * size} parts, {mb:.0f} MB of text ({gz:.0f} MB gzipped), {docs_in:,} documents in, "
            f"{docs_out:,} out; dropped {json.dumps(dropped)}"
        )
    return rows


def buckets_rows(work: Path, parts: int, docs: int) -> list[str]:
    """The dedup chain's CPU per input file and the files it leaves, at 16 and 4096 buckets (interleaved
    stage by stage), on `parts` parts of `docs` documents each."""
    rows = [
        "| dedup_buckets | CPU s per input file (every stage after step 1) | files under work/ | bytes under work/ |",
        "|---:|---:|---:|---:|",
    ]
    configs = {b: prepare(work / f"buckets-{b}", parts, buckets=b, docs=docs) for b in (16, 4096)}
    cpu, loads = {b: 0.0 for b in configs}, []
    for stage in STAGES[1:]:
        for b, config in configs.items():
            loads.append(os.getloadavg()[0])
            cpu[b] += timed(["recipe", str(config), "--stage", stage], work)[0]
    outputs = {}
    for b, config in configs.items():
        folder = config.parent / "out" / "cc"
        found = [p for p in (folder / "work").rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in found)
        rows.append(f"| {b} | {cpu[b] / parts:.3f} | {len(found):,} | {size / 1e6:.1f} MB |")
        outputs[b] = [p.read_bytes() for p in sorted(folder.glob("cc-*.jsonl.gz"))]
    same = "the same bytes" if outputs[16] == outputs[4096] else "DIFFERENT bytes"
    rows += ["", f"- {parts} parts of {docs} documents, line + exact + near passes; the output shards: {same}"]
    rows.append(f"- load average before each stage: {min(loads):.2f}-{max(loads):.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--workers-size", type=int, default=4, help="0: skip the workers table")
    parser.add_argument("--buckets-parts", type=int, default=100, help="0: skip the 16 vs 4096 buckets table")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / f"{datetime.date.today()}-recipe-scale.md"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="recipe-scale-") as tmp:
        work = Path(tmp)
        lines = ["# The recipe at scale: workers, and the dedup stages' memory as the input grows", ""]
        lines += [f"- {line}" for line in provenance(torch.device("cpu"), "n/a")]
        if args.workers_size:
            lines += ["", f"## The dedup chain on the {args.workers_size}x input by worker processes", ""]
            lines += workers_rows(work, args.workers_size)
        if args.buckets_parts:
            lines += ["", "## 16 vs 4096 buckets: CPU per input file and intermediate files", ""]
            lines += buckets_rows(work, args.buckets_parts, docs=50)
        if args.sizes:
            lines += ["", "## Each stage alone (one process, as one Slurm array task), dedup_buckets=16", ""]
            lines += memory_rows(work, args.sizes)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
