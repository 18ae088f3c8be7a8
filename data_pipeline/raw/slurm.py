"""The recipe on a Slurm cluster: each stage a job array, chained with `--dependency=afterok`.

`python -m data_pipeline recipe CONFIG executor=slurm machines=K` submits one array per stage
(`launch/recipe.sbatch`, K array tasks; the one-task-per-source stages get at most one array task per
source, the report one) and returns at once; Slurm starts each stage when the one before it has ended
well. Array task k of a stage runs that stage's tasks i with i % K == k (`--stage S --machine k/K`).
A killed, failed or requeued array task leaves the later stages waiting (DependencyNeverSatisfied);
submit the chain again and every task finished before is skipped by its marker.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Sequence

from data_pipeline.raw.stages import STAGES

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "recipe.sbatch"
PER_SOURCE = ("plan", "near-greedy", "count")


def array_size(stage: str, machines: int, sources: int) -> int:
    """How many array tasks a stage gets."""
    if stage == "report":
        return 1
    return min(machines, sources) if stage in PER_SOURCE else machines


def submit(
    config: str, overrides: Sequence[str], machines: int, sources: int, sbatch_args: Sequence[str] = ()
) -> list[str]:
    """Submit every stage as an array depending on the one before; returns the job ids in stage order.
    The array tasks run in this directory (`--chdir`), so relative paths of the config name the same files."""
    if not SCRIPT.is_file():
        raise ValueError(f"{SCRIPT} is missing: executor=slurm runs from a clone of the repository")
    jobs: list[str] = []
    for stage in STAGES:
        n = array_size(stage, machines, sources)
        command = ["sbatch", "--parsable", f"--array=0-{n - 1}", f"--job-name=recipe-{stage}"]
        command += [f"--chdir={os.getcwd()}", f"--export=ALL,RECIPE_CONFIG={config},RECIPE_STAGE={stage}", *sbatch_args]
        if jobs:
            command.append(f"--dependency=afterok:{jobs[-1]}")
        try:
            out = subprocess.run([*command, str(SCRIPT), *overrides], capture_output=True, text=True, check=True)
        except FileNotFoundError:
            raise ValueError("executor=slurm: sbatch is not on PATH (run this on a Slurm login node)") from None
        except subprocess.CalledProcessError as e:
            raise ValueError(f"sbatch refused stage {stage}: {e.stderr.strip()}") from None
        jobs.append(out.stdout.strip().split(";")[0])
    return jobs
