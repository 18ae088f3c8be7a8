"""Where the recipe's tasks run: a process pool here, Ray tasks on a cluster, or a slice of a Slurm array.

An executor only decides where a task runs. Every task is a top-level function of picklable arguments
that writes its outputs under a temporary name, renames them and leaves a completion marker (see
`data_pipeline.raw.stages`), so any task may run twice, be killed or requeued on any machine, and
the outputs are the same under every executor. `run(stage, fn, tasks)` returns the results in task
order; the first failure (a `--strict` stop) is raised as it was raised in the task.

- `LocalExecutor`: `workers` processes on this machine (one: in this process).
- `RayExecutor`: one Ray task per task on an existing cluster (`ray.init(address=...)`; a local Ray when
  no address is given). Ray retries a task whose worker died (`max_retries`).
- `SlurmSlice`: task i runs on array task k of K when i % K == k, over a local pool of the array task's
  CPUs; the stages run as a chain of arrays (`data_pipeline.raw.slurm`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from typing import Any, Callable, Optional, Sequence

from data_pipeline.progress import Progress

Task = tuple  # the arguments of one call of a stage's function


def _call(item: tuple[int, Callable, tuple]) -> tuple[int, Any]:
    index, fn, args = item
    return index, fn(*args)


def _progress(stage: str, n: int, total_bytes: int) -> Progress:
    unit = "files" if stage.startswith("files") else "tasks"
    return Progress(f"recipe {stage}", total_files=n, total_bytes=total_bytes or None, unit=unit)


def _count(progress: Progress, result: Any) -> None:
    """Tasks return a dict; its `docs` and `bytes` (when present) feed the progress line."""
    result = result if isinstance(result, dict) else {}
    progress.update(files=1, docs=int(result.get("docs", 0)), nbytes=int(result.get("bytes", 0)))


class LocalExecutor:
    """A process pool on this machine (spawned: nothing of the parent's state is shared), started at the
    first stage with more than one task and kept for the next ones until `close`."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.pool = None

    def run(self, stage: str, fn: Callable, tasks: Sequence[Task], total_bytes: int = 0) -> list:
        """`fn(*task)` for every task, in task order."""
        results: dict[int, Any] = {}
        if not tasks:
            return []
        with _progress(stage, len(tasks), total_bytes) as progress:
            if self.workers == 1 or len(tasks) <= 1:
                for i, task in enumerate(tasks):
                    results[i] = fn(*task)
                    _count(progress, results[i])
                return [results[i] for i in range(len(tasks))]
            if self.pool is None:
                self.pool = multiprocessing.get_context("spawn").Pool(self.workers)
            try:
                for i, result in self.pool.imap_unordered(_call, [(i, fn, t) for i, t in enumerate(tasks)]):
                    results[i] = result
                    _count(progress, result)
            except BaseException:  # the first error ends the pool at once: no task of it goes on
                self.close()
                raise
        return [results[i] for i in range(len(tasks))]

    def close(self) -> None:
        """Stop the worker processes."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


class RayExecutor:
    """Ray tasks on an existing cluster (`address`, e.g. "auto" or "ray://head:10001"), else a local Ray.

    The project must be importable on the cluster's nodes (installed there, or shipped with
    `runtime_env={"working_dir": ...}` by the user's own `ray.init`); inputs and the output folder must
    be paths (or URLs) every node reaches (relative ones are made absolute by the driver first).
    """

    name = "ray"

    def __init__(self, address: Optional[str] = None, cpus_per_task: float = 1, max_retries: int = 3) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError("executor=ray needs Ray: pip install -e '.[ray]'") from None
        self.ray = ray
        self.owned = not ray.is_initialized()
        self.handlers = {}
        if self.owned:
            if threading.current_thread() is threading.main_thread():  # ray.init replaces them: restored in close
                self.handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            ray.init(address=address or None, log_to_driver=False)
        self.cpus_per_task, self.max_retries = cpus_per_task, max_retries

    def run(self, stage: str, fn: Callable, tasks: Sequence[Task], total_bytes: int = 0) -> list:
        """`fn(*task)` for every task as Ray tasks, in task order; a task's error is raised as it was raised."""
        ray = self.ray
        if not tasks:
            return []
        remote = ray.remote(num_cpus=self.cpus_per_task, max_retries=self.max_retries)(fn)
        refs = [remote.remote(*task) for task in tasks]
        index = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        with _progress(stage, len(tasks), total_bytes) as progress:
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    for ref in done:
                        results[index[ref]] = ray.get(ref)
                        _count(progress, results[index[ref]])
            except ray.exceptions.RayTaskError as e:
                for ref in pending:
                    ray.cancel(ref, force=True)
                cause = e.as_instanceof_cause()
                raise getattr(cause, "cause", None) or cause from None
        return [results[i] for i in range(len(tasks))]

    def close(self) -> None:
        """Disconnect from the cluster when this executor connected (the cluster itself goes on)."""
        if self.owned:
            self.ray.shutdown()
            for sig, handler in self.handlers.items():  # Ray's SIGTERM handler would exit whatever runs next
                signal.signal(sig, handler)


class SlurmSlice:
    """Array task k of K: runs the tasks i with i % K == k over a local pool; the others are not its own."""

    name = "slurm"

    def __init__(self, machine: int, machines: int, workers: int = 1) -> None:
        self.machine, self.machines = machine, machines
        self.local = LocalExecutor(workers)

    def mine(self, n: int) -> list[int]:
        """The indexes of this array task's tasks among `n`."""
        return [i for i in range(n) if i % self.machines == self.machine]

    def run(self, stage: str, fn: Callable, tasks: Sequence[Task], total_bytes: int = 0) -> list:
        """This slice's results, by task index (the other tasks' results are None)."""
        mine = self.mine(len(tasks))
        results: list = [None] * len(tasks)
        for i, result in zip(
            mine, self.local.run(f"{stage} [{self.machine}/{self.machines}]", fn, [tasks[i] for i in mine])
        ):
            results[i] = result
        return results

    def close(self) -> None:
        """Stop the local pool."""
        self.local.close()
