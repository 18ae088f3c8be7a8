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
rest is processed; with `strict` the run stops there. A remote read is tried again after a transient
error (HTTP 5xx or 429, a lost connection; `TRIES` in all, counted in the report); a URL that stays
unreadable (404, 403, ...) is reported with its HTTP status like a damaged input (a listing or URL the
driver expands: the same tries, then one ConfigError line). Step 1 prints, from inside its task, the
documents and bytes read so far every `LLAMA_PROGRESS_EVERY` seconds. Relative paths are
made absolute by the driver (`absolute_paths`), wherever the tasks run. The outputs are JSONL documents
in the data contract's layout (`{"id", "text", "meta": {"source", ...}}`), which
`python -m data_pipeline prepare OUTPUT/pipeline.yaml` tokenizes (the command writes that config and
names it last). Every document dropped is counted by reason, with its first three examples.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TypeVar

from omegaconf import MISSING

from data_pipeline.config import check_source_names
from data_pipeline.configfile import ConfigError
from data_pipeline.progress import ReadProgress
from data_pipeline.raw.bucketed import jsonl_gz
from data_pipeline.raw.common import CorruptInput, Tally, byte_range, split_ranges
from data_pipeline.shards import atomic_write_bytes
from data_pipeline.sources import DataError

CC_DATA = "https://data.commoncrawl.org/"
EXECUTORS = ("local", "ray", "slurm")
KINDS = ("commoncrawl", "wikipedia", "gutenberg", "arxiv", "github", "stackexchange")
FOLDER_INPUTS = ("github", "arxiv")  # kinds whose input may be a folder (a repository, a paper) read as one
RANGE_KINDS = ("github", "commoncrawl")  # kinds whose `documents` reads a byte range (JSONL lines, WARC records)
PATH_OPTIONS = ("bad_words_file", "quality_model", "tmp_dir")  # options of the kinds that name local files
TRIES = 5  # a remote read failing with a transient error is tried this many times in all
BACKOFF_S = 1.0  # seconds before the second try, doubled before each next one (1, 2, 4, 8)
PROGRESS_CHECK_DOCS = 100  # step 1 looks at the clock once per this many documents read (`ReadProgress`)
T = TypeVar("T")


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
    split_bytes: int = 1 << 30  # a JSONL or .warc.gz input over this is read as parts of it (github, cc); 0: never


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


def _absolute(entry: str, base: str) -> str:
    """A local path (or glob) made absolute against `base`; a URL as it is."""
    if is_url(entry):
        return entry
    return os.path.abspath(os.path.join(base, os.path.expanduser(entry.removeprefix("file://"))))


def absolute_paths(cfg: RecipeConfig, base: Optional[str] = None) -> RecipeConfig:
    """A copy of `cfg` whose output, local inputs and path options are absolute, against `base` (default:
    the directory this process runs in). The driver does this before any task is shipped: a Ray worker
    or a Slurm array task runs elsewhere, where a relative path names another folder."""
    base = base or os.getcwd()
    cfg = copy.deepcopy(cfg)
    cfg.output = _absolute(cfg.output, base)
    for source in cfg.sources:
        source.inputs = [_absolute(entry, base) for entry in source.inputs]
        for key in PATH_OPTIONS:
            if isinstance(source.options.get(key), str):
                source.options[key] = _absolute(source.options[key], base)
    return cfg


def install_hint(url: str, error: ImportError) -> str:
    """One line for fsspec's ImportError on `url`: the URL and the `pip install` its protocol needs."""
    from fsspec.registry import known_implementations

    protocol = url.split("://", 1)[0]
    missing = getattr(error.__cause__, "name", None) or getattr(error, "name", None)
    if not missing or missing == "fsspec":  # the protocol's own package, as fsspec's registry names it
        missing = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
    package = missing.replace("_", "-")
    return f"{url}: reading {protocol}:// URLs needs the package {package!r}: pip install {package}"


def remote_fs(url: str) -> tuple[Any, str]:
    """fsspec's filesystem of `url` and the path on it; a missing package is one line (`install_hint`)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise ConfigError(install_hint(url, e)) from None


def _driver_read(source: RawSourceConfig, url: str, read: Callable[[], T]) -> T:
    """`read()` of `url` while the driver expands the inputs (a listing, a URL's matches), tried again
    after a transient error as step 1's reads are (`_remote_read`); one that stays unreadable is one
    ConfigError line naming the URL and the HTTP status."""
    try:
        return _remote_read(url, read, Tally())
    except CorruptInput as e:
        raise ConfigError(f"sources[{source.name}].inputs: {e}") from None


def _listing(source: RawSourceConfig, entry: str) -> list[str]:
    """The URLs of a Common Crawl `*.paths.gz` listing (local or remote, read with retries), each line
    joined to the source's `paths_prefix`."""
    import fsspec

    try:
        opened = fsspec.open(entry, "rt", compression="infer", encoding="utf-8")
    except ImportError as e:
        raise ConfigError(install_hint(entry, e)) from None

    def read() -> list[str]:
        with opened as f:
            return [line.strip() for line in f if line.strip()]

    lines = _driver_read(source, entry, read)
    prefix = source.paths_prefix
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    return [line if "://" in line else prefix + line.lstrip("/") for line in lines]


def _expand_url(source: RawSourceConfig, entry: str) -> list[str]:
    """The files a URL input names (a glob's matches, a folder's files, or itself), each request tried
    again after a transient error (`_driver_read`)."""
    fs, path = remote_fs(entry)

    def exists() -> bool:  # fsspec's `exists` says False for any error, a transient one included
        try:
            fs.info(path)
        except FileNotFoundError as e:
            if _status(e) is not None:  # fsspec's HTTP `info` says a 503 as FileNotFoundError from it
                raise
            return False
        return True

    if glob.has_magic(path):
        matches = sorted(_driver_read(source, entry, lambda: fs.glob(path)))
    elif _driver_read(source, entry, lambda: fs.isdir(path)):
        if source.kind in FOLDER_INPUTS:
            raise ConfigError(
                f"sources[{source.name}].inputs: {entry}: a folder input of kind {source.kind} must be local"
            )
        matches = sorted(_driver_read(source, entry, lambda: fs.find(path)))
    else:
        matches = [path] if _driver_read(source, entry, exists) else []
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
            found += _listing(source, entry)
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
                found += split_ranges(match.resolve(), source.split_bytes if source.kind in RANGE_KINDS else 0)
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
        if s.split_bytes < 0:
            raise ConfigError(f"sources[{s.name}].split_bytes must be >= 0, got {s.split_bytes}")
        if s.shard_docs <= 0:
            raise ConfigError(f"sources[{s.name}].shard_docs must be positive, got {s.shard_docs}")
        if s.dedup_buckets is not None and s.dedup_buckets < 1:
            raise ConfigError(f"sources[{s.name}].dedup_buckets must be >= 1, got {s.dedup_buckets}")


def _settings(source: RawSourceConfig) -> str:
    """A hash of what shapes an input's documents: the kind and its options."""
    settings = json.dumps({"kind": source.kind, "options": dict(source.options)}, sort_keys=True, default=str)
    return hashlib.sha256(settings.encode()).hexdigest()


def _fingerprint(source: RawSourceConfig, entry: str, tally: Tally) -> dict:
    """What a finished input's marker must match to be reused: the input (a folder: every file in it,
    by name, size and mtime; a URL: its size and ETag or modification time) and the settings that shape
    its documents (kind and options). A URL that cannot be read raises `CorruptInput` (`_remote_read`)."""
    if is_url(entry):
        fs, path = remote_fs(entry)
        info = _remote_read(entry, lambda: fs.info(path), tally)
        stamp = next(
            (info[k] for k in ("ETag", "etag", "LastModified", "last_modified", "mtime", "created") if info.get(k)), ""
        )
        content = f"{info.get('size')}:{stamp}"
    elif Path(entry).is_dir():
        path = Path(entry)
        listing = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime) for p in path.rglob("*"))
        content = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    else:
        file, lines = byte_range(entry)
        stat = Path(file).stat()
        content = f"{stat.st_size}:{stat.st_mtime}" + (f":{lines[0]}-{lines[1]}" if lines else "")
    return {"input": entry, "content": content, "settings": _settings(source)}


def _status(error: BaseException) -> Optional[int]:
    """The HTTP status behind a remote read's error (fsspec wraps it: look down the chain), if any."""
    seen: Optional[BaseException] = error
    while seen is not None:
        status = getattr(seen, "status", None)
        if isinstance(status, int):
            return status
        seen = seen.__cause__ or seen.__context__
    return None


def _transient(error: BaseException) -> bool:
    """Whether a remote read may succeed when tried again: HTTP 5xx or 429, a reset or lost connection."""
    status = _status(error)
    if status is not None:
        return status >= 500 or status == 429
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    aiohttp = sys.modules.get("aiohttp")  # fsspec's HTTP client, when an http(s) URL was opened
    return aiohttp is not None and isinstance(error, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError))


def with_retries(read: Callable[[], T], tally: Tally) -> T:
    """`read()`, tried again after a transient error (`_transient`) up to `TRIES` times in all, waiting
    `BACKOFF_S` doubled each time; each new try is counted in `tally.retries`."""
    for attempt in range(TRIES):
        try:
            return read()
        except Exception as e:
            if attempt == TRIES - 1 or not _transient(e):
                raise
            tally.retries += 1
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def _remote_read(url: str, read: Callable[[], T], tally: Tally) -> T:
    """`read()` of the remote input `url` with retries (`with_retries`); when it stays unreadable (missing,
    forbidden, still failing), a `CorruptInput` naming the URL and the HTTP status (`remote_failure`)."""
    try:
        return with_retries(read, tally)
    except Exception as e:
        if _status(e) is None and not isinstance(e, (OSError, TimeoutError)) and not _transient(e):
            raise  # not a failed read: a bug, shown whole
        raise CorruptInput(remote_failure(url, e)) from None


def remote_failure(url: str, error: BaseException) -> str:
    """Why a remote input could not be read, in one line naming the URL and the HTTP status."""
    status = _status(error)
    if status is None and isinstance(error, FileNotFoundError) and url.startswith(("http://", "https://")):
        status = 404  # fsspec's HTTP filesystem says 404 as FileNotFoundError(url)
    if status is not None:
        reason = {404: "not found", 403: "forbidden", 401: "unauthorized"}.get(status) or (
            "server error" if status >= 500 else "refused"
        )
        why = f"HTTP {status} ({reason})"
    else:
        why = f"{type(error).__name__}: {error}" if str(error) != url else type(error).__name__
    tried = f" after {TRIES} tries" if _transient(error) else ""
    return f"{url}: unreadable, {why}{tried}"


def part_name(path: str | Path) -> str:
    """The name of an input's step-1 output and marker: a hash of its path (stable when inputs are added)."""
    return hashlib.sha256(str(path).encode()).hexdigest()[:20]


def _local_copy(url: str, folder: Path, tally: Tally) -> Path:
    """A remote input copied to `folder/<its parent folder's name>/<its name>` (readers look at both),
    through `_remote_read`."""
    fs, path = remote_fs(url)
    parts = path.rstrip("/").split("/")
    local = folder / (parts[-2] if len(parts) > 1 else "input") / parts[-1]
    local.parent.mkdir(parents=True, exist_ok=True)

    def copy() -> None:
        with fs.open(path, "rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    _remote_read(url, copy, tally)
    return local


class _ReadTally(Tally):
    """Step 1's Tally: it also shows the progress of the read (`ReadProgress`) as the kind's reader
    counts each document it reads (`Tally.read`), from inside the task."""

    progress: Optional[ReadProgress] = None

    def read(self, text: str) -> None:
        super().read(text)
        if self.progress is not None:
            self.progress.read(self.docs_in, self.bytes_in)


def process_file(source: RawSourceConfig, entry: str, out_dir: Path, strict: bool) -> dict:
    """Step 1 for one input (a local path or a URL): its cleaned documents and its marker; returns the marker.
    A URL that cannot be read (missing, forbidden, or failing after `TRIES` tries) is reported like a
    damaged file, with its HTTP status; `strict` stops there. Every `LLAMA_PROGRESS_EVERY` seconds of
    reading it prints a line of the documents and bytes read so far (`ReadProgress`)."""
    name = part_name(entry)
    marker, output = out_dir / f"{name}.done.json", out_dir / f"{name}.jsonl.gz"
    tally = _ReadTally()
    try:
        fingerprint, unreadable = _fingerprint(source, entry, tally), None
    except CorruptInput as e:  # a URL that cannot be read: its marker is reused while it stays so
        fingerprint, unreadable = {"input": entry, "content": "unreadable", "settings": _settings(source)}, e
    if marker.is_file() and output.is_file():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in fingerprint} == fingerprint:
            if strict and done["tally"]["failed_files"]:
                raise DataError(f"{done['tally']['failed_files'][0]['error']} (strict: stopped)")
            return done
    module, options = load_module(source.kind), module_options(source)
    start = time.process_time()
    with ExitStack() as stack:
        file, lines = byte_range(entry)  # a part of a huge input: its byte range
        path = Path(file)
        with jsonl_gz(output) as write:  # documents go to disk as they come; removed if this stops
            try:
                if unreadable is not None:
                    raise unreadable
                if is_url(entry):  # copied to local disk first: archives and XML readers seek
                    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recipe-")))
                    path = _local_copy(entry, folder, tally)
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                tally.input_bytes = lines[1] - lines[0] if lines else sum(p.stat().st_size for p in files)
                if tally.input_bytes == 0:
                    raise CorruptInput(f"{entry}: empty input (0 bytes)")
                tally.progress = ReadProgress(f"recipe {source.name}: {entry}", check=PROGRESS_CHECK_DOCS)
                read = (
                    module.documents(path, options, tally, lines) if lines else module.documents(path, options, tally)
                )
                for doc in read:
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


def write_pipeline_config(cfg: RecipeConfig) -> Path:
    """`OUTPUT/pipeline.yaml`: a pipeline config (as in configs/pipeline/) whose sources are the recipe's
    output shards, so `python -m data_pipeline prepare OUTPUT/pipeline.yaml` trains a tokenizer on them
    and tokenizes them (beside OUTPUT: `<OUTPUT>-tokenizer/`, `<OUTPUT>-tokens/`). Returns its path."""
    from omegaconf import OmegaConf

    output = Path(cfg.output)
    pipeline = {
        "sources": [{"name": s.name, "files": [str(output / s.name / f"{s.name}-*.jsonl.gz")]} for s in cfg.sources],
        "tokenizer": {"path": str(output.parent / f"{output.name}-tokenizer" / "tokenizer.model")},
        "tokenize": {"output": str(output.parent / f"{output.name}-tokens")},
    }
    header = (
        "# Written by `python -m data_pipeline recipe`: its output as a pipeline config. Edit tokenizer.vocab_size\n"
        "# (default LLaMA's 32000; a corpus of a few MB needs fewer, e.g. 4096) or the paths as you like.\n"
    )
    path = output / "pipeline.yaml"
    output.mkdir(parents=True, exist_ok=True)  # under Slurm, before any task has run
    atomic_write_bytes(path, (header + OmegaConf.to_yaml(OmegaConf.create(pipeline))).encode("utf-8"))
    return path


def next_steps(cfg: RecipeConfig, pipeline: Path) -> str:
    """The recipe's last lines: where its documents are and the command that tokenizes them."""
    return (
        f"cleaned documents: {cfg.output}/<source>/<source>-NNNNN.jsonl.gz (report: {Path(cfg.output) / 'report.md'})\n"
        f"tokenize them: python -m data_pipeline prepare {pipeline}\n"
    )


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
        if r.get("retries"):
            lines.append(f"- remote reads tried again after a transient error: {r['retries']:,}")
        for empty in r.get("empty_files", []):
            lines.append(f"- empty input (no documents in it): {empty}")
        for reason, n in sorted(r["dropped"].items(), key=lambda kv: -kv[1]):
            lines.append(f"- dropped `{reason}`: {n:,}")
            lines += [f"    - {example}" for example in r["examples"].get(reason, [])]
        if not r["dropped"] and not r["failed_files"] and not r.get("empty_files"):
            lines.append("- nothing dropped")
    return "\n".join(lines) + "\n"
