"""Process-wide settings made once when the strategy is built: CPU threads and library chatter.

Threads: torch's default pool takes every core of the machine, whatever the process may use and
however many ranks share the node; on a loaded CPU the oversubscribed trainer ran ~4x slower than
with one thread per process. `configure_threads` takes the cores this process may run on
(`os.sched_getaffinity`) divided by the processes on this node (`LOCAL_WORLD_SIZE`, set by torchrun
and the deepspeed launcher), unless the user chose with `OMP_NUM_THREADS` or `MKL_NUM_THREADS` (torchrun
sets OMP_NUM_THREADS=1 for several processes per node), which torch itself applies; a count set lower
beforehand (`torch.set_num_threads`) is kept.

Logging: DeepSpeed and torch log and warn from every rank, so a line shows once per rank.
`quiet_other_ranks` keeps their INFO and WARNING lines and Python warnings on rank 0 only (errors
still show everywhere), and each warning once per process, not once per step.

torch is imported only inside `configure_threads`: importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import warnings

_threads: str | None = None
_quieted: set[int] = set()
LIBRARY_LOGGERS = ("DeepSpeed", "deepspeed", "torch")


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask; the machine's count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def processes_on_node() -> int:
    """Training processes on this node, as the launcher says (`LOCAL_WORLD_SIZE`; a launcher that sets
    only `WORLD_SIZE` is taken to be on one node; 1 without one)."""
    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1), 1)
    except ValueError:
        return 1


def configure_threads() -> str:
    """Set torch's intra-op threads from the usable cores and the processes per node, unless the user
    set them; return a one-line description for the start-up banner. Calling it again changes nothing."""
    global _threads
    if _threads is not None:
        return _threads
    import torch

    cpus, procs = usable_cpus(), processes_on_node()
    where = f"{cpus} CPU{'s' if cpus != 1 else ''} usable, {procs} process{'es' if procs != 1 else ''} on this node"
    user = next((f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if os.environ.get(k)), None)
    if user is None:  # never more than someone set before (a test's or a notebook's torch.set_num_threads(1))
        torch.set_num_threads(min(max(cpus // procs, 1), torch.get_num_threads()))
    n = torch.get_num_threads()
    _threads = f"{n} intra-op thread{'s' if n != 1 else ''} ({user + '; ' if user else ''}{where})"
    return _threads


class _AtLeast(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def _show_once(show):
    """`warnings.showwarning` that shows each (message, category) once per process. Python's own "once"
    forgets what it showed whenever the warning filters change (every `catch_warnings` block does), so
    torch's deprecation warnings came back every step."""
    shown: set[tuple[str, type]] = set()

    def show_once(message, category, filename, lineno, file=None, line=None):
        if (str(message), category) not in shown:
            shown.add((str(message), category))
            show(message, category, filename, lineno, file, line)

    show_once.once = True
    return show_once


def quiet_other_ranks(rank: int) -> None:
    """Library logs and warnings once, not once per rank: on ranks other than 0, DeepSpeed's and torch's
    loggers show errors only and Python warnings are ignored; rank 0 shows each warning once. Safe to
    call again, and before `import deepspeed` (whose logger resets its level on import: the filter stays)."""
    if not getattr(warnings.showwarning, "once", False):
        warnings.showwarning = _show_once(warnings.showwarning)
    if rank == 0 or rank in _quieted:
        return
    _quieted.add(rank)
    warnings.simplefilter("ignore")
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        logger.addFilter(_AtLeast(logging.ERROR))


def requeue_slurm_job() -> str:
    """Put this Slurm job back in the queue (`scontrol requeue $SLURM_JOB_ID`), as a job that saved on Slurm's
    warning signal before its time limit does (launch/train.sbatch: `--signal=USR1@300 --requeue`); the
    requeued job resumes from the run's latest checkpoint. Returns the line to print; outside Slurm, says so."""
    import subprocess

    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "SIGUSR1 outside a Slurm job (no SLURM_JOB_ID): not requeued"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Slurm job {job} NOT requeued: scontrol requeue {job}: {e}; resubmit it (it resumes where it saved)"
    if done.returncode:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return (
            f"Slurm job {job} NOT requeued: scontrol requeue {job}: {why[0]}; resubmit it (it resumes where it saved)"
        )
    return f"Slurm job {job} requeued (scontrol requeue {job}): it resumes from this checkpoint"
