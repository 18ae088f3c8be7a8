"""Near-dedup at web scale's shape: CPU per document and peak memory of every near-dedup stage as one page's
cluster of near copies grows, against datasketch's in-memory LSH (`dedup.near_dedup`).

A source of the bundled corpus (`data_pipeline/sample_corpus`, 715 documents of real text) with N near
copies of one page (a Wikipedia article's first 400 words, each copy with 2 words replaced, so every copy
overlaps the page by more than 0.9) spread among them, in 8 parts; near dedup at 0.9 only (no line or exact
pass), `dedup_buckets` 16. Step 1 is given (its outputs and markers written here); then each stage runs
alone in its own process, as one Slurm array task would (`--stage S`), and its CPU seconds and peak RSS
are taken. The reference, datasketch's `MinHashLSH` in memory over the same documents in order, runs in its
own process just before, for each N. Both keep the same documents (checked here for every N).

    python bench/near_dedup_scale.py [--sizes 2000 8000 32000] [--out bench/results/DATE-near-dedup-scale.md]
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.recipe_scale import timed  # noqa: E402
from bench.report import provenance, publish  # noqa: E402
from data_pipeline.raw.common import Tally  # noqa: E402
from data_pipeline.raw.recipe import RawSourceConfig, RecipeConfig, _fingerprint, part_name  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data_pipeline" / "sample_corpus"
PARTS = 8
STAGES = ("plan", "near-scan", "near-bucket", "near-greedy", "near-apply")

REFERENCE = (  # datasketch in memory: the kept ids, CPU seconds and peak RSS of this process
    "import gzip, json, resource, sys\n"
    "from data_pipeline.raw.common import Tally\n"
    "from data_pipeline.raw.dedup import near_dedup\n"
    "docs = (json.loads(l) for p in sys.argv[2:] for l in gzip.open(p, 'rt', encoding='utf-8'))\n"
    "kept = [d['id'] for d in near_dedup(docs, Tally(), threshold=0.9)]\n"
    "peak = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "u = resource.getrusage(resource.RUSAGE_SELF)\n"
    "json.dump({'kept': kept, 'cpu': u.ru_utime + u.ru_stime, 'peak_mb': int(peak) / 1024}, open(sys.argv[1], 'w'))\n"
)


def near_copies(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(the corpus's documents, `n` near copies of one page): each copy replaces 2 of the page's words."""
    docs = [json.loads(line) for path in sorted(CORPUS.glob("*.jsonl")) for line in path.open(encoding="utf-8")]
    words = next(d for d in docs if d["meta"]["source"] == "wikipedia" and len(d["text"].split()) > 400)["text"]
    words = words.split()[:400]
    rng = random.Random(seed)
    copies = []
    for c in range(n):
        page = list(words)
        for _ in range(2):
            page[rng.randrange(len(page))] = rng.choice(words) + "x"
        copies.append({"id": f"page-copy-{c}", "text": " ".join(page)})
    return [{"id": d["id"], "text": d["text"]} for d in docs], copies


def prepare(work: Path, n: int) -> tuple[Path, list[Path]]:
    """Step 1's outputs and markers for the source; (the recipe config, the parts' files in order)."""
    ordinary, copies = near_copies(n)
    docs = [None] * (len(ordinary) + len(copies))
    step = len(docs) / len(ordinary)
    for i, doc in enumerate(ordinary):  # the corpus spread evenly, the copies between
        docs[int(i * step)] = doc
    rest = iter(copies)
    docs = [d if d is not None else next(rest) for d in docs]
    inputs, files = work / "inputs", work / "out" / "web" / "files"
    inputs.mkdir(parents=True)
    files.mkdir(parents=True)
    source = RawSourceConfig(
        name="web", kind="commoncrawl", inputs=[str(inputs / "*.jsonl")], options={"line_dedup": False}
    )
    source.exact_dedup, source.near_dedup = False, 0.9
    paths = []
    for p in range(PARTS):
        entry = inputs / f"part-{p:05d}.jsonl"
        entry.write_text("")  # what the markers name as the input
        tally, path = Tally(), files / f"{part_name(str(entry))}.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for doc in docs[p * len(docs) // PARTS : (p + 1) * len(docs) // PARTS]:
                doc = {**doc, "meta": {"source": "commoncrawl"}}
                tally.read(doc["text"])
                f.write(json.dumps(tally.keep(doc), ensure_ascii=False) + "\n")
        tally.input_bytes = tally.bytes_in
        (files / f"{part_name(str(entry))}.done.json").write_text(
            json.dumps({**_fingerprint(source, str(entry), Tally()), "tally": tally.to_dict()})
        )
        paths.append(path)
    from omegaconf import OmegaConf

    cfg = RecipeConfig(output=str(work / "out"), sources=[source], dedup_buckets=16, keep_work=True)
    config = work / "recipe.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return config, paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / f"{datetime.date.today()}-near-dedup-scale.md"
    )
    args = parser.parse_args()
    rows, notes = {}, []
    with tempfile.TemporaryDirectory(prefix="near-scale-") as tmp:
        for n in args.sizes:
            work = Path(tmp) / str(n)
            config, paths = prepare(work, n)
            total = n + 715
            load = os.getloadavg()[0]
            done = subprocess.run(
                [sys.executable, "-c", REFERENCE, str(work / "ref.json"), *map(str, paths)], cwd=ROOT, check=True
            )
            assert done.returncode == 0
            ref = json.loads((work / "ref.json").read_text())
            rows["datasketch MinHashLSH (in memory)", n] = (ref["cpu"], ref["peak_mb"])
            for stage in STAGES:
                rows[stage, n] = timed(["recipe", str(config), "--stage", stage], work)
                print(n, stage, rows[stage, n], flush=True)
            kept = [
                json.loads(line)["id"]
                for p in range(PARTS)
                for line in gzip.open(work / "out" / "web" / "work" / "near" / "out" / f"{p:08d}.jsonl.gz", "rt")
            ]
            same = (
                "the same documents"
                if kept == ref["kept"]
                else f"DIFFERENT documents ({len(kept)} vs {len(ref['kept'])})"
            )
            files = sum(1 for f in (work / "out" / "web" / "work" / "near").rglob("*") if f.is_file())
            notes.append(
                f"- N = {n:,}: {total:,} documents, {len(kept):,} kept; ours and datasketch keep {same}; "
                f"{files} files under work/near; load average {load:.2f} before"
            )
            rows["total", n] = (sum(rows[s, n][0] for s in STAGES[1:]), max(rows[s, n][1] for s in STAGES[1:]))
    sizes = args.sizes
    lines = ["# Near-dedup as one page's cluster of near copies grows: CPU per document and peak RSS", ""]
    lines += [f"- {line}" for line in provenance(torch.device("cpu"), "n/a")]
    lines += [f"- {PARTS} parts, dedup_buckets 16, threshold 0.9, each stage alone in one process", ""]
    lines.append(
        "| stage | "
        + " | ".join(f"N={n:,} CPU ms/doc | N={n:,} peak MB" for n in sizes)
        + " | ratio largest/smallest (CPU/doc, MB) |"
    )
    lines.append("|---|" + "---:|" * (2 * len(sizes) + 1))
    for name in ["datasketch MinHashLSH (in memory)", *STAGES[1:], "total"]:
        per_doc = [rows[name, n][0] * 1000 / (n + 715) for n in sizes]
        peaks = [rows[name, n][1] for n in sizes]
        cells = " | ".join(f"{c:.3f} | {m:.0f}" for c, m in zip(per_doc, peaks))
        lines.append(f"| {name} | {cells} | {per_doc[-1] / per_doc[0]:.2f}, {peaks[-1] / peaks[0]:.2f} |")
    lines += ["", *notes]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
