"""Running the recipe: every stage in order on an executor (a local pool or Ray), or one stage's slice.

`run_recipe(cfg)` is what `python -m data_pipeline recipe CONFIG` does on one machine or on Ray; on Slurm
each array task calls `run_stage` for its stage and slice (`slurm.py` submits the chain).
"""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.configfile import ConfigError
from data_pipeline.raw.common import byte_range
from data_pipeline.raw.executors import LocalExecutor, RayExecutor
from data_pipeline.raw.recipe import RecipeConfig, absolute_paths, is_url, validate_recipe
from data_pipeline.raw.stages import STAGES, function, tasks
from data_pipeline.shards import remove_stale_temporaries


def make_executor(cfg: RecipeConfig):
    """The executor of `cfg.executor` for running stages from here (Slurm stages run as arrays instead)."""
    if cfg.executor == "ray":
        return RayExecutor(cfg.ray_address, cpus_per_task=1)
    return LocalExecutor(cfg.workers)


def _input_bytes(entry: str) -> int:
    """The bytes a `files` task reads: a local file's size or its byte range's (0 for URLs and folders)."""
    file, lines = byte_range(entry)
    if lines:
        return lines[1] - lines[0]
    return Path(file).stat().st_size if not is_url(file) and Path(file).is_file() else 0


def run_stage(cfg: RecipeConfig, stage: str, executor) -> list:
    """Every task of one stage (see `stages.STAGES`) on `executor`; relative paths of `cfg` name folders
    of this process's working directory (`recipe.absolute_paths`), wherever the tasks run."""
    if stage not in STAGES:
        raise ConfigError(f"stage {stage!r}: choose from {', '.join(STAGES)}")
    cfg = absolute_paths(cfg)
    work = tasks(stage, cfg)
    total = sum(_input_bytes(t[2]) for t in work) if stage == "files" else 0
    return executor.run(stage, function(stage), work, total_bytes=total)


def run_recipe(cfg: RecipeConfig, executor=None) -> dict[str, dict]:
    """Run every stage of every source here or on Ray; write and return the reports (by source name)."""
    validate_recipe(cfg)
    cfg = absolute_paths(cfg)
    for source in cfg.sources:  # what writers killed in an earlier run left
        remove_stale_temporaries(Path(cfg.output) / source.name)
        remove_stale_temporaries(Path(cfg.output) / source.name / "files")
    mine = executor is None
    executor = executor or make_executor(cfg)
    try:
        for stage in STAGES:
            run_stage(cfg, stage, executor)
    finally:
        if mine:
            executor.close()
    return {s.name: json.loads((Path(cfg.output) / s.name / "report.json").read_text()) for s in cfg.sources}
