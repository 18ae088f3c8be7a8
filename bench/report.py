"""What every bench result states about where, when and how it was measured, and how it is written."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

from pretrain.checkpoint import code_version


def provenance(device: torch.device, precision: str) -> list[str]:
    """The device (the GPU's name, or the CPU and its cores), precision, torch, date, commit and command."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    when = f"date {datetime.date.today()}, commit {code_version()}"
    return [
        f"device: {name}, {precision}, torch {torch.__version__}, {when}",
        f"command: python {' '.join(sys.argv)}",
    ]


def publish(lines: list[str], out: Path | None) -> None:
    """Print the Markdown result and, with `out`, write it there too."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
