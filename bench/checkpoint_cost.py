"""CPU cost of the trainer's checkpoint save and resume against bare `torch.distributed.checkpoint`.

The reference is what a user of plain PyTorch writes: `get_state_dict` of model and AdamW, `dcp.save` of
{"model", "optimizer"} into a folder (and `dcp.load` + `set_state_dict` to resume). Ours is the trainer's
`CheckpointManager.save` / `.load` of the same model and optimizer (the DCP files plus RNG, trainer.pt,
checksums.json with the size and sha256 of every file, the atomic rename and `latest`), synchronous and
asynchronous (`train.async_save`: the copy to CPU memory now, the write in a background thread; the
reference is `dcp.async_save`). The two sides alternate, `--repeats` times each, each first every other
time, after a warm-up round; before each, every file written is synced and dropped from the page cache (no
side pays for writing back the other's pages; resumes read from disk, as after a restart); each is measured
in CPU seconds of this process (user + system, every thread, including
the background writer), read from `resource.getrusage` around the call and, for async, until its
future is done. Reported: the median of the rounds' ratios ours / dcp (the two runs of a round are made one
after the other, so they meet the same machine) with its quartiles, each side's median, every run, the load
average before and after.

    python bench/checkpoint_cost.py --out bench/results/2026-12-07-checkpoint-cost.md
    python bench/checkpoint_cost.py --dim 512 --layers 4 --repeats 3      # a quicker look
    python bench/checkpoint_cost.py --folder /dev/shm                    # in memory: no disk behind the page cache
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

from bench.report import provenance, publish  # noqa: E402
from pretrain.checkpoint import CheckpointManager  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.parallel import build_strategy  # noqa: E402


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def measured(action) -> tuple[float, float]:
    """(user, system) CPU seconds `action()` takes (a returned future waited for: an async save's writer thread
    counts)."""
    user, system = cpu_seconds()
    future = action()
    if hasattr(future, "result"):
        future.result()
    after = cpu_seconds()
    return after[0] - user, after[1] - system


def reference_save(model, optimizer, folder: Path, asynchronous: bool):
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if asynchronous:
        return dcp.async_save(state, checkpoint_id=str(folder), no_dist=True)
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return None


def reference_load(model, optimizer, folder: Path) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def filesystem(folder: Path) -> str:
    """The type of the file system `folder` is on (from /proc/mounts), e.g. ext4 or tmpfs."""
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if str(folder.resolve()).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def evict(folder: Path) -> None:
    """Write every file under `folder` to disk and drop it from the page cache: each side starts with no dirty
    pages of the other to write back and reads a checkpoint from disk, as a resume after a restart does."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def one_round(i: int, asynchronous: bool, base: Path, strategy, model, optimizer, common: dict, times: dict) -> None:
    """Round `i`: save with each side (and, for a synchronous save, resume from it), each first every other
    round, the files on disk and out of the page cache before each (`evict`); round -1 is not counted."""
    kind = "async save" if asynchronous else "save"
    ref, ours = base / f"ref-{i}-{kind[0]}", base / f"ours-{i}-{kind[0]}"
    manager, reader = CheckpointManager(ours, strategy, keep_last=1000), CheckpointManager(ours, strategy, 1000)

    def save_ours():
        manager.save(i + 1, model, optimizer, common, asynchronous)
        manager.wait()

    pairs = [
        [(f"{kind}: dcp", lambda: reference_save(model, optimizer, ref, asynchronous)), (f"{kind}: ours", save_ours)]
    ]
    if not asynchronous:
        pairs.append(
            [
                ("resume: dcp", lambda: reference_load(model, optimizer, ref)),
                ("resume: ours", lambda: reader.load(reader.latest(), model, optimizer)),
            ]
        )
    for pair in pairs:
        for name, action in pair if i % 2 == 0 else pair[::-1]:
            evict(base)
            spent = measured(action)
            if i >= 0:
                times.setdefault(name, []).append(spent)
    shutil.rmtree(ref)
    shutil.rmtree(ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    overrides = [
        f"model.dim={args.dim}",
        f"model.n_layers={args.layers}",
        f"model.vocab_size={args.vocab}",
        f"model.n_heads={args.dim // 64}",
        f"model.n_kv_heads={args.dim // 64}",
        "train.device=cpu",
        "train.precision=fp32",
    ]
    cfg = load_config(ROOT / "configs/model/debug.yaml", overrides)
    strategy = build_strategy(cfg)
    model, optimizer = strategy.setup(cfg)
    model(torch.randint(0, args.vocab, (1, 16)), torch.randint(0, args.vocab, (1, 16))).backward()
    optimizer.step()  # AdamW's moments exist, as in any checkpoint of a run
    optimizer.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in model.parameters())
    common = {"scheduler": {"last_epoch": 1}, "data": {"position": 0}, "config": {"model": {}}}

    base = Path(tempfile.mkdtemp(prefix="ckpt-cost-", dir=args.folder))
    times: dict[str, list[tuple[float, float]]] = {}
    load_before = os.getloadavg()
    try:
        for i in range(-1, args.repeats):  # round -1 warms up (allocations, imports) and is not counted
            for asynchronous in (False, True):
                one_round(i, asynchronous, base, strategy, model, optimizer, common, times)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()

    size_gb = n_params * 4 * 3 / 1e9
    lines = [
        "# Checkpoint save and resume: CPU seconds against bare torch.distributed.checkpoint",
        "",
        *provenance(torch.device("cpu"), "fp32"),
        f"model: dim {args.dim}, {args.layers} layers, vocab {args.vocab}: {n_params / 1e6:.1f} M parameters, "
        f"{size_gb:.2f} GB of model + AdamW state; {args.repeats} repeats per side, alternating; written to "
        f"{base.parent} ({filesystem(base.parent)})",
        f"load average (1/5/15 min): before {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"after {'/'.join(f'{x:.2f}' for x in load_after)}",
        "",
        "CPU seconds per operation. The same operation's CPU time varies up to 2x from run to run on this shared",
        "machine (mostly the kernel's: system time), so each round's two runs, made one after the other, are",
        "compared: a ratio is the median of the per-round ratios ours / dcp, with its quartiles; user time is the",
        "Python and C++ work of each side (serialising, hashing), system time the kernel's (page cache, disk).",
        "",
        "| operation | ours / dcp, user + system | quartiles | ours / dcp, user | quartiles | dcp: median s "
        "(user + system) | ours: median s | every run, dcp (user+system) | every run, ours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("save", "async save", "resume"):
        ref, ours = times[f"{kind}: dcp"], times[f"{kind}: ours"]
        total_ref, total_ours = [sum(t) for t in ref], [sum(t) for t in ours]
        cells = []
        for mine, theirs in ((total_ours, total_ref), ([t[0] for t in ours], [t[0] for t in ref])):
            ratios = [o / r for o, r in zip(mine, theirs)]
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            cells += [f"{statistics.median(ratios):.2f}x", f"{q1:.2f}-{q3:.2f}"]
        lines.append(
            f"| {kind} | {' | '.join(cells)} | {statistics.median(total_ref):.2f} | "
            f"{statistics.median(total_ours):.2f} | {' '.join(f'{t:.2f}' for t in total_ref)} | "
            f"{' '.join(f'{t:.2f}' for t in total_ours)} |"
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
