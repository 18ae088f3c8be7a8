"""Read offline wandb run files (`<run>/wandb/offline-run-*/run-*.wandb`) back as the server would show them.

wandb >= 0.2x has no Python reader of its own for these files (`wandb sync` is done by wandb-core), so this
module reads the format itself: a LevelDB-style log (a 7-byte header `:W&B`, 0xBEE1, version; then 32 KiB
blocks of chunks, each with a CRC-32C, a length and a full/first/middle/last type) of `Record` protobufs
from `wandb.proto.wandb_internal_pb2`.

`wandb sync` uploads the segments of one run (one per `wandb.init`) in the order of their start times, and the
server applies each segment's run record first: a branch point on the same run id rewinds its history to the
branch step (rows up to that step are kept), one on another run id forks a new run that carries the parent's
rows up to that step, and a plain resume appends. Rows at or below the last step the server already has are
not shown again (the online SDK drops them; an offline segment's lower steps are renumbered by the sync):
either way they are missing or misplaced, which is what these helpers make visible.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

BLOCK = 32 * 1024
HEADER = 7  # crc32c (4), length (2), chunk type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[bytes]:
    """The serialized records of one `.wandb` file, in order."""
    data = path.read_bytes()
    if not data:  # created by a process killed before it wrote the header
        return
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file (no :W&B header)")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


@dataclass
class Segment:
    """One `wandb.init` of an offline run: its run record and history rows."""

    path: Path
    run_id: str
    start_time: float
    branch_run: str  # "" without a branch point
    branch_step: Optional[float]
    group: str
    job_type: str
    notes: str
    history: list[dict] = field(default_factory=list)  # {"step": n, key: value, ...} without wandb's `_` keys
    metrics: dict[str, str] = field(default_factory=dict)  # metric name or glob -> its step metric


def read_segment(path: Path) -> Optional[Segment]:
    """Parse one `.wandb` file; None for one without a run record (a process killed before wandb wrote its first
    block keeps the 7-byte header only: `wandb sync` has nothing to upload from it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    segment = None
    history, metrics = [], {}
    for raw in wandb_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run" and segment is None:
            run = record.run
            bp = run.branch_point
            segment = Segment(
                path=path,
                run_id=run.run_id,
                start_time=run.start_time.seconds + run.start_time.nanos / 1e9,
                branch_run=bp.run,
                branch_step=bp.value if bp.run else None,
                group=run.run_group,
                job_type=run.job_type,
                notes=run.notes,
            )
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or ".".join(item.nested_key)
                if not key.startswith("_"):
                    row[key] = json.loads(item.value_json)
            history.append({"step": record.history.step.num, **row})
        elif kind == "metric":
            m = record.metric
            metrics[m.name or m.glob_name] = m.step_metric
    if segment is None:
        return None
    segment.history, segment.metrics = history, metrics
    return segment


def offline_segments(run_dir: Path) -> list[Segment]:
    """Every offline segment under `<run_dir>/wandb`, in the order `wandb sync` uploads them.

    wandb's service writes a finished run's file after `finish()` returns: in a process that ran the runs,
    this first shuts the service down (`wandb.teardown()`) so that the files are whole.
    """
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    files = sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    segments = [s for s in map(read_segment, files) if s is not None]
    return sorted(segments, key=lambda s: s.start_time)


def offline_histories(run_dir: Path) -> dict[str, list[dict]]:
    """Run id -> its history as the server shows it after `wandb sync` (see the module docstring)."""
    histories: dict[str, list[dict]] = {}
    for seg in offline_segments(run_dir):
        if seg.branch_run:  # a rewind (same id) or a fork (another id): the branch run's rows up to the step
            rows = [dict(r) for r in histories.get(seg.branch_run, []) if r["step"] <= seg.branch_step]
        else:
            rows = histories.get(seg.run_id, [])
        for row in seg.history:
            if not rows or row["step"] > rows[-1]["step"]:
                rows.append(row)
        histories[seg.run_id] = rows
    return histories


def offline_history(run_dir: Path, run_id: Optional[str] = None) -> list[dict]:
    """The history of `run_id` (default: the run of the last segment) as its charts show it, in step order."""
    segments = offline_segments(run_dir)
    if not segments:
        raise FileNotFoundError(f"{run_dir}/wandb: no offline run files")
    return offline_histories(run_dir)[run_id or segments[-1].run_id]
