"""`train.profile_steps=[first, last]`: a torch.profiler trace of those optimizer steps on every rank.

Each rank writes `<run_dir>/profile/rank<NNNNN>.<time>.pt.trace.json` (torch.profiler's
`tensorboard_trace_handler`): the Chrome trace format that TensorBoard's profile plugin
(`tensorboard --logdir <run_dir>/profile`) and Perfetto (ui.perfetto.dev) open. CPU and, on a GPU, CUDA
activity, tensor shapes and memory allocations are recorded; each step is one `ProfilerStep#N` span.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


class StepProfiler:
    """Starts torch.profiler before step `first` and stops it after step `last` (1-based optimizer steps);
    nothing without `steps`."""

    def __init__(self, steps: list[int], run_dir: str | Path, rank: int, device: torch.device):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.folder = Path(run_dir) / "profile"
        self.rank, self.device = rank, device
        self._profile: Optional[torch.profiler.profile] = None

    def before(self, step: int) -> None:
        """Call before optimizer step `step` runs."""
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        handler = torch.profiler.tensorboard_trace_handler(str(self.folder), worker_name=f"rank{self.rank:05d}")
        window = torch.profiler.schedule(wait=0, warmup=0, active=self.last - self.first + 1, repeat=1)
        self._profile = torch.profiler.profile(
            activities=activities, schedule=window, record_shapes=True, profile_memory=True, on_trace_ready=handler
        )
        self._profile.start()

    def after(self, step: int) -> Optional[Path]:
        """Call after optimizer step `step`: marks the step, and after the last one writes the trace; returns
        the folder then."""
        if self._profile is None:
            return None
        self._profile.step()  # closes this step's ProfilerStep span; after the last, writes the trace
        if step < self.last:
            return None
        return self.close()

    def close(self) -> Optional[Path]:
        """Stop and write the trace now (the run ended inside the window); returns the folder, None if idle."""
        if self._profile is None:
            return None
        self._profile.stop()
        self._profile = None
        return self.folder
