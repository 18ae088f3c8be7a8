"""Checkpoints: `<run>/checkpoints/step-00001000/`, written atomically, a `latest` pointer, keep last N.

The strategy writes model and optimizer state in its own form; this module adds what every strategy
shares (scheduler, data position, RNG of every rank, step, resolved config, code version, wandb run
id). A checkpoint is written under `step-XXXXXXXX.tmp`, listed with the size and checksum of every file
in `checksums.json` (written last; checksums computed as the files are written, `pretrain.digests`), and
renamed when complete; `latest` is updated after that, and
a folder is renamed to `step-XXXXXXXX.deleting` before it is deleted. So a process killed at any
point leaves `latest` on a complete checkpoint, every `step-XXXXXXXX` folder complete, and only
`.tmp` / `.deleting` leftovers, which the next run removes when it takes the run folder's lock. (One
window: a step saved again while `latest` names it, after a resume from an earlier checkpoint, is set
aside as `.deleting` just before its replacement is renamed in; a kill between the two renames is
repaired by the next start, which puts it back.)
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from data_pipeline.shards import atomic_write_bytes
from pretrain.config import ConfigError
from pretrain.digests import ALGORITHM, HashingFileSystem, bytes_digest, file_digest
from pretrain.parallel.base import Strategy

LATEST = "latest"
TRAINER = "trainer.pt"
CHECKSUMS = "checksums.json"  # {"algorithm": .., "files": {relative path: [size, digest or null]}}, written last
LOCK = "run.lock"  # in the run folder, held (fcntl.flock) by rank 0 of the trainer using it
TMP, DELETING = ".tmp", ".deleting"


class CheckpointError(ValueError):
    """A checkpoint that could not be written, or one that is incomplete or damaged; names the file."""


def code_version() -> str:
    """The git commit of this code (with `-dirty` for local changes), or the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return sha or "unknown"
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("llama-pretrain")
        except PackageNotFoundError:
            return "unknown"


def rng_state() -> dict[str, Any]:
    """Every random generator this process uses."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (names created, renamed or removed) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so the rename publishes whole files."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def save_torch(obj: Any, path: Path) -> list:
    """`torch.save` through the one atomic write, so a failed write raises the OSError (errno) itself; returns
    the file's [size, checksum], taken from the bytes in memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())
    return [buffer.getbuffer().nbytes, bytes_digest(buffer.getbuffer())]


def load_torch(path: Path) -> Any:
    """`torch.load` of a checkpoint file; a file that cannot be read is named."""
    try:
        return torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except Exception as e:  # a truncated or damaged pickle/zip raises any of several types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: damaged, cannot be read ({type(e).__name__}: {first})") from None


def checkpoint_files(folder: Path) -> list[str]:
    """Every file under `folder` but `checksums.json`, as sorted paths relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def owner(name: str, index: int, world_size: int) -> int:
    """The rank that checksums file `name` (the `index`-th of the checkpoint's sorted files) on save and
    on load: a rank's own DCP file and RNG state that rank (it writes them, and at the same world size it
    is the one that reads them back), DCP's `.metadata` and trainer.pt rank 0, any other file every
    `world_size`-th rank."""
    base = name.rsplit("/", 1)[-1]
    writer = None
    if base.startswith("__") and base.endswith(".distcp"):  # __{rank}_{n}.distcp
        writer = base[2:].split("_", 1)[0]
    elif base.startswith("rng-rank") and base.endswith(".pt"):
        writer = base[len("rng-rank") : -3]
    if writer is not None and writer.isdigit():
        return int(writer) % world_size
    if base in (".metadata", TRAINER):
        return 0
    return index % world_size


def is_dcp_data(name: str) -> bool:
    """Whether checkpoint file `name` is one of DCP's data files (`dcp/__0_0.distcp`): the bulk of a checkpoint,
    checksummed as they are read."""
    return name.endswith(".distcp")


def relative_name(file: str | os.PathLike, folder: Path) -> Optional[str]:
    """`file`'s path relative to checkpoint `folder`, as checksums.json lists it (None when outside it)."""
    try:
        return str(Path(file).relative_to(folder))
    except ValueError:
        return None


def owned(names: list[str], rank: int, world_size: int) -> list[str]:
    """The files of `names` (sorted) whose checksums `rank` takes care of."""
    return [name for i, name in enumerate(names) if owner(name, i, world_size) == rank]


def describe_files(folder: Path, names: list[str], hashes: bool, known: dict[str, list]) -> dict[str, list]:
    """[size, checksum] of each named file (checksum None without `hashes`): from `known` when it was taken
    as the file was written, else read from disk, flushed to disk first (a file written by another library)."""
    described = {}
    for name in names:
        if hashes and known.get(name, [None])[0] is not None:
            described[name] = known[name]
            continue
        path = folder / name
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        described[name] = [path.stat().st_size, file_digest(path) if hashes else None]
    return described


def read_listing(folder: Path) -> tuple[str, dict[str, list]]:
    """(checksum algorithm, {file: [size, checksum]}) of checkpoint `folder`'s checksums.json (sha256 when the
    listing names none: written before checksums were taken while writing). Raises CheckpointError."""
    listing = folder / CHECKSUMS
    if not listing.is_file():
        raise CheckpointError(f"{listing} is missing: the checkpoint is incomplete (or written before checksums)")
    try:
        content = json.loads(listing.read_text())
        return content.get("algorithm", "sha256"), dict(content["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"{listing} is damaged") from None


def damaged_files(
    folder: Path,
    rank: int = 0,
    world_size: int = 1,
    hashes: bool = True,
    known: Optional[dict[str, list]] = None,
    later: Callable[[str], bool] = lambda name: False,
) -> list[str]:
    """What is wrong with this rank's share (`owned`) of checkpoint `folder` against its `checksums.json`: a
    missing file, a size other than written (truncated), a checksum other than written (damaged; checked with
    `hashes` for the files not left for `later`, taken from `known` {file: [size, checksum]} when it was
    taken while the file was read, else read from disk). Empty when the share is whole."""
    try:
        algorithm, expected = read_listing(folder)
    except CheckpointError as e:
        return [str(e)]
    known = known or {}
    problems = []
    for name in owned(sorted(expected), rank, world_size):
        size, digest = expected[name]
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path} is {path.stat().st_size} bytes, {size} when written (truncated or damaged)")
        elif hashes and digest is not None and not later(name):
            seen = known.get(name, [None, None])[1]
            if (seen if seen is not None else file_digest(path, algorithm)) != digest:
                problems.append(f"{path} does not match the checksum it was written with (damaged)")
    return problems


def verify_checkpoint(folder: str | os.PathLike, hashes: bool = True, rank: int = 0, world_size: int = 1) -> None:
    """Refuse checkpoint `folder` before anything of it is read when a file its checksums.json lists is
    missing, truncated or damaged (sizes, and checksums with `hashes`), naming each file (`damaged_files`).
    Of `world_size` processes reading the same checkpoint (a command under torchrun), each checks a share,
    `rank`'s; one that refuses ends the launch. A folder without checksums.json (an `import` folder, one
    written before checksums) or a file passes."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        return
    problems = damaged_files(folder, rank, world_size, hashes=hashes)
    if problems:
        others = [p.name for p in sorted(folder.parent.glob("step-" + "[0-9]" * 8)) if p != folder]
        beside = f" (beside it: {', '.join(others[-3:])})" if others else ""
        raise CheckpointError(
            f"{folder} is damaged: {'; '.join(problems)}. Nothing was read from it; use another checkpoint{beside}"
        )


def first_os_error(error: BaseException) -> Optional[OSError]:
    """The first OSError with an errno behind `error`: its cause, context, or a rank's failure inside a
    torch.distributed.checkpoint CheckpointException."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):  # {rank: (exception, traceback)}
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        stack += [e.__context__, e.__cause__]
    return None


def newest_file(folder: Path) -> Optional[Path]:
    """The file under `folder` written last (the one a failed write was writing)."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


class CheckpointManager:
    """Saves, finds and loads the checkpoints of one run; each stateful part saves itself."""

    def __init__(
        self, run_dir: str | os.PathLike, strategy: Strategy, keep_last: int, verify: bool = True, keep_every: int = 0
    ):
        self.dir = Path(run_dir) / "checkpoints"
        self.strategy, self.keep_last, self.verify, self.keep_every = strategy, keep_last, verify, keep_every
        self._pending: Optional[tuple[Path, Path, Any, dict]] = None  # (tmp, final, future, checksums) in progress
        self._checked: Optional[Path] = None  # the checkpoint `check` last found whole

    def latest(self) -> Optional[Path]:
        """The checkpoint `latest` points to, if any."""
        pointer = self.dir / LATEST
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text().strip()
        if not (path / TRAINER).is_file():
            raise FileNotFoundError(f"{pointer} points to {path}, which is not a complete checkpoint")
        return path

    def latest_before(self, step: int) -> Optional[Path]:
        """The newest complete checkpoint of a step below `step` (where a run goes back to after a spike)."""
        earlier = [p for p in self._step_folders() if int(p.name[5:]) < step and (p / TRAINER).is_file()]
        return earlier[-1] if earlier else None

    def _step_folders(self) -> list[Path]:
        """The `step-XXXXXXXX` folders, oldest first (their zero-padded names sort by step)."""
        return sorted(self.dir.glob("step-" + "[0-9]" * 8))

    def clean(self) -> None:
        """Remove what killed saves and prunes left (main rank, before the run saves anything).

        `*.tmp` goes; `step-X.deleting` goes too, unless it was renamed away for a new `step-X` that
        never arrived while `latest` still names `step-X`: then it is complete and is put back.
        """
        if not self.dir.is_dir():
            return
        pointer = self.dir / LATEST
        latest = pointer.read_text().strip() if pointer.is_file() else None
        for path in sorted(self.dir.iterdir()):
            if path.name.endswith(DELETING):
                final = path.with_name(path.name[: -len(DELETING)])
                if final.name == latest and not final.exists():
                    os.replace(path, final)
                    continue
            elif not path.name.endswith(TMP):
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        fsync_dir(self.dir)

    def save(self, step: int, model, optimizer, state: dict[str, Any], asynchronous: bool = False) -> Path:
        """Write checkpoint `step`; `state` holds the common parts (scheduler, data, config, ...).

        With `asynchronous` the strategy writes model and optimizer in the background; the checkpoint
        is published (renamed, `latest` updated) by `poll` once every rank has finished, or by `wait`.
        A write that fails (disk full, file too large) raises one `CheckpointError` naming the errno, the
        file and the free space, with the partial `.tmp` removed.
        """
        self.wait()
        final = self.dir / f"step-{step:08d}"
        tmp = final.with_name(final.name + TMP)
        with self._failing_save(tmp):
            if self.strategy.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.strategy.barrier()
            files = HashingFileSystem() if self.verify else None  # checksums of the files as DCP writes them
            written = self.strategy.save(tmp, model, optimizer, asynchronous, files)
            known = {
                f"rng-rank{self.strategy.rank:05d}.pt": save_torch(
                    rng_state(), tmp / f"rng-rank{self.strategy.rank:05d}.pt"
                )
            }
            if self.strategy.is_main:
                known[TRAINER] = save_torch({**state, "step": step, "code_version": code_version()}, tmp / TRAINER)
            self._pending = (tmp, final, written, known, files)
            if written is None:
                self.wait()
        return final

    @property
    def pending(self) -> bool:
        """Whether a background save is still to be published."""
        return self._pending is not None

    def poll(self) -> None:
        """Publish a background save that every rank has finished (call on all ranks at the same step)."""
        if self._pending is not None and not self.strategy.any(not self._pending[2].done()):
            self.wait()

    def wait(self) -> None:
        """Finish and publish the background save, if any."""
        if self._pending is None:
            return
        tmp, final, written, known, files = self._pending
        self._pending = None
        with self._failing_save(tmp):
            if written is not None:
                written.result()
            if files is not None:  # taken in the writer's thread as it wrote
                known.update({relative_name(file, tmp): entry for file, entry in files.digests.items()})
            self._publish(tmp, final, known)

    @contextlib.contextmanager
    def _failing_save(self, tmp: Path) -> Iterator[None]:
        """A block in which a failed write removes `tmp` and, when an OSError is behind it, becomes one
        line: the errno, the file being written and the free space."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # torch.distributed.checkpoint's CheckpointException is a BaseException
            os_error = first_os_error(error)
            culprit = os_error.filename if os_error is not None and os_error.filename else newest_file(tmp)
            if self.strategy.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if os_error is None or isinstance(error, CheckpointError):  # the latter already says what happened
                raise
            raise CheckpointError(
                f"saving {tmp.name[: -len(TMP)]} failed: [Errno {os_error.errno}] {os_error.strerror}: {culprit} "
                f"({self._free_space()}); the partial {tmp.name} was removed"
            ) from None

    def _free_space(self) -> str:
        """`12.34 GB free on <checkpoints folder>`, for a message about a failed write."""
        free = shutil.disk_usage(self.dir if self.dir.is_dir() else self.dir.parent).free
        return f"{free / 1e9:.2f} GB free on {self.dir}"

    def _point_latest(self, final: Path) -> None:
        """Point `latest` at the published checkpoint `final`. When that write fails (the disk full just after
        the rename), `final` is kept, complete, and the error says so and how to resume from it."""
        pointer = self.dir / LATEST
        try:
            atomic_write_bytes(pointer, final.name.encode())
        except OSError as e:
            still = pointer.read_text().strip() if pointer.is_file() else "no checkpoint"
            raise CheckpointError(
                f"saving {final.name}: writing {pointer} failed ([Errno {e.errno}] {e.strerror or e}; "
                f"{self._free_space()}): {final} is complete but `latest` still names {still}; resume from it "
                f"with train.resume={final}"
            ) from None

    def _publish(self, tmp: Path, final: Path, known: dict[str, list]) -> None:
        """List every file of `tmp` in its checksums.json (each rank its share, `owned`: the checksums `known`
        from writing them, any other file read and flushed), rename it to `final`, point `latest` at it, prune
        old checkpoints."""
        self.strategy.barrier()
        names = checkpoint_files(tmp)
        mine = owned(names, self.strategy.rank, self.strategy.world_size)
        described = self.strategy.gather(describe_files(tmp, mine, self.verify, known))
        described = {name: entry for share in described for name, entry in share.items()}
        if self.strategy.is_main:
            for folder in {(tmp / name).parent for name in names}:
                fsync_dir(folder)
            listing = {"algorithm": ALGORITHM, "files": described}
            atomic_write_bytes(tmp / CHECKSUMS, json.dumps(listing, indent=1).encode())
            replaced = final.with_name(final.name + DELETING)
            if final.exists():  # saved again (a run resumed from an earlier step): set the old one aside first
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            self._point_latest(final)
            if replaced.exists():
                shutil.rmtree(replaced)
            self._prune(final)
        self.strategy.barrier()

    def load(self, path: str | os.PathLike, model, optimizer, expect_model: Optional[dict] = None) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from `path`; return the common state.

        Every file is first checked against `checksums.json` for its size (`check`), so a truncated or missing
        file is named before anything is read; checksums (unless `train.verify_checkpoints=false`) are taken
        while DCP reads the files (each rank those it owns, `owned`; files nothing read, from disk) and a
        file that differs is named before anything of the checkpoint is used. With `expect_model` (the `model`
        section of the config), a checkpoint of another shape is refused with the keys that differ, before
        any tensor is loaded.
        """
        path = Path(path)
        if path != self._checked:
            self.check(path)
        state = load_torch(path / TRAINER)
        if "scheduler" not in state:
            self._refuse_weights_only(path, state)
        if expect_model is not None:
            saved = state["config"]["model"]
            diff = [
                f"model.{k}: {saved.get(k)!r} there, {v!r} here" for k, v in expect_model.items() if saved.get(k) != v
            ]
            if diff:
                raise ConfigError(
                    f"{path} holds a different model ({'; '.join(diff)}); "
                    "set train.resume=never or another train.run_dir to start a new run"
                )
        rank, world_size = self.strategy.rank, self.strategy.world_size
        files = None
        if self.verify and self.strategy.reads_through_files and (path / CHECKSUMS).is_file():
            algorithm, listed = read_listing(path)
            mine = {name for name in owned(sorted(listed), rank, world_size) if is_dcp_data(name)}
            files = HashingFileSystem(lambda file: relative_name(file, path) in mine, algorithm)
        try:
            self.strategy.load(path, model, optimizer, files)
        except Exception:
            if files is not None:  # a damaged file that DCP could not even read: name it
                self._refuse_damaged(path, damaged_files(path, rank, world_size, True))
            raise
        if files is not None:
            known = {relative_name(file, path): entry for file, entry in files.digests.items()}
            self._refuse_damaged(path, damaged_files(path, rank, world_size, True, known))
        rng = path / f"rng-rank{self.strategy.rank:05d}.pt"
        if rng.is_file():  # absent when resuming on more ranks than saved: this rank keeps its seeded state
            set_rng_state(load_torch(rng))
        return state

    def check(self, path: Path) -> None:
        """Every file of checkpoint `path` against its checksums.json, each rank a share (nothing to compare in
        a folder without checksums.json), and trainer.pt read; raises on every rank, naming each file that is
        missing, truncated or damaged. Sizes of all; checksums (unless `verify` is off) of all but DCP's data
        files, whose checksums `load` takes as it reads them."""
        if not (path / TRAINER).is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint folder (no {TRAINER})")
        listed = (path / CHECKSUMS).is_file()
        if listed or self.verify:
            if not listed and "scheduler" not in (state := load_torch(path / TRAINER)):
                self._refuse_weights_only(path, state)  # an `import` folder: say what it is for
            later = is_dcp_data if self.strategy.reads_through_files else lambda name: False
            self._refuse_damaged(
                path, damaged_files(path, self.strategy.rank, self.strategy.world_size, self.verify, later=later)
            )
        load_torch(path / TRAINER)
        self._checked = path

    def _refuse_damaged(self, path: Path, mine: list[str]) -> None:
        """Raise on every rank when any rank found something wrong with its share of checkpoint `path`."""
        problems = list(dict.fromkeys(p for share in self.strategy.gather(mine) for p in share))
        if problems:
            hint = "" if (path / CHECKSUMS).is_file() else ", or set train.verify_checkpoints=false"
            raise CheckpointError(
                f"{path} is damaged: {'; '.join(problems)}. Resume from another checkpoint "
                f"(train.resume=<folder>){hint}"
            )

    @staticmethod
    def _refuse_weights_only(path: Path, state: dict[str, Any]) -> None:
        """Say that an `import` folder starts runs (`train.init_from`) and resumes none."""
        raise ConfigError(
            f"{path} holds weights only (imported from {state.get('imported_from', 'elsewhere')}), nothing to "
            f"resume: start a new run from it with train.init_from={path}"
        )

    def _prune(self, keep: Path) -> None:
        """Delete the oldest complete checkpoints but `keep` (the one `latest` names) until `keep_last`
        are left, not counting those of a step divisible by `keep_every`, which stay for good; each is
        renamed to `.deleting` first, so a half-deleted one never looks complete."""
        kept = (lambda p: int(p.name[5:]) % self.keep_every == 0) if self.keep_every else (lambda p: False)
        done = [p for p in self._step_folders() if not kept(p)]
        others = [p for p in done if p != keep]
        for old in others[: max(len(done) - self.keep_last, 0)]:
            gone = old.with_name(old.name + DELETING)
            os.replace(old, gone)
            fsync_dir(self.dir)
            shutil.rmtree(gone)


class RunFolder:
    """A run folder held by one trainer: refused when read-only or locked by another trainer (an
    `fcntl.flock` on `run.lock`, held by rank 0 until the run ends and dropped by the system when
    its holder dies), then cleaned of what killed saves and prunes left."""

    def __init__(self, run_dir: str | os.PathLike, strategy: Strategy, checkpoints: CheckpointManager):
        self.dir, self.strategy, self.checkpoints = Path(run_dir), strategy, checkpoints
        self._lock = None

    def __enter__(self) -> "RunFolder":
        error = None
        if self.strategy.is_main:
            try:
                self._take()
                self.checkpoints.clean()
            except (ConfigError, OSError) as e:
                error = e
        if self.strategy.any(error is not None):
            self.__exit__(None, None, None)
            if isinstance(error, ConfigError):
                raise error
            raise ConfigError(f"train.run_dir={self.dir}: {error or 'refused on rank 0 (see its error)'}")
        return self

    def _take(self) -> None:
        """Lock the run folder for this process, after checking that it (and its checkpoints) can be written."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.dir / LOCK, "a+")
            for folder in (self.dir, self.checkpoints.dir):
                if folder.is_dir():
                    tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise ConfigError(
                f"train.run_dir={self.dir} cannot be written ({e}): checkpoints and metrics go there; "
                "make it writable or choose another train.run_dir"
            ) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            self._lock = None
            raise ConfigError(
                f"train.run_dir={self.dir} is in use by another trainer ({holder}); wait for it to end, "
                "or choose another train.run_dir"
            ) from None
        except OSError as e:  # a file system without locks (Lustre mounted without `flock`): say so, go on
            print(f"warning: {self.dir / LOCK} cannot be locked ({e}); nothing keeps a second trainer out of it")
            return
        self._lock.truncate(0)
        self._lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._lock.flush()

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None
