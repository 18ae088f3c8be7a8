r"""Our MinHash near dedup against datatrove's four-stage MinHash, like for like, on the same documents, one core.

The documents are bench/recipe_scale.py's (the sample corpus, real text, as `--parts` parts, every copy
after the first new text of the same shape), written once as JSONL.gz. Ours: the recipe's near-dedup
stages (`near-scan`, `near-bucket`, `near-greedy`, `near-apply`: 128 permutations, 5-grams of `\w+`
words, LSH of 14 bands x 9 rows, containment checked at 0.9, `dedup_buckets=16`) and the stages writing
the output shards (`count`, `write`, `concat`), each stage a `python -m data_pipeline recipe --stage`
process. datatrove's: `MinhashDedupSignature` -> `MinhashDedupBuckets` -> `MinhashDedupCluster` ->
`MinhashDedupFilter` -> its `JsonlWriter`, 5-grams and the same banding (14 buckets x 9 hashes), read and
written as JSONL.gz by its own reader and writer, `LocalPipelineExecutor` with one worker; twice: with
its default English word tokenizer (spaCy's) and with a `\w+` regex tokenizer like ours. What still
differs: datatrove clusters every band collision without checking it, ours verifies containment; its
text normalisation (`simplify_text`) is its own. Both run one task at a time; the figure is the CPU
seconds of all processes. datatrove is not a dependency of the project: give a Python that has it
(`python -m venv /tmp/dt && /tmp/dt/bin/pip install datatrove spacy`).

    python bench/minhash_vs_datatrove.py --datatrove-python /tmp/dt/bin/python [--parts 16]
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.recipe_scale import prepare  # noqa: E402
from bench.report import provenance, publish  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

DATATROVE = r"""
import sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

inputs, work, tasks, tokenizer = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=9)
read = lambda: JsonlReader(inputs, glob_pattern="*.jsonl.gz")
if tokenizer == "regex":
    import re
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Words(WordTokenizer):
        word = re.compile(r"\w+")

        def word_tokenize(self, text):
            return self.word.findall(text)

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [m.span() for m in self.word.finditer(text)]

    language = Words("en")
else:
    language = "en"
stages = [
    ([read(), MinhashDedupSignature(output_folder=f"{work}/signatures", config=config, language=language)], tasks),
    ([MinhashDedupBuckets(input_folder=f"{work}/signatures", output_folder=f"{work}/buckets", config=config)],
     config.num_buckets),
    ([MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove", config=config)], 1),
    ([read(), MinhashDedupFilter(input_folder=f"{work}/remove"), JsonlWriter(f"{work}/out")], tasks),
]
for n, (pipeline, count) in enumerate(stages):
    LocalPipelineExecutor(pipeline=pipeline, tasks=count, workers=1, logging_dir=f"{work}/logs/{n}").run()
"""


def cpu_of(command: list[str]) -> float:
    """CPU seconds of a command and its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{command[:3]} failed:\n{result.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datatrove-python", required=True)
    parser.add_argument("--parts", type=int, default=16)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / f"{datetime.date.today()}-minhash-vs-datatrove.md"
    )
    args = parser.parse_args()
    version = subprocess.run(
        [args.datatrove_python, "-c", "from importlib.metadata import version; print(version('datatrove'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="minhash-") as tmp:
        work = Path(tmp)
        config = prepare(work / "ours", args.parts, passes=("near",))
        files = work / "ours" / "out" / "cc" / "files"
        mb = sum(json.loads(p.read_text())["tally"]["bytes_in"] for p in files.glob("*.done.json")) / 1e6
        ours, loads = {}, [os.getloadavg()[0]]  # before ours, then before each datatrove run
        for stage in (
            "plan",
            "near-scan",
            "near-bucket",
            "near-greedy",
            "near-apply",
            "count",
            "write",
            "concat",
            "report",
        ):
            ours[stage] = cpu_of([sys.executable, "-m", "data_pipeline", "recipe", str(config), "--stage", stage])
        kept = json.loads((work / "ours" / "out" / "cc" / "report.json").read_text())
        theirs, out_docs = {}, {}
        for tokenizer in ("spacy", "regex"):
            loads.append(os.getloadavg()[0])
            folder = work / f"datatrove-{tokenizer}"
            theirs[tokenizer] = cpu_of(
                [args.datatrove_python, "-c", DATATROVE, str(files), str(folder), str(args.parts), tokenizer]
            )
            out_docs[tokenizer] = sum(1 for p in (folder / "out").glob("*.jsonl.gz") for _ in gzip.open(p, "rt"))
    near = sum(v for k, v in ours.items() if k.startswith("near"))
    total = near + sum(ours[k] for k in ("count", "write", "concat"))
    lines = ["# MinHash near dedup: ours against datatrove's, like for like, one core", ""]
    lines += [f"- {line}" for line in provenance(torch.device("cpu"), "n/a")]
    lines += [f"- datatrove {version}; {args.parts} parts, {mb:.0f} MB of text, {kept['docs_in']:,} documents"]
    lines += ["- both: 5-grams of words, LSH of 14 bands x 9 rows; output written as JSONL.gz by each"]
    load = ", ".join(f"{x:.2f}" for x in loads)
    lines += [f"- load average before ours, datatrove (spaCy), datatrove (regex): {load}", ""]
    lines += ["| pipeline | word tokenizer | CPU s | MB/s per core | documents kept |", "|---|---|---:|---:|---:|"]
    lines.append(
        f"| ours: near- scan, bucket, greedy, apply + count, write, concat | `\\w+` regex | {total:.1f} | "
        f"{mb / total:.2f} | {kept['docs_out']:,} |"
    )
    for tokenizer, name in (("spacy", "spaCy (datatrove's default for English)"), ("regex", "`\\w+` regex")):
        lines.append(
            f"| datatrove: signature, buckets, cluster, filter + JsonlWriter | {name} | {theirs[tokenizer]:.1f} | "
            f"{mb / theirs[tokenizer]:.2f} | {out_docs[tokenizer]:,} |"
        )
    lines += [
        "",
        f"Against datatrove with its default tokenizer ours is {theirs['spacy'] / total:.2f}x its speed per core; "
        f"with the same regex tokenizer {theirs['regex'] / total:.2f}x. Ours by stage (CPU s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in ours.items() if k != "plan" and k != "report"),
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
