"""Checkpoints under faults: saves killed (SIGKILL) at every step of writing, flipped and truncated
bytes, a full file system, a read-only or busy run folder, leftovers of killed saves and prunes.

Trainers that get killed run in real child processes, forked from a server that has imported torch
and the trainer once (so each costs a fraction of a second), and are killed by their own hook at
the chosen file operation of a save; the next child resumes, and the chain of killed runs must end
on the loss curve of the unbroken run, bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_distributed import STRATEGIES, free_port, losses

from conftest import FORKSERVER, ROOT, tiny_config, tiny_overrides
from pretrain.checkpoint import CHECKSUMS, CheckpointError, damaged_files
from pretrain.config import ConfigError
from pretrain.trainer import train


def _watch_file_operations(checkpoints: Path, kill: tuple[str, int] | None, record: str | None) -> None:
    """Name every file operation of a checkpoint save (writes opened, renames, removals) relative to
    the save: `step-NEW` is the one being saved, `step-OLD` the one `latest` named when it began. With
    `record`, append `save-number<TAB>operation` lines to that file; with `kill` = (operation, n),
    SIGKILL this process just before the n-th such operation (just after, for an open)."""
    import builtins
    import io

    from pretrain import checkpoint

    state = {"save": 0, "on": False, "labels": {}, "seen": Counter(), "removing": None}
    real_open, real_save = builtins.open, checkpoint.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        pointer = checkpoints / "latest"
        old = pointer.read_text().strip() if pointer.is_file() else None
        state["labels"] = {f"step-{step:08d}": "step-NEW", **({old: "step-OLD"} if old else {})}
        state["save"] += 1
        state["on"] = True
        try:
            return real_save(self, step, *args, **kwargs)
        finally:
            state["on"] = False

    def label(path) -> str:
        name = re.sub(r"\.\d+\.[0-9a-f]{8}\.tmp", ".tmp", str(path))  # atomic_open's per-writer temporaries
        name = name.replace(f"{checkpoints}/", "")
        for real, tag in state["labels"].items():
            name = name.replace(real, tag)
        if not os.path.isabs(path) and state["removing"]:  # a name relative to the folder rmtree is removing
            name = f"{state['removing']}/{name}"
        return name

    def event(op: str, *paths) -> None:
        if not state["on"]:
            return
        operation = f"{op} {' -> '.join(label(path) for path in paths)}"
        if record is not None:
            with real_open(record, "a") as f:
                f.write(f"{state['save']}\t{operation}\n")
        state["seen"][operation] += 1
        if kill == (operation, state["seen"][operation]):
            os.kill(os.getpid(), signal.SIGKILL)

    def watched(real, op):
        def call(*args, **kwargs):
            event(op, *[a for a in args if isinstance(a, (str, os.PathLike))])
            return real(*args, **kwargs)

        return call

    def removing(real):
        def call(path, *args, **kwargs):
            event("rmtree", path)
            state["removing"] = label(path)
            try:
                return real(path, *args, **kwargs)
            finally:
                state["removing"] = None

        return call

    def opened(real):
        def call(file, mode="r", *args, **kwargs):
            f = real(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and isinstance(file, (str, os.PathLike)):
                event("open", file)
            return f

        return call

    checkpoint.CheckpointManager.save = save
    builtins.open, io.open = opened(builtins.open), opened(io.open)
    for name in ("replace", "rename", "unlink", "rmdir"):
        setattr(os, name, watched(getattr(os, name), name))
    shutil.rmtree = removing(shutil.rmtree)


def _trainer(rank: int, world_size: int, port: int, tiny_data: dict, run_dir: str, overrides: list, *watch_limit):
    """A child process: one rank of a training run, rank 0 watched (and killed) as `kill`/`record` say;
    with `limit`, files can grow to that many bytes (RLIMIT_FSIZE) and an error is written beside the run."""
    kill, record, limit = watch_limit
    if world_size > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
        )
    if rank == 0 and (kill or record):
        _watch_file_operations(Path(run_dir) / "checkpoints", kill, record)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # a tiny model: threads only cost time, more so on a busy machine
    if limit is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        train(tiny_config(tiny_data, Path(run_dir), *overrides))
    except Exception as e:
        (Path(run_dir).parent / f"error-rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_children(tiny_data, run_dir, overrides, world_size=1, kill=None, record=None, limit=None) -> int:
    """Train in `world_size` child processes; when rank 0 dies, the others are killed too (as when a
    node is lost). Returns rank 0's exit code (-9: killed)."""
    port = free_port()
    args = (world_size, port, tiny_data, str(run_dir), list(overrides), kill, record, limit)
    ranks = [FORKSERVER.Process(target=_trainer, args=(rank, *args)) for rank in range(world_size)]
    for process in ranks:
        process.start()
    ranks[0].join(timeout=180)
    for process in ranks:
        if ranks[0].exitcode != 0:
            process.kill()
        process.join(timeout=60)
    assert all(p.exitcode is not None for p in ranks), f"ranks still running: {overrides}"
    return ranks[0].exitcode


def assert_published_checkpoints_whole(checkpoints: Path) -> None:
    """`latest` names a complete checkpoint, and every `step-XXXXXXXX` folder is complete, byte for byte."""
    name = (checkpoints / "latest").read_text()
    assert re.fullmatch(r"step-\d{8}", name) and damaged_files(checkpoints / name) == [], f"latest: {name!r}"
    for folder in sorted(checkpoints.glob("step-" + "[0-9]" * 8)):
        assert damaged_files(folder) == [], f"{folder.name} looks published but is not whole"


# Where to kill a save: one operation per state it can leave the folder in (every other operation
# leaves one of these states again), as (which operations, the how-manyth of them, from 0): a file of
# the new checkpoint half-written, all written but its checksums.json, the `.tmp` folder complete,
# published but `latest` half-written or not yet renamed, the old checkpoint set aside, half-deleted
# (one file gone), and emptied.
PHASES = {
    "write": (lambda op: op.startswith("open step-NEW"), 0),
    "listing": (lambda op: op.startswith("replace step-NEW") and "checksums.json" in op, 0),
    "publish": (lambda op: op == "replace step-NEW.tmp -> step-NEW", 0),
    "pointer-written": (lambda op: op.startswith("open latest"), 0),
    "pointer-renamed": (lambda op: op.startswith("replace latest"), 0),
    "set-aside": (lambda op: op == "replace step-OLD -> step-OLD.deleting", 0),
    "half-deleted": (lambda op: op.startswith("unlink step-OLD"), 1),
    "emptied": (lambda op: re.fullmatch(r"rmdir step-OLD(\.deleting)?", op) is not None, 0),
}
# strategy: (overrides, ranks, phases); with two ranks, whose children cost more, four of them: a file
# half-written, every rank's files written, published before `latest` moved, the prune cut short
CHAINS = {
    "single": ([], 1, list(PHASES)),
    "fsdp": (STRATEGIES["fsdp"], 2, ["write", "publish", "pointer-renamed", "half-deleted"]),
    "zero3": (STRATEGIES["zero3"], 2, ["write", "publish", "pointer-renamed", "half-deleted"]),
}


def kill_points(recorded: list[str], phases: list[str]) -> dict[str, tuple[str, int]]:
    """Phase -> (operation, occurrence): where in the recorded save each phase is, if it is there."""
    points, seen = [], Counter()
    for operation in recorded:
        seen[operation] += 1
        points.append((operation, seen[operation]))
    found = {}
    for phase in phases:
        matches, nth = PHASES[phase]
        in_phase = [p for p in points if matches(p[0])]
        if len(in_phase) > nth:
            found[phase] = in_phase[nth]
    return found


@pytest.mark.parametrize("strategy", CHAINS)
def test_a_save_killed_at_any_point_leaves_latest_whole_and_the_run_resumes_exactly(tiny_data, tmp_path, strategy):
    extra, world_size, phases = CHAINS[strategy]
    steps = len(phases) + 3  # each killed child trains at most one step
    common = [*extra, "train.micro_batch_size=2", f"train.steps={steps}", "train.save_every=1", "train.keep_last=1"]
    run, record = tmp_path / "run", tmp_path / "operations.tsv"
    # saves at steps 1 and 2, the operations of the second (a new checkpoint and the old one pruned) recorded
    assert run_children(tiny_data, run, [*common, "train.stop_at=2"], world_size, record=str(record)) == 0
    recorded = [line.split("\t")[1] for line in record.read_text().splitlines() if line.startswith("2\t")]
    points = kill_points(recorded, phases)
    for point in points.values():  # each child resumes from `latest`, trains one step and is killed saving it
        step = int((run / "checkpoints" / "latest").read_text()[len("step-") :])
        overrides = [*common, f"train.stop_at={step + 1}"]
        assert run_children(tiny_data, run, overrides, world_size, kill=point) == -signal.SIGKILL, point
        assert_published_checkpoints_whole(run / "checkpoints")
    assert run_children(tiny_data, run, common, world_size) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", f"step-{steps:08d}"]  # cleaned
    unbroken = [*extra, "train.micro_batch_size=2", f"train.steps={steps}"]
    straight = tmp_path / "straight"  # in a child too: the same number of threads as the chain
    assert run_children(tiny_data, straight, unbroken, world_size) == 0
    assert losses(run) == losses(straight)
    assert list(points) == phases, f"a save without operations of {set(phases) - set(points)}: {recorded}"


def flip_byte(path: Path, at: float = 0.5) -> None:
    """Flip the lowest bit of the byte `at` of the way into `path` (same size)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 1
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def stopped_run_once(tiny_data, tmp_path_factory):
    """A run of 4 steps stopped after step 2 (checkpointed), and the unbroken run's losses."""
    base = tmp_path_factory.mktemp("stopped")
    train(tiny_config(tiny_data, base / "straight", "train.steps=4"))
    train(tiny_config(tiny_data, base / "run", "train.steps=4", "train.stop_at=2"))
    return base / "run", losses(base / "straight")


@pytest.fixture
def stopped_run(stopped_run_once, tmp_path):
    """A copy of `stopped_run_once` for one test to damage."""
    run, straight = stopped_run_once
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", straight


def flip_weights(folder: Path, name: str, count: int = 16) -> Path:
    """Flip the top mantissa bit of the first `count` values of parameter `name` where they lie in
    checkpoint `folder` (same size, finite values); returns the file."""
    from pretrain.consolidate import consolidated_state_dict

    values = consolidated_state_dict(folder)[name].flatten()[:count].numpy().tobytes()
    shard = folder / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    at = data.find(values)
    assert at > 0 and data.find(values, at + 1) < 0
    for i in range(count):
        data[at + 4 * i + 2] ^= 0x40  # little-endian fp32: bit 22 of the value
    shard.write_bytes(bytes(data))
    return shard


def test_flipped_bytes_in_tensor_data_are_caught_before_resuming(tiny_data, tmp_path, stopped_run):
    run, straight = stopped_run
    shard = flip_weights(run / "checkpoints" / "step-00000002", "layers.0.attention.wq.weight")
    unchecked = tmp_path / "unchecked"
    shutil.copytree(run, unchecked)
    train(tiny_config(tiny_data, unchecked, "train.steps=4", "train.verify_checkpoints=false"))
    assert losses(unchecked)[2:] != straight[2:]  # unchecked, the flip resumes silently with other losses
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(shard))} does not match the checksum it was written"):
        train(tiny_config(tiny_data, run, "train.steps=4"))
    flip_weights(run / "checkpoints" / "step-00000002", "layers.0.attention.wq.weight")  # back: resumes exactly
    train(tiny_config(tiny_data, run, "train.steps=4"))
    assert losses(run) == straight


@pytest.mark.parametrize("name", ["trainer.pt", "rng-rank00000.pt", "dcp/.metadata"])
def test_a_flipped_or_truncated_file_is_named(tiny_data, stopped_run, name):
    run, _ = stopped_run
    path = run / "checkpoints" / "step-00000002" / name
    intact = path.read_bytes()
    flip_byte(path, 0.8)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} does not match the checksum it was written"):
        train(tiny_config(tiny_data, run, "train.steps=4"))
    path.write_bytes(intact[: len(intact) // 2])  # sizes are compared even with checksums off
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(path))} is {len(intact) // 2} bytes, {len(intact)} when"
    ):
        train(tiny_config(tiny_data, run, "train.steps=4", "train.verify_checkpoints=false"))


@pytest.mark.parametrize("name", ["trainer.pt", "rng-rank00000.pt"])
def test_without_checksums_an_unreadable_file_is_still_named(tiny_data, stopped_run, name):
    run, _ = stopped_run
    folder = run / "checkpoints" / "step-00000002"
    (folder / CHECKSUMS).unlink()
    with pytest.raises(CheckpointError, match=r"checksums.json is missing.*or set train.verify_checkpoints=false"):
        train(tiny_config(tiny_data, run, "train.steps=4"))
    (folder / name).write_bytes((folder / name).read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder / name))}: damaged, cannot be read"):
        train(tiny_config(tiny_data, run, "train.steps=4", "train.verify_checkpoints=false"))


def test_a_save_that_hits_the_file_size_limit_ends_in_one_line_and_leaves_no_tmp(tiny_data, tmp_path, stopped_run):
    run, _ = stopped_run
    overrides = tiny_overrides(tiny_data, run, "train.steps=4")
    command = [sys.executable, "-m", "pretrain", "train", "configs/experiments/debug.yaml", *overrides]
    result = subprocess.run(  # ulimit -f: RLIMIT_FSIZE, in 1024-byte blocks; the model's file is about 1.9 MB
        ["bash", "-c", "ulimit -f 400; exec " + " ".join(command)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: saving step-00000004 failed: [Errno 27] File too large: "), line
    assert "step-00000004.tmp/dcp/__0_0.distcp" in line and " GB free on " in line, line
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000002"]  # the partial .tmp removed
    assert (checkpoints / "latest").read_text() == "step-00000002"


def test_a_deepspeed_save_that_hits_the_file_size_limit_ends_in_one_line_too(tiny_data, tmp_path):
    common = [*STRATEGIES["zero3"], "train.micro_batch_size=2", "train.steps=4"]
    run = tmp_path / "run"
    assert run_children(tiny_data, run, [*common, "train.stop_at=2"], 2) == 0
    assert run_children(tiny_data, run, common, 2, limit=400_000) == 1  # DeepSpeed's files are torch.save'd
    message = (tmp_path / "error-rank0.txt").read_text()
    assert re.fullmatch(
        r"CheckpointError: saving step-00000004 failed: \[Errno 27\] File too large: \S+/step-00000004.tmp/\S+ "
        r"\([0-9.]+ GB free on \S+\); the partial step-00000004.tmp was removed",
        message,
    ), message
    assert (run / "checkpoints" / "latest").read_text() == "step-00000002"


def _as_nobody(cfg, queue) -> None:
    os.setgid(65534)
    os.setuid(65534)
    try:
        train(cfg)
        queue.put("trained")
    except Exception as e:
        queue.put(f"{type(e).__name__}: {e}")


@pytest.mark.parametrize("read_only", ["run", "checkpoints"])
def test_a_read_only_run_folder_is_refused_at_start(tiny_data, tmp_path, read_only):
    import tempfile

    base = Path(tempfile.mkdtemp())  # outside pytest's folders, which only their owner may enter
    try:
        base.chmod(0o755)
        run = base / "run"
        (run / "checkpoints").mkdir(parents=True)
        run.chmod(0o777)
        (base / read_only if read_only == "run" else run / read_only).chmod(0o555)
        cfg = tiny_config(tiny_data, run, "train.steps=2")
        if os.geteuid() == 0:  # root writes anywhere: the trainer runs as nobody
            queue = FORKSERVER.Queue()
            process = FORKSERVER.Process(target=_as_nobody, args=(cfg, queue))
            process.start()
            message = queue.get(timeout=120)
            process.join()
        else:
            with pytest.raises(ConfigError) as error:
                train(cfg)
            message = f"ConfigError: {error.value}"
        assert message.startswith(f"ConfigError: train.run_dir={run} cannot be written ("), message
        assert "Permission denied" in message
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_second_trainer_on_the_same_run_folder_is_refused_until_the_first_is_gone(tiny_data, tmp_path):
    run = tmp_path / "run"
    first = FORKSERVER.Process(
        target=_trainer, args=(0, 1, 0, tiny_data, str(run), ["train.steps=1000000"], None, None, None)
    )
    first.start()
    try:
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
            assert first.is_alive()
            first.join(timeout=0.05)
        with pytest.raises(ConfigError, match=rf"train.run_dir={run} is in use by another trainer \(pid {first.pid} "):
            train(tiny_config(tiny_data, run, "train.steps=2"))
        assert first.is_alive()  # and still writing its own metrics, none of the second's
    finally:
        first.kill()
        first.join()
    train(tiny_config(tiny_data, run, "train.steps=2", "train.resume=never"))  # the dead holder's lock is stale
    (run / "checkpoints" / "step-00000002" / "trainer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as failed:  # a run that stops with an error, its traceback kept
        train(tiny_config(tiny_data, run, "train.steps=3"))
    train(tiny_config(tiny_data, run, "train.steps=3", "train.resume=never"))  # the last runs released it
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert "trainer.pt" in str(failed.value)


def test_leftovers_of_a_killed_save_and_a_killed_prune_are_removed_at_the_next_start(tiny_data, stopped_run):
    run, straight = stopped_run
    checkpoints = run / "checkpoints"
    shutil.copytree(checkpoints / "step-00000002", checkpoints / "step-00000001.deleting")  # a prune cut short
    (checkpoints / "step-00000001.deleting" / "dcp" / "__0_0.distcp").unlink()
    shutil.copytree(checkpoints / "step-00000002", checkpoints / "step-00000003.tmp")  # a save cut short
    (checkpoints / "step-00000003.tmp" / "trainer.pt").unlink()
    (checkpoints / "latest.tmp").write_text("step-0000")
    train(tiny_config(tiny_data, run, "train.steps=4", "train.stop_at=3"))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    # a checkpoint set aside to be replaced by a save that was then killed, while `latest` named it: put back
    os.replace(checkpoints / "step-00000003", checkpoints / "step-00000003.deleting")
    train(tiny_config(tiny_data, run, "train.steps=4"))
    assert losses(run) == straight


# A checkpoint spoilt before a command reads it: (the file, what is done to it, what the error says of it)
DAMAGE = {
    "flipped": ("dcp/__0_0.distcp", flip_byte, "does not match the checksum it was written with (damaged)"),
    "truncated": ("trainer.pt", lambda path: path.write_bytes(path.read_bytes()[:-100]), "is "),
    "deleted": ("dcp/.metadata", Path.unlink, "is missing"),
}
READERS = {  # command -> its arguments, given the checkpoint folder and a folder for its output
    "consolidate": lambda folder, out: ["consolidate", str(folder), "-o", str(out / "model.pth")],
    "export-hf": lambda folder, out: ["export-hf", str(folder), str(out / "hf")],
    "evaluate": lambda folder, out: ["evaluate", str(folder), "--json", str(out / "eval.json")],
    "generate": lambda folder, out: ["generate", str(folder), "Once upon", "--max-new-tokens", "2"],
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("command", READERS)
def test_a_command_refuses_a_damaged_checkpoint_in_one_line_naming_the_file(
    stopped_run, tmp_path, capsys, command, damage
):
    from pretrain.__main__ import main

    run, _ = stopped_run
    folder, out = run / "checkpoints" / "step-00000002", tmp_path / "out"
    out.mkdir()
    name, spoil, said = DAMAGE[damage]
    spoil(folder / name)
    assert main(READERS[command](folder, out)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {folder} is damaged: {folder / name} {said}"), captured.err
    assert captured.err.count("\n") == 1 and "use another checkpoint" in captured.err, captured.err
    assert list(out.iterdir()) == [] and "---" not in captured.out  # nothing written, nothing generated


def test_a_checkpoint_without_checksums_is_still_read(stopped_run, tmp_path, capsys):
    from pretrain.__main__ import main

    run, _ = stopped_run
    folder = run / "checkpoints" / "step-00000002"
    (folder / CHECKSUMS).unlink()  # as an `import` folder, or a checkpoint written before checksums
    assert main(["consolidate", str(folder), "-o", str(tmp_path / "model.pth")]) == 0
    assert (tmp_path / "model.pth").is_file()


def test_a_latest_pointer_that_cannot_be_written_keeps_the_complete_checkpoint(tiny_data, stopped_run, monkeypatch):
    import errno

    from pretrain import checkpoint

    run, straight = stopped_run
    checkpoints, write = run / "checkpoints", checkpoint.atomic_write_bytes

    def disk_full_for_latest(path: Path, data: bytes) -> None:  # the disk fills just after the rename
        if Path(path).name == "latest":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", disk_full_for_latest)
    with pytest.raises(CheckpointError) as error:
        train(tiny_config(tiny_data, run, "train.steps=4"))
    final = checkpoints / "step-00000004"
    assert re.fullmatch(
        rf"saving step-00000004: writing {re.escape(str(checkpoints / 'latest'))} failed \(\[Errno 28\] No space "
        rf"left on device; [0-9.]+ GB free on \S+\): {re.escape(str(final))} is complete but `latest` still names "
        rf"step-00000002; resume from it with train.resume={re.escape(str(final))}",
        str(error.value),
    ), str(error.value)
    assert (checkpoints / "latest").read_text() == "step-00000002"
    assert damaged_files(final) == []  # kept, whole
    monkeypatch.undo()
    summary = train(tiny_config(tiny_data, run, "train.steps=4", f"train.resume={final}"))
    assert summary["step"] == 4 and losses(run) == straight
