"""The raw-source recipe: raw dumps -> cleaned, filtered, deduplicated documents, per source.

`python -m data_pipeline recipe configs/recipe/llama1.yaml` runs it. A config lists the sources, each
with its kind (the module in this package that reads and cleans it), its raw inputs (files, folders
or globs) and its options. Two steps per source:

1. each input file alone (in parallel over `workers` processes): read, clean, filter, count ->
   `OUTPUT/<source>/files/NNNNN.jsonl.gz` and a completion marker `NNNNN.done.json` (the input's name,
   size and mtime, and its tally). A rerun skips a file whose marker matches, so a killed run resumes.
2. the whole source, inputs in order: the module's own pass when it has one (CommonCrawl's line
   dedup), exact dedup, near dedup when `near_dedup` is set (books: 0.9) -> `OUTPUT/<source>/
   <source>-NNNNN.jsonl.gz` shards of `shard_docs` documents and `report.json`, written last.

A damaged input (truncated or corrupt gzip/bz2/XML/archive) is reported by name in the report and the
rest is processed; with `strict` the run stops there. The outputs are JSONL documents in the data
contract's layout (`{"id", "text", "meta": {"source", ...}}`), which `python -m data_pipeline prepare`
tokenizes. Every document dropped is counted by reason, with its first three examples.
"""

from __future__ import annotations

import glob
import gzip
import importlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from omegaconf import MISSING

from data_pipeline.raw.common import CorruptInput, Tally
from data_pipeline.raw.dedup import exact_dedup, near_dedup
from data_pipeline.sources import DataError
from pretrain.config import ConfigError

KINDS = ("commoncrawl", "wikipedia", "gutenberg", "arxiv", "github", "stackexchange")
FOLDER_INPUTS = ("github", "arxiv")  # kinds whose input may be a folder (a repository, a paper) read as one


@dataclass
class RawSourceConfig:
    """One source of the recipe."""

    name: str = MISSING
    kind: str = MISSING  # one of KINDS
    inputs: List[str] = field(default_factory=list)  # files, folders (their files) or globs
    options: Dict[str, Any] = field(default_factory=dict)  # the kind's `Options`
    exact_dedup: bool = True
    near_dedup: Optional[float] = None  # MinHash Jaccard threshold, e.g. 0.9 for books; None: off
    shard_docs: int = 100_000  # documents per output file


@dataclass
class RecipeConfig:
    """Raw sources -> cleaned documents."""

    output: str = "data/clean"
    workers: int = 1  # processes over input files; 0: one per CPU core
    strict: bool = False  # stop at the first damaged input instead of reporting it
    sources: List[RawSourceConfig] = field(default_factory=list)


def load_module(kind: str):
    """The module that reads and cleans sources of `kind`."""
    if kind not in KINDS:
        raise ConfigError(f"sources.kind={kind!r}: choose from {', '.join(KINDS)}")
    return importlib.import_module(f"data_pipeline.raw.{kind}")


def module_options(source: RawSourceConfig):
    """The kind's `Options` from the config's `options` (an unknown key is named)."""
    module = load_module(source.kind)
    known = {f.name for f in fields(module.Options)}
    unknown = sorted(set(source.options) - known)
    if unknown:
        raise ConfigError(
            f"sources[{source.name}].options: unknown {unknown} for kind {source.kind} (known: {sorted(known)})"
        )
    return module.Options(**dict(source.options))


def expand_inputs(source: RawSourceConfig) -> list[Path]:
    """The source's input files in a stable order (globs and folders expanded)."""
    found: list[Path] = []
    for entry in source.inputs:
        matches = sorted(glob.glob(entry, recursive=True)) if glob.has_magic(entry) else [entry]
        if not matches or not Path(matches[0]).exists():
            raise ConfigError(f"sources[{source.name}].inputs: {entry} matches nothing")
        for match in map(Path, matches):
            if match.is_dir() and source.kind not in FOLDER_INPUTS:
                found += sorted(p for p in match.rglob("*") if p.is_file())
            else:
                found.append(match)
    if not found:
        raise ConfigError(f"sources[{source.name}].inputs: no input files")
    return found


def validate_recipe(cfg: RecipeConfig) -> None:
    """Check what the types cannot; raise ConfigError naming the key."""
    if not cfg.sources:
        raise ConfigError("sources: at least one source is needed")
    names = [s.name for s in cfg.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"sources: names must be unique, got {names}")
    for s in cfg.sources:
        module_options(s)
        if s.near_dedup is not None and not 0 < s.near_dedup <= 1:
            raise ConfigError(f"sources[{s.name}].near_dedup must be in (0, 1], got {s.near_dedup}")
        if s.shard_docs <= 0:
            raise ConfigError(f"sources[{s.name}].shard_docs must be positive, got {s.shard_docs}")


def _fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"input": str(path), "size": stat.st_size if path.is_file() else None, "mtime": stat.st_mtime}


def _write_jsonl_gz(path: Path, docs) -> None:
    """Write documents atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_jsonl_gz(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def process_file(source: RawSourceConfig, index: int, path: Path, out_dir: Path, strict: bool) -> dict:
    """Step 1 for one input: its cleaned documents and its marker; returns the marker."""
    marker = out_dir / f"{index:05d}.done.json"
    fingerprint = _fingerprint(path)
    if marker.is_file():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in fingerprint} == fingerprint:
            return done
    module, options, tally = load_module(source.kind), module_options(source), Tally()
    start = time.process_time()
    kept: list[dict] = []
    try:
        for doc in module.documents(path, options, tally):
            kept.append(tally.keep(doc))
    except CorruptInput as e:
        if strict:
            raise DataError(f"{e} (strict: stopped; without --strict it is reported and the rest processed)") from None
        tally.fail(str(path), str(e))
    tally.seconds = time.process_time() - start
    tally.input_bytes = sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    _write_jsonl_gz(out_dir / f"{index:05d}.jsonl.gz", kept)
    done = {**fingerprint, "tally": tally.to_dict()}
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(done, indent=1))
    os.replace(tmp, marker)
    return done


def _process_task(task: tuple) -> dict:
    return process_file(*task)


def finish_source(source: RawSourceConfig, n_inputs: int, folder: Path, tally: Tally) -> Tally:
    """Step 2: the source-wide passes over step 1's outputs, in input order; the final shards."""
    files = folder / "files"
    module, options = load_module(source.kind), module_options(source)
    dedup = Tally()
    start = time.process_time()
    docs: Iterator[dict] = (doc for i in range(n_inputs) for doc in _read_jsonl_gz(files / f"{i:05d}.jsonl.gz"))
    if hasattr(module, "finalize"):
        docs = module.finalize(docs, options, dedup)
    if source.exact_dedup:
        docs = exact_dedup(docs, dedup)
    if source.near_dedup is not None:
        docs = near_dedup(docs, dedup, threshold=source.near_dedup)
    for old in folder.glob(f"{source.name}-*.jsonl.gz"):
        old.unlink()
    shard, count, n_out, bytes_out = [], 0, 0, 0
    for doc in docs:
        shard.append(doc)
        n_out, bytes_out = n_out + 1, bytes_out + len(doc["text"].encode("utf-8"))
        if len(shard) == source.shard_docs:
            _write_jsonl_gz(folder / f"{source.name}-{count:05d}.jsonl.gz", shard)
            shard, count = [], count + 1
    if shard or count == 0:
        _write_jsonl_gz(folder / f"{source.name}-{count:05d}.jsonl.gz", shard)
    total = Tally().merge(tally)
    for reason, n in dedup.dropped.items():  # drops of the source-wide passes
        total.dropped[reason] = total.dropped.get(reason, 0) + n
        total.examples[reason] = dedup.examples[reason]
    total.docs_out, total.bytes_out = n_out, bytes_out
    total.seconds += time.process_time() - start
    return total


def run_recipe(cfg: RecipeConfig) -> dict[str, dict]:
    """Run every source; write and return the reports (by source name)."""
    validate_recipe(cfg)
    output = Path(cfg.output)
    inputs = {s.name: expand_inputs(s) for s in cfg.sources}
    tasks = []
    for s in cfg.sources:
        (output / s.name / "files").mkdir(parents=True, exist_ok=True)
        tasks += [(s, i, p, output / s.name / "files", cfg.strict) for i, p in enumerate(inputs[s.name])]
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1 or len(tasks) == 1:
        results = [_process_task(t) for t in tasks]
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            results = pool.map(_process_task, tasks, chunksize=1)
    reports = {}
    for s in cfg.sources:
        tally = Tally()
        for task, result in zip(tasks, results):
            if task[0].name == s.name:
                tally.merge(Tally.from_dict(result["tally"]))
        total = finish_source(s, len(inputs[s.name]), output / s.name, tally)
        report = {"source": s.name, "kind": s.kind, "inputs": len(inputs[s.name]), **total.to_dict()}
        tmp = output / s.name / "report.json.tmp"
        tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False))
        os.replace(tmp, output / s.name / "report.json")
        reports[s.name] = report
    (output / "report.md").write_text(format_reports(reports))
    return reports


def format_reports(reports: dict[str, dict]) -> str:
    """The reports as a Markdown table and, per source, drops by reason with examples."""
    lines = [
        "| source | inputs | failed | docs in | docs out | MB in | MB out | core-s | docs/s/core | MB/s/core |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in reports.items():
        seconds = max(r["seconds"], 1e-9)
        lines.append(
            f"| {name} | {r['inputs']} | {len(r['failed_files'])} | {r['docs_in']:,} | {r['docs_out']:,} | "
            f"{r['input_bytes'] / 1e6:,.2f} | {r['bytes_out'] / 1e6:,.2f} | {r['seconds']:.1f} | "
            f"{r['docs_in'] / seconds:,.0f} | {r['input_bytes'] / 1e6 / seconds:,.2f} |"
        )
    for name, r in reports.items():
        lines += ["", f"## {name}", ""]
        for failed in r["failed_files"]:
            lines.append(f"- damaged input: {failed['error']}")
        for reason, n in sorted(r["dropped"].items(), key=lambda kv: -kv[1]):
            lines.append(f"- dropped `{reason}`: {n:,}")
            lines += [f"    - {example}" for example in r["examples"].get(reason, [])]
        if not r["dropped"] and not r["failed_files"]:
            lines.append("- nothing dropped")
    return "\n".join(lines) + "\n"
