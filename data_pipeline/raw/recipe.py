"""The raw-source recipe: raw dumps -> cleaned, filtered, deduplicated documents, per source.

`python -m data_pipeline recipe configs/recipe/llama1.yaml` runs it. A config lists the sources, each
with its kind (the module in this package that reads and cleans it), its raw inputs (files, folders
or globs) and its options. Two steps per source:

1. each input file alone (a task per file): read, clean, filter, count -> `OUTPUT/<source>/files/<hash
   of the path>.jsonl.gz`, streamed, and a completion marker `.done.json` (the input's path, size and
   mtime (a folder: of every file in it; a URL: size and ETag), a hash of the kind and options, and its
   tally). A rerun skips an input whose marker matches, so a killed run resumes; changed options or
   inputs are redone, and inputs no longer listed are forgotten.
2. the whole source, inputs in order: CommonCrawl's line dedup, exact dedup, near dedup when
   `near_dedup` is set (books: 0.9), each split into hash buckets on disk (`bucketed.py`), then
   `OUTPUT/<source>/<source>-NNNNN.jsonl.gz` shards of `shard_docs` documents and `report.json`,
   removed when the step starts and written last (a source without it is unfinished). A rerun whose
   inputs, options and dedup settings are unchanged finds the report and skips the step.

Both steps are stages of independent tasks (`stages.py`) that an executor runs (`executors.py`,
`runner.py`): a local process pool (`workers`), Ray tasks (`executor=ray`), or Slurm job arrays
(`executor=slurm`, `slurm.py`); the output bytes are the same under each. Inputs are local paths, globs, folders, fsspec
URLs (s3://, https://, hf://) or Common Crawl `*.paths.gz` listings.

A damaged input (truncated or corrupt gzip/bz2/XML/archive) is reported by name in the report and the
rest is processed; with `strict` the run stops there. The outputs are JSONL documents in the data
contract's layout (`{"id", "text", "meta": {"source", ...}}`), which `python -m data_pipeline prepare`
tokenizes. Every document dropped is counted by reason, with its first three examples.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from data_pipeline.config import check_source_names
from data_pipeline.configfile import ConfigError
from data_pipeline.raw.bucketed import jsonl_gz
from data_pipeline.raw.common import CorruptInput, Tally
from data_pipeline.shards import atomic_write_bytes
from data_pipeline.sources import DataError

CC_DATA = "https://data.commoncrawl.org/"
EXECUTORS = ("local", "ray", "slurm")
KINDS = ("commoncrawl", "wikipedia", "gutenberg", "arxiv", "github", "stackexchange")
FOLDER_INPUTS = ("github", "arxiv")  # kinds whose input may be a folder (a repository, a paper) read as one


@dataclass
class RawSourceConfig:
    """One source of the recipe."""

    name: str = MISSING
    kind: str = MISSING  # one of KINDS
    inputs: List[str] = field(default_factory=list)  # files, folders, globs, URLs (s3://, https://, hf://) or listings
    options: Dict[str, Any] = field(default_factory=dict)  # the kind's `Options`
    exact_dedup: bool = True
    near_dedup: Optional[float] = None  # MinHash Jaccard threshold, e.g. 0.9 for books; None: off
    shard_docs: int = 100_000  # documents per output file
    dedup_buckets: Optional[int] = None  # hash buckets of the dedup passes (None: the recipe's dedup_buckets)
    paths_prefix: str = CC_DATA  # what the lines of a `*.paths.gz` listing are relative to


@dataclass
class RecipeConfig:
    """Raw sources -> cleaned documents."""

    output: str = "data/clean"
    workers: int = 1  # processes over tasks on this machine (a Slurm array task's CPUs); 0: one per CPU core
    strict: bool = False  # stop at the first damaged input instead of reporting it
    executor: str = "local"  # local (a process pool) | ray (tasks on a Ray cluster) | slurm (job arrays)
    ray_address: Optional[str] = None  # executor=ray: e.g. "auto" or "ray://head:10001"; None: a local Ray
    machines: int = 1  # executor=slurm: array tasks per stage
    dedup_buckets: int = 16  # each dedup pass is split into this many hash buckets (memory per task ~ 1/B)
    keep_work: bool = False  # keep OUTPUT/<source>/work/ (the dedup passes' files and markers) at the end
    sources: List[RawSourceConfig] = field(default_factory=list)


def load_module(kind: str):
    """The module that reads and cleans sources of `kind`."""
    if kind not in KINDS:
        raise ConfigError(f"sources.kind={kind!r}: choose from {', '.join(KINDS)}")
    try:
        return importlib.import_module(f"data_pipeline.raw.{kind}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("data_pipeline"):
            raise
        raise ConfigError(f"sources.kind={kind} needs the package {e.name!r}: pip install -e '.[raw]'") from None


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


def is_url(entry: str) -> bool:
    """Whether an input is a URL that fsspec opens (s3://, https://, hf://, memory://, ...), not a local path."""
    return "://" in entry and not entry.startswith("file://")


def _listing(entry: str, prefix: str) -> list[str]:
    """The URLs of a Common Crawl `*.paths.gz` listing (local or remote), each line joined to `prefix`."""
    import fsspec

    with fsspec.open(entry, "rt", compression="infer", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    return [line if "://" in line else prefix + line.lstrip("/") for line in lines]


def _expand_url(source: RawSourceConfig, entry: str) -> list[str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(entry)
    if glob.has_magic(path):
        matches = sorted(fs.glob(path))
    elif fs.isdir(path):
        if source.kind in FOLDER_INPUTS:
            raise ConfigError(
                f"sources[{source.name}].inputs: {entry}: a folder input of kind {source.kind} must be local"
            )
        matches = sorted(fs.find(path))
    else:
        matches = [path] if fs.exists(path) else []
    if not matches:
        raise ConfigError(f"sources[{source.name}].inputs: {entry} matches nothing")
    return [fs.unstrip_protocol(m) for m in matches]


def expand_inputs(source: RawSourceConfig) -> list[str]:
    """The source's inputs in a stable order: local paths (resolved; globs and folders expanded), URLs, and
    the URLs listed by `*.paths.gz` files (Common Crawl's warc.paths.gz / wet.paths.gz)."""
    found: list[str] = []
    for entry in source.inputs:
        entry = entry.removeprefix("file://")
        if entry.endswith(".paths.gz") or entry.endswith(".paths"):
            found += _listing(entry, source.paths_prefix)
            continue
        if is_url(entry):
            found += _expand_url(source, entry)
            continue
        matches = sorted(glob.glob(entry, recursive=True)) if glob.has_magic(entry) else [entry]
        if not matches or not Path(matches[0]).exists():
            raise ConfigError(f"sources[{source.name}].inputs: {entry} matches nothing")
        for match in map(Path, matches):
            if match.is_dir() and source.kind not in FOLDER_INPUTS:
                found += [str(p.resolve()) for p in sorted(match.rglob("*")) if p.is_file()]
            else:
                found.append(str(match.resolve()))
    if not found:
        raise ConfigError(f"sources[{source.name}].inputs: no input files")
    return list(dict.fromkeys(found))  # a file matched twice is read once


def validate_recipe(cfg: RecipeConfig) -> None:
    """Check what the types cannot; raise ConfigError naming the key."""
    check_source_names(cfg.sources)
    if cfg.executor not in EXECUTORS:
        raise ConfigError(f"executor={cfg.executor!r}: choose from {', '.join(EXECUTORS)}")
    for key in ("machines", "dedup_buckets"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    for s in cfg.sources:
        module_options(s)
        if s.near_dedup is not None and not 0 < s.near_dedup <= 1:
            raise ConfigError(f"sources[{s.name}].near_dedup must be in (0, 1], got {s.near_dedup}")
        if s.shard_docs <= 0:
            raise ConfigError(f"sources[{s.name}].shard_docs must be positive, got {s.shard_docs}")
        if s.dedup_buckets is not None and s.dedup_buckets < 1:
            raise ConfigError(f"sources[{s.name}].dedup_buckets must be >= 1, got {s.dedup_buckets}")


def _fingerprint(source: RawSourceConfig, entry: str) -> dict:
    """What a finished input's marker must match to be reused: the input (a folder: every file in it,
    by name, size and mtime; a URL: its size and ETag or modification time) and the settings that shape
    its documents (kind and options)."""
    if is_url(entry):
        import fsspec

        fs, path = fsspec.core.url_to_fs(entry)
        info = fs.info(path)
        stamp = next(
            (info[k] for k in ("ETag", "etag", "LastModified", "last_modified", "mtime", "created") if info.get(k)), ""
        )
        content = f"{info.get('size')}:{stamp}"
    elif Path(entry).is_dir():
        path = Path(entry)
        listing = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime) for p in path.rglob("*"))
        content = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    else:
        stat = Path(entry).stat()
        content = f"{stat.st_size}:{stat.st_mtime}"
    settings = json.dumps({"kind": source.kind, "options": dict(source.options)}, sort_keys=True, default=str)
    return {"input": entry, "content": content, "settings": hashlib.sha256(settings.encode()).hexdigest()}


def part_name(path: str | Path) -> str:
    """The name of an input's step-1 output and marker: a hash of its path (stable when inputs are added)."""
    return hashlib.sha256(str(path).encode()).hexdigest()[:20]


def _local_copy(url: str, folder: Path) -> Path:
    """A remote input copied to `folder/<its parent folder's name>/<its name>` (readers look at both)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    parts = path.rstrip("/").split("/")
    local = folder / (parts[-2] if len(parts) > 1 else "input") / parts[-1]
    local.parent.mkdir(parents=True, exist_ok=True)
    with fs.open(path, "rb") as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return local


def process_file(source: RawSourceConfig, entry: str, out_dir: Path, strict: bool) -> dict:
    """Step 1 for one input (a local path or a URL): its cleaned documents and its marker; returns the marker."""
    name = part_name(entry)
    marker, output = out_dir / f"{name}.done.json", out_dir / f"{name}.jsonl.gz"
    fingerprint = _fingerprint(source, entry)
    if marker.is_file() and output.is_file():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in fingerprint} == fingerprint:
            if strict and done["tally"]["failed_files"]:
                raise DataError(f"{done['tally']['failed_files'][0]['error']} (strict: stopped)")
            return done
    module, options, tally = load_module(source.kind), module_options(source), Tally()
    start = time.process_time()
    with ExitStack() as stack:
        path = Path(entry)
        if is_url(entry):  # copied to local disk first: archives and XML readers seek
            path = _local_copy(entry, Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recipe-"))))
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        tally.input_bytes = sum(p.stat().st_size for p in files)
        with jsonl_gz(output) as write:  # documents go to disk as they come; removed if this stops
            try:
                if tally.input_bytes == 0:
                    raise CorruptInput(f"{entry}: empty input (0 bytes)")
                for doc in module.documents(path, options, tally):
                    write(tally.keep(doc))
            except CorruptInput as e:
                message = str(e).replace(str(path), entry)  # a URL's error names the URL, not the local copy
                if strict:
                    raise DataError(
                        f"{message} (strict: stopped; without --strict it is reported, the rest processed)"
                    ) from None
                tally.fail(entry, message)
        if tally.docs_in == 0 and not tally.failed_files:
            tally.empty(entry)
    tally.seconds = time.process_time() - start
    done = {**fingerprint, "tally": tally.to_dict()}
    write_json(marker, done)
    return done


def write_json(path: Path, value: Any) -> None:
    """A JSON file, put in place whole."""
    atomic_write_bytes(path, json.dumps(value, indent=1, ensure_ascii=False).encode("utf-8"))


def read_json(path: Path) -> Optional[Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def file_task(cfg: RecipeConfig, name: str, entry: str) -> dict:
    """The `files` stage's task: step 1 for one input of source `name`."""
    source = next(s for s in cfg.sources if s.name == name)
    out_dir = Path(cfg.output) / name / "files"
    out_dir.mkdir(parents=True, exist_ok=True)
    done = process_file(source, entry, out_dir, cfg.strict)
    return {"docs": done["tally"]["docs_in"], "bytes": done["tally"]["input_bytes"]}


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
        for empty in r.get("empty_files", []):
            lines.append(f"- empty input (no documents in it): {empty}")
        for reason, n in sorted(r["dropped"].items(), key=lambda kv: -kv[1]):
            lines.append(f"- dropped `{reason}`: {n:,}")
            lines += [f"    - {example}" for example in r["examples"].get(reason, [])]
        if not r["dropped"] and not r["failed_files"] and not r.get("empty_files"):
            lines.append("- nothing dropped")
    return "\n".join(lines) + "\n"
