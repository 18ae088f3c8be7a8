"""The raw-source recipe: raw dumps -> cleaned, filtered, deduplicated documents, per source.

`python -m data_pipeline recipe configs/recipe/llama1.yaml` runs it. A config lists the sources, each
with its kind (the module in this package that reads and cleans it), its raw inputs (files, folders
or globs) and its options. Two steps per source:

1. each input file alone (in parallel over `workers` processes): read, clean, filter, count ->
   `OUTPUT/<source>/files/<hash of the path>.jsonl.gz`, streamed, and a completion marker `.done.json`
   (the input's path, size and mtime (a folder: of every file in it), a hash of the kind and options,
   and its tally). A rerun skips an input whose marker matches, so a killed run resumes; changed
   options or inputs are redone, and inputs no longer listed are forgotten.
2. the whole source, inputs in order: the module's own pass when it has one (CommonCrawl's line
   dedup), exact dedup, near dedup when `near_dedup` is set (books: 0.9) -> `OUTPUT/<source>/
   <source>-NNNNN.jsonl.gz` shards of `shard_docs` documents and `report.json`, removed when the step
   starts and written last (a source without it is unfinished). A rerun whose inputs, options and
   dedup settings are unchanged finds the report and skips the step.

A damaged input (truncated or corrupt gzip/bz2/XML/archive) is reported by name in the report and the
rest is processed; with `strict` the run stops there. The outputs are JSONL documents in the data
contract's layout (`{"id", "text", "meta": {"source", ...}}`), which `python -m data_pipeline prepare`
tokenizes. Every document dropped is counted by reason, with its first three examples.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from omegaconf import MISSING

from data_pipeline.config import check_source_names
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
    try:
        options = module.Options(**dict(source.options))
        if hasattr(module, "check_options"):
            module.check_options(options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sources[{source.name}].options: {e}") from None
    return options


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
    return list(dict.fromkeys(p.resolve() for p in found))  # a file matched twice is read once


def validate_recipe(cfg: RecipeConfig) -> None:
    """Check what the types cannot; raise ConfigError naming the key."""
    check_source_names(cfg.sources)
    for s in cfg.sources:
        module_options(s)
        if s.near_dedup is not None and not 0 < s.near_dedup <= 1:
            raise ConfigError(f"sources[{s.name}].near_dedup must be in (0, 1], got {s.near_dedup}")
        if s.shard_docs <= 0:
            raise ConfigError(f"sources[{s.name}].shard_docs must be positive, got {s.shard_docs}")


def _fingerprint(source: RawSourceConfig, path: Path) -> dict:
    """What a finished input's marker must match to be reused: the input (a folder: every file in it,
    by name, size and mtime) and the settings that shape its documents (kind and options)."""
    if path.is_dir():
        listing = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime) for p in path.rglob("*"))
        content = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    else:
        stat = path.stat()
        content = f"{stat.st_size}:{stat.st_mtime}"
    settings = json.dumps({"kind": source.kind, "options": dict(source.options)}, sort_keys=True, default=str)
    return {"input": str(path), "content": content, "settings": hashlib.sha256(settings.encode()).hexdigest()}


def part_name(path: Path) -> str:
    """The name of an input's step-1 output and marker: a hash of its path (stable when inputs are added)."""
    return hashlib.sha256(str(path).encode()).hexdigest()[:20]


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


def process_file(source: RawSourceConfig, path: Path, out_dir: Path, strict: bool) -> dict:
    """Step 1 for one input: its cleaned documents and its marker; returns the marker."""
    name = part_name(path)
    marker, output = out_dir / f"{name}.done.json", out_dir / f"{name}.jsonl.gz"
    fingerprint = _fingerprint(source, path)
    if marker.is_file() and output.is_file():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in fingerprint} == fingerprint:
            if strict and done["tally"]["failed_files"]:
                raise DataError(f"{done['tally']['failed_files'][0]['error']} (strict: stopped)")
            return done
    module, options, tally = load_module(source.kind), module_options(source), Tally()
    start = time.process_time()
    tmp = output.with_name(output.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:  # documents go to disk as they come
        try:
            for doc in module.documents(path, options, tally):
                f.write(json.dumps(tally.keep(doc), ensure_ascii=False) + "\n")
        except CorruptInput as e:
            if strict:
                raise DataError(f"{e} (strict: stopped; without --strict it is reported, the rest processed)") from None
            tally.fail(str(path), str(e))
    tally.seconds = time.process_time() - start
    tally.input_bytes = sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    os.replace(tmp, output)
    done = {**fingerprint, "tally": tally.to_dict()}
    _write_text(marker, json.dumps(done, indent=1))
    return done


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _indexed_task(item: tuple[int, tuple]) -> tuple[int, dict]:
    return item[0], process_file(*item[1])


def finish_source(source: RawSourceConfig, inputs: list[Path], folder: Path, tally: Tally) -> Tally:
    """Step 2: the source-wide passes over step 1's outputs, in input order; the final shards."""
    files = folder / "files"
    (folder / "report.json").unlink(missing_ok=True)  # the source is finished when its report is back
    parts = [files / f"{part_name(p)}.jsonl.gz" for p in inputs]
    for stale in set(files.glob("*.jsonl.gz")) - set(parts):  # inputs no longer listed
        stale.unlink()
        stale.with_name(stale.name.replace(".jsonl.gz", ".done.json")).unlink(missing_ok=True)
    module, options = load_module(source.kind), module_options(source)
    dedup = Tally()  # step 2: its drops, the documents it writes and its time
    start = time.process_time()
    docs: Iterator[dict] = (doc for part in parts for doc in _read_jsonl_gz(part))
    if hasattr(module, "finalize"):
        docs = module.finalize(docs, options, dedup)
    if source.exact_dedup:
        docs = exact_dedup(docs, dedup)
    if source.near_dedup is not None:
        docs = near_dedup(docs, dedup, threshold=source.near_dedup)
    for old in folder.glob(f"{source.name}-*.jsonl.gz"):
        old.unlink()
    shard, count = [], 0
    for doc in docs:
        shard.append(dedup.keep(doc))
        if len(shard) == source.shard_docs:
            _write_jsonl_gz(folder / f"{source.name}-{count:05d}.jsonl.gz", shard)
            shard, count = [], count + 1
    if shard or count == 0:
        _write_jsonl_gz(folder / f"{source.name}-{count:05d}.jsonl.gz", shard)
    dedup.seconds = time.process_time() - start
    total = Tally().merge(tally)
    total.docs_out = total.bytes_out = 0  # the documents written are the ones step 2 kept
    return total.merge(dedup)


def run_recipe(cfg: RecipeConfig) -> dict[str, dict]:
    """Run every source; write and return the reports (by source name)."""
    validate_recipe(cfg)
    output = Path(cfg.output)
    inputs = {s.name: expand_inputs(s) for s in cfg.sources}
    tasks = []
    for s in cfg.sources:
        (output / s.name / "files").mkdir(parents=True, exist_ok=True)
        tasks += [(s, p, output / s.name / "files", cfg.strict) for p in inputs[s.name]]
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1 or len(tasks) == 1:
        results = [process_file(*t) for t in tasks]
    else:  # the first error (strict) ends the pool at once: leaving the block terminates the workers
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            done = dict(pool.imap_unordered(_indexed_task, enumerate(tasks)))
        results = [done[i] for i in range(len(tasks))]
    reports = {}
    for s in cfg.sources:
        tally = Tally()
        for task, result in zip(tasks, results):
            if task[0].name == s.name:
                tally.merge(Tally.from_dict(result["tally"]))
        parts = [(r["input"], r["content"], r["settings"]) for t, r in zip(tasks, results) if t[0].name == s.name]
        step2 = {"parts": parts, "exact": s.exact_dedup, "near": s.near_dedup, "shard_docs": s.shard_docs}
        key = hashlib.sha256(json.dumps(step2, sort_keys=True).encode()).hexdigest()
        previous = output / s.name / "report.json"
        if previous.is_file() and json.loads(previous.read_text()).get("step2") == key:
            reports[s.name] = json.loads(previous.read_text())  # finished before, on the same inputs and settings
            continue
        total = finish_source(s, inputs[s.name], output / s.name, tally)
        report = {"source": s.name, "kind": s.kind, "inputs": len(inputs[s.name]), **total.to_dict(), "step2": key}
        _write_text(previous, json.dumps(report, indent=1, ensure_ascii=False))
        reports[s.name] = report
    _write_text(output / "report.md", format_reports(reports))
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
