"""The recipe as stages of independent tasks, the same under every executor (see `executors.py`).

Stage after stage, each a list of tasks that may run in any order, anywhere, twice, or be killed:

| stage | one task per | what it writes under `OUTPUT/<source>/` |
|---|---|---|
| `files` | input file | `files/<part>.jsonl.gz` and its marker (step 1, `recipe.process_file`) |
| `plan` | source | `work/plan.json`: the parts in input order, their document counts, the step-2 key |
| `<pass>-scan` | part | `work/<pass>/scan/<part>.rec`: its keys by bucket, indexed (ids, signatures) |
| `<pass>-bucket` | bucket group | `work/<pass>/bucket/<t>.bin`: the losers of its buckets (`bucket_tasks`) |
| `near-greedy` | source | `work/near/dropped.bin`: the near duplicates, decided in input order |
| `<pass>-apply` | part | `work/<pass>/out/<part>.jsonl.gz`: the part without its losers, and its drops |
| `count` | source | `work/counts.json`: documents kept per part, so each part knows where its documents go |
| `write` | part | `work/write/<shard>-<part>.gz`: the part's documents, cut at output shard boundaries |
| `concat` | output shard | `<source>-NNNNN.jsonl.gz`: its pieces joined (gzip members, nothing recompressed) |
| `report` | (one) | `report.json` per source, `OUTPUT/report.md`; `work/` removed |

The passes are `line` (CommonCrawl's `finalize`: CCNet line dedup), `exact` and `near`
(`bucketed.py`), in that order, for the sources that have them. Every task's output is written under
a temporary name of its own and renamed (two live copies of a task write the same bytes; the last rename
wins), then a marker `<output>.done.json` holding the step-2 key is written last and fsynced: it is the
commit point, so the files between stages are not fsynced themselves, and a pass leaves a few files per
part and per bucket task, never one per part and bucket. A task whose marker holds the current key is
done and is skipped, so a rerun after a kill or a requeue redoes only the tasks that had not finished.
The key hashes the step-1 markers of the source's inputs and its dedup settings, so other inputs or
settings redo step 2 (and only step 2). A source whose `report.json` holds the current key is finished:
its stages have no tasks.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from data_pipeline.raw import bucketed as bk
from data_pipeline.raw.common import Tally
from data_pipeline.raw.recipe import (
    expand_inputs,
    file_task,
    format_reports,
    load_module,
    module_options,
    part_name,
    read_json,
    write_json,
)
from data_pipeline.shards import atomic_open, atomic_write_bytes

PASSES = ("line", "exact", "near")
STAGES = (
    "files",
    "plan",
    *(
        f"{p}-{s}"
        for p in PASSES
        for s in (("scan", "bucket", "greedy", "apply") if p == "near" else ("scan", "bucket", "apply"))
    ),
    "count",
    "write",
    "concat",
    "report",
)


def once(marker: Path, key: str, work: Callable[[], dict]) -> dict:
    """`work()` unless `marker` already holds `key` (then what it recorded); the marker, with the task's
    CPU seconds, is written last."""
    done = read_json(marker)
    if done is not None and done.get("key") == key:
        return done
    marker.parent.mkdir(parents=True, exist_ok=True)
    start = time.process_time()
    result = {"key": key, **work()}
    result["seconds"] = time.process_time() - start
    write_json(marker, result)
    return result


_PLANS: dict = {}


class Source:
    """One source of a recipe config as its stages see it: folders, passes and (once planned) its plan."""

    def __init__(self, cfg: Any, name: str) -> None:
        self.cfg = cfg
        self.config = next(s for s in cfg.sources if s.name == name)
        self.name = name
        self.folder = Path(cfg.output) / name
        self.work = self.folder / "work"
        self.options = module_options(self.config)
        line = hasattr(load_module(self.config.kind), "finalize") and getattr(self.options, "line_dedup", False)
        wanted = {"line": line, "exact": self.config.exact_dedup, "near": self.config.near_dedup is not None}
        self.passes = [p for p in PASSES if wanted[p]]
        self.buckets = self.config.dedup_buckets or cfg.dedup_buckets

    @property
    def plan(self) -> dict:
        path = self.work / "plan.json"
        assert path.is_file(), f"{self.name}: the plan stage has not run"
        stamp = (str(path), path.stat().st_mtime_ns, path.stat().st_size)
        if _PLANS.get("stamp") != stamp:  # read once per process while it is unchanged
            _PLANS.update(stamp=stamp, plan=read_json(path))
        return _PLANS["plan"]

    def pending(self) -> bool:
        """Planned and not finished."""
        plan = read_json(self.work / "plan.json")
        return plan is not None and not plan["done"]

    def input_of(self, pass_name: Optional[str], part: int) -> Path:
        """The documents of `part` before `pass_name` (None: after the last pass)."""
        order = self.passes + [None]
        before = order.index(pass_name) - 1
        if before < 0:
            return self.folder / "files" / f"{self.plan['parts'][part]}.jsonl.gz"
        return self.work / order[before] / "out" / f"{part:08d}.jsonl.gz"


def _sources(cfg: Any) -> list[Source]:
    return [Source(cfg, s.name) for s in cfg.sources]


def tasks(stage: str, cfg: Any) -> list[tuple]:
    """The tasks of `stage` (each `(cfg, source name, index)`), from what earlier stages left on disk."""
    if stage == "files":
        return [(cfg, s.name, str(path)) for s in cfg.sources for path in expand_inputs(s)]
    if stage == "plan":
        return [(cfg, s.name, 0) for s in cfg.sources]
    if stage == "report":
        return [(cfg, "", 0)]
    out = []
    for s in _sources(cfg):
        if not s.pending():
            continue
        parts = len(s.plan["parts"])
        pass_name, _, step = stage.partition("-")
        if step and pass_name not in s.passes:
            continue
        if step in ("scan", "apply") or stage == "write":
            out += [(cfg, s.name, p) for p in range(parts)]
        elif step == "bucket":
            out += [(cfg, s.name, t) for t in range(_bucket_tasks(s))]
        elif step == "greedy" or stage == "count":
            out.append((cfg, s.name, 0))
        elif stage == "concat":
            out += [(cfg, s.name, n) for n in range(read_json(s.work / "counts.json")["shards"])]
    return out


def function(stage: str) -> Callable:
    """The task function of `stage`."""
    if stage == "files":
        return file_task
    return globals()[f"task_{stage.replace('-', '_')}"]


# plan


def step2_key(source: Source, markers: list[dict]) -> str:
    """What step 2's result depends on: every input's marker identity and the dedup settings."""
    c = source.config
    settings = {"exact": c.exact_dedup, "near": c.near_dedup, "shard_docs": c.shard_docs, "buckets": source.buckets}
    parts = [(m["input"], m["content"], m["settings"]) for m in markers]
    return hashlib.sha256(json.dumps({"parts": parts, **settings}, sort_keys=True).encode()).hexdigest()


def task_plan(cfg: Any, name: str, index: int) -> dict:
    """The source's parts, their step-1 tallies and the step-2 key; a finished source is marked done."""
    source = Source(cfg, name)
    parts = [part_name(p) for p in expand_inputs(source.config)]
    markers = [read_json(source.folder / "files" / f"{p}.done.json") for p in parts]
    key = step2_key(source, markers)
    report = read_json(source.folder / "report.json")
    done = report is not None and report.get("step2") == key
    if not done:
        (source.folder / "report.json").unlink(missing_ok=True)  # the source is unfinished until it is back
    for stale in set((source.folder / "files").glob("*.jsonl.gz")) - {
        source.folder / "files" / f"{p}.jsonl.gz" for p in parts
    }:
        stale.unlink()  # the output of an input no longer listed
        stale.with_name(stale.name.replace(".jsonl.gz", ".done.json")).unlink(missing_ok=True)
    tally = Tally()
    for marker in markers:
        tally.merge(Tally.from_dict(marker["tally"]))
    source.work.mkdir(parents=True, exist_ok=True)
    plan = {"key": key, "done": done, "parts": parts, "docs": [m["tally"]["docs_out"] for m in markers]}
    write_json(source.work / "plan.json", {**plan, "tally": tally.to_dict()})
    return {"docs": 0}


# the passes: scan, bucket, apply


def _scan_folder(source: Source, pass_name: str) -> Path:
    return source.work / pass_name / "scan"


def task_line_scan(cfg: Any, name: str, part: int) -> dict:
    s = Source(cfg, name)
    folder, plan = _scan_folder(s, "line"), s.plan

    def work() -> dict:
        docs = bk.read_jsonl_gz(s.input_of("line", part))
        first = sum(plan["docs"][:part])
        with bk.ScanWriter(folder, part, bk.LINE_RECORD, "h", s.buckets) as out:
            for records in bk.line_scan(docs, part, first, s.options.line_dedup_group_docs):
                out.add(records)
        return {"docs": out.docs}

    return once(folder / f"{part:08d}.done.json", plan["key"], work)


def task_exact_scan(cfg: Any, name: str, part: int) -> dict:
    s = Source(cfg, name)
    folder = _scan_folder(s, "exact")

    def work() -> dict:
        with bk.ScanWriter(folder, part, bk.EXACT_RECORD, "h1", s.buckets, ids=True) as out:
            for record, doc_id in bk.exact_scan(bk.read_jsonl_gz(s.input_of("exact", part)), part):
                out.add(record, doc_id)
        return {"docs": out.docs}

    return once(folder / f"{part:08d}.done.json", s.plan["key"], work)


@functools.lru_cache(maxsize=8)
def _minhasher(threshold: float) -> bk.MinHasher:
    return bk.MinHasher(threshold=threshold)  # datasketch's banding search costs ~25 ms: once per process


def _hasher(s: Source) -> bk.MinHasher:
    return _minhasher(s.config.near_dedup)


def task_near_scan(cfg: Any, name: str, part: int) -> dict:
    s = Source(cfg, name)
    folder = _scan_folder(s, "near")

    def work() -> dict:
        docs = bk.read_jsonl_gz(s.input_of("near", part))
        with bk.ScanWriter(folder, part, bk.BAND_RECORD, "h", s.buckets, ids=True, signatures=True) as out:
            for records, doc_id, signature, size in bk.near_scan(docs, part, _hasher(s)):
                out.add(records, doc_id, signature, size)
        return {"docs": out.docs}

    return once(folder / f"{part:08d}.done.json", s.plan["key"], work)


_RECORDS = {"line": bk.LINE_RECORD, "exact": bk.EXACT_RECORD, "near": bk.BAND_RECORD}


def _bucket_tasks(s: Source) -> int:
    return bk.bucket_tasks(s.buckets, len(s.plan["parts"]))


def _bucket_files(s: Source, pass_name: str) -> list[Path]:
    return [s.work / pass_name / "bucket" / f"{t:05d}.bin" for t in range(_bucket_tasks(s))]


def _bucket_task(pass_name: str, reducer: Callable[[Source], Callable[[np.ndarray], np.ndarray]]) -> Callable:
    """The bucket stage's task of a pass: `reducer(source)`, made once per task, reduces each of its buckets."""

    def task(cfg: Any, name: str, index: int) -> dict:
        s = Source(cfg, name)
        out = s.work / pass_name / "bucket"

        def work() -> dict:
            tasks = _bucket_tasks(s)
            reader = bk.ScanReader(_scan_folder(s, pass_name), len(s.plan["parts"]), _RECORDS[pass_name], s.buckets)
            reduce = reducer(s)
            found = [reduce(reader.bucket(b)) for b in bk.buckets_of(index, tasks, s.buckets)]
            out.mkdir(parents=True, exist_ok=True)
            bk.save_losers(out / f"{index:05d}.bin", np.concatenate(found), len(s.plan["parts"]))
            return {"docs": 0}

        return once(out / f"{index:05d}.done.json", s.plan["key"], work)

    task.__name__ = task.__qualname__ = f"task_{pass_name}_bucket"
    return task


def _near_reducer(s: Source) -> Callable[[np.ndarray], np.ndarray]:
    """Near dedup's bucket reduction, with one `Signatures` (its memory maps) for all the task's buckets."""
    signatures = bk.Signatures(_scan_folder(s, "near"), _hasher(s).num_perm)
    return lambda records: bk.near_bucket(records, signatures, s.config.near_dedup)


task_line_bucket = _bucket_task("line", lambda s: bk.line_bucket)
task_exact_bucket = _bucket_task("exact", lambda s: bk.exact_bucket)
task_near_bucket = _bucket_task("near", _near_reducer)


def task_near_greedy(cfg: Any, name: str, index: int) -> dict:
    """The near duplicates of the whole source, decided in input order from the pairs of every bucket."""
    s = Source(cfg, name)
    folder = s.work / "near"

    def work() -> dict:
        parts = len(s.plan["parts"])
        pairs = [bk.losers_of(path, bk.PAIR, parts) for path in _bucket_files(s, "near")]
        bk.save_losers(folder / "dropped.bin", bk.near_greedy(np.concatenate(pairs)), parts)
        return {"docs": 0}

    return once(folder / "dropped.done.json", s.plan["key"], work)


def _apply_task(pass_name: str) -> Callable:
    def task(cfg: Any, name: str, part: int) -> dict:
        s = Source(cfg, name)
        out = s.work / pass_name / "out"

        def work() -> dict:
            tally, parts = Tally(), len(s.plan["parts"])
            docs = bk.read_jsonl_gz(s.input_of(pass_name, part))
            if pass_name == "line":
                losers = bk.losers_in(_bucket_files(s, "line"), bk.LINE_LOSER, parts, part)
                kept = bk.line_apply(docs, part, losers, s.options.min_chars, tally)
            elif pass_name == "exact":
                losers = bk.losers_in(_bucket_files(s, "exact"), bk.PAIR, parts, part)
                name_of = bk.IdLookup(_scan_folder(s, "exact"))
                kept = bk.drop_pairs(docs, part, losers, "exact_duplicate", "same as", name_of, tally)
            else:
                losers = bk.losers_of(s.work / "near" / "dropped.bin", bk.PAIR, parts, part)
                name_of = bk.IdLookup(_scan_folder(s, "near"))
                kept = bk.drop_pairs(docs, part, losers, "near_duplicate", "~", name_of, tally)
            out.mkdir(parents=True, exist_ok=True)
            n = 0
            with bk.jsonl_gz(out / f"{part:08d}.jsonl.gz", durable=False) as write:
                for doc in kept:
                    write(doc)
                    n += 1
            return {"kept": n, "tally": tally.to_dict(), "docs": n}

        return once(out / f"{part:08d}.done.json", s.plan["key"], work)

    task.__name__ = task.__qualname__ = f"task_{pass_name}_apply"
    return task


task_line_apply, task_exact_apply, task_near_apply = (_apply_task(p) for p in PASSES)


# output shards


def _kept_per_part(s: Source) -> list[int]:
    if not s.passes:
        return list(s.plan["docs"])
    out = s.work / s.passes[-1] / "out"
    return [read_json(out / f"{p:08d}.done.json")["kept"] for p in range(len(s.plan["parts"]))]


def task_count(cfg: Any, name: str, index: int) -> dict:
    """Documents kept per part and the number of output shards."""
    s = Source(cfg, name)
    kept = _kept_per_part(s)
    shards = max(1, -(-sum(kept) // s.config.shard_docs))
    write_json(s.work / "counts.json", {"key": s.plan["key"], "kept": kept, "shards": shards})
    return {"docs": sum(kept)}


def _counts(s: Source) -> dict:
    counts = read_json(s.work / "counts.json")
    assert counts is not None and counts["key"] == s.plan["key"], f"{s.name}: the count stage has not run"
    return counts


def task_write(cfg: Any, name: str, part: int) -> dict:
    """The part's kept documents, one gzip piece per output shard they fall in."""
    s = Source(cfg, name)
    out = s.work / "write"

    def work() -> dict:
        counts, size = _counts(s), s.config.shard_docs
        first = sum(counts["kept"][:part])
        out.mkdir(parents=True, exist_ok=True)
        tally = Tally()
        docs = enumerate(bk.read_jsonl_gz(s.input_of(None, part)))
        for shard, group in itertools.groupby(docs, key=lambda item: (first + item[0]) // size):
            with bk.jsonl_gz(out / f"{shard:05d}-{part:08d}.gz", bk.OUTPUT_LEVEL, durable=False) as write:
                for _, doc in group:
                    write(tally.keep(doc))
        return {"tally": tally.to_dict(), "docs": tally.docs_out}

    return once(out / f"{part:08d}.done.json", s.plan["key"], work)


def task_concat(cfg: Any, name: str, shard: int) -> dict:
    """Output shard `shard`: the pieces of the parts whose documents fall in it, in part order."""
    s = Source(cfg, name)
    counts, size = _counts(s), s.config.shard_docs
    target = s.folder / f"{name}-{shard:05d}.jsonl.gz"

    def work() -> dict:
        starts = np.cumsum([0, *counts["kept"]])
        with atomic_open(target) as f:
            for part, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
                if hi > lo and lo < (shard + 1) * size and hi > shard * size:
                    with open(s.work / "write" / f"{shard:05d}-{part:08d}.gz", "rb") as piece:
                        shutil.copyfileobj(piece, f)
            if sum(counts["kept"]) == 0:  # a source with nothing kept still has one (empty) shard
                bk.empty_gzip(f)
        return {"docs": 0}

    return once(s.work / "concat" / f"{shard:05d}.done.json", s.plan["key"], work)


def source_report(s: Source) -> dict:
    """Step 1's tally, each pass's drops and the documents written, merged in input order."""
    plan = s.plan
    total = Tally.from_dict(plan["tally"])
    total.docs_out = total.bytes_out = 0  # the documents written are the ones step 2 kept
    parts = range(len(plan["parts"]))
    for pass_name in s.passes:
        for p in parts:
            total.merge(Tally.from_dict(read_json(s.work / pass_name / "out" / f"{p:08d}.done.json")["tally"]))
    for p in parts:
        total.merge(Tally.from_dict(read_json(s.work / "write" / f"{p:08d}.done.json")["tally"]))
    markers = [read_json(path) for path in s.work.rglob("*.done.json")]  # every step-2 task's CPU time
    total.seconds += sum(m.get("seconds", 0.0) for m in markers if m.get("key") == plan["key"])
    return {
        "source": s.name,
        "kind": s.config.kind,
        "inputs": len(plan["parts"]),
        **total.to_dict(),
        "step2": plan["key"],
    }


def _finish(s: Source) -> None:
    """The source's report.json, and its shards of an earlier run with more documents removed."""
    report = source_report(s)
    shards = _counts(s)["shards"]
    for old in s.folder.glob(f"{s.name}-*.jsonl.gz"):
        number = old.name[len(s.name) + 1 : -len(".jsonl.gz")]
        if not number.isdigit() or int(number) >= shards:
            old.unlink(missing_ok=True)
    write_json(s.folder / "report.json", report)


def task_report(cfg: Any, name: str, index: int) -> dict:
    """Every source's report.json (a finished one is kept), OUTPUT/report.md; the work folders removed."""
    reports = {}
    for s in _sources(cfg):
        plan = read_json(s.work / "plan.json")
        if plan is not None and not plan["done"]:
            try:
                _finish(s)
            except (OSError, AssertionError, TypeError):  # work/ vanishing as we read it: another live copy
                finished = read_json(s.folder / "report.json")  # of this task finished first; its report stands
                if finished is None or finished.get("step2") != plan["key"]:
                    raise
        reports[s.name] = read_json(s.folder / "report.json")
        if not cfg.keep_work:
            shutil.rmtree(s.work, ignore_errors=True)
    atomic_write_bytes(Path(cfg.output) / "report.md", format_reports(reports).encode("utf-8"))
    return {"docs": 0}
