"""A wandb workspace defined in code: `python -m pretrain dashboard ENTITY/PROJECT [--sources a,b] [--dry-run]`.

Panels for what a pretraining team watches daily, on the keys the trainer logs (pretrain/trainer.py through
pretrain/metrics.py): loss and validation loss (blended and per source), perplexity, tokens/sec/GPU, MFU, step
time, data wait, peak memory, grad norm, learning rate, skipped steps, rollbacks and other events, tokens per
source, and benchmark scores; against the step, and again against tokens seen. Needs the `dashboard` extra
(wandb-workspaces); saving needs WANDB_API_KEY (or `wandb login`). No torch import.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from pretrain.config import ConfigError

EVENTS = ("rollback",)  # the names the trainer passes to MetricLogger.event; logged as events/<name>


@dataclass
class Panel:
    """One line chart: explicit metric keys, or a regex over keys where they are not known in advance."""

    title: str
    keys: list[str] = field(default_factory=list)
    regex: Optional[str] = None


def per_source(family: str, sources: Sequence[str]) -> dict[str, Any]:
    """`family/<source>` keys for the given sources, or a regex over the family when none are given."""
    if sources:
        return {"keys": [f"{family}/{s}" for s in sources]}
    return {"regex": f"^{family}/.*"}


def sections(sources: Sequence[str]) -> list[tuple[str, str, list[Panel]]]:
    """(section name, x-axis key, panels): the dashboard without wandb-workspaces, for printing and tests."""
    loss = [
        Panel("Loss (train and validation, blended)", ["loss", "val_loss"]),
        Panel("Validation loss per source", **per_source("val_loss", sources)),
        Panel("Validation perplexity per source", **per_source("val_ppl", sources)),
        Panel("Benchmarks (lm-eval)", regex="^lm_eval/.*"),
    ]
    return [
        ("Loss", "Step", loss),
        (
            "Throughput and systems",
            "Step",
            [
                Panel("Tokens/sec/GPU", ["tokens_per_sec_per_gpu"]),
                Panel("MFU", ["mfu"]),
                Panel("Step time (s)", ["step_time_s"]),
                Panel("Data wait (fraction of step time)", ["data_wait_frac"]),
                Panel("Peak memory (GB)", ["peak_mem_gb"]),
            ],
        ),
        (
            "Optimization and events",
            "Step",
            [
                Panel("Grad norm", ["grad_norm"]),
                Panel("Learning rate", ["lr"]),
                Panel("Skipped steps (non-finite loss)", ["skipped_steps"]),
                Panel("Events (rollbacks)", [f"events/{name}" for name in EVENTS]),
            ],
        ),
        ("Data", "Step", [Panel("Tokens seen per source", **per_source("tokens_seen", sources))]),
        ("By tokens seen", "tokens_seen", [Panel(p.title, p.keys, p.regex) for p in loss]),
    ]


def spec_dict(entity: str, project: str, sources: Sequence[str], name: str) -> dict[str, Any]:
    """The dashboard as plain data (what --dry-run prints)."""
    return {
        "entity": entity,
        "project": project,
        "name": name,
        "sections": [
            {"name": s, "x_axis": x, "panels": [{"title": p.title, "keys": p.keys, "regex": p.regex} for p in panels]}
            for s, x, panels in sections(sources)
        ],
    }


def workspace_spec(entity: str, project: str, sources: list[str], name: str = "LLaMA pretraining"):
    """The wandb_workspaces Workspace: one section per group of panels, the first ones against the step."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise ConfigError("dashboard needs wandb-workspaces: pip install 'llama-pretrain[dashboard]'") from None

    def line_plot(panel: Panel, x: str):
        if panel.regex:
            return wr.LinePlot(title=panel.title, x=x, y=panel.keys, metric_regex=panel.regex)
        return wr.LinePlot(title=panel.title, x=x, y=panel.keys)

    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        settings=ws.WorkspaceSettings(x_axis="Step"),
        sections=[
            ws.Section(
                name=section,
                is_open=True,
                panels=[line_plot(p, x) for p in panels],
                panel_settings=ws.SectionPanelSettings(x_axis=x),
            )
            for section, x, panels in sections(sources)
        ],
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `dashboard` command's arguments."""
    p = subparsers.add_parser(
        "dashboard",
        help="save a wandb workspace with the training panels (needs the dashboard extra)",
        description="Save a wandb workspace (a saved view of ENTITY/PROJECT) with panels for loss and validation "
        "loss per source, throughput, MFU, memory, data wait, grad norm, lr, skipped steps, events and tokens per "
        "source, against the step and against tokens seen. Needs WANDB_API_KEY (or `wandb login`) unless --dry-run.",
    )
    p.add_argument("project", help="ENTITY/PROJECT, e.g. my-team/llama-pretrain")
    p.add_argument("--sources", help="comma-separated data sources for the per-source panels (default: any)")
    p.add_argument("--name", default="LLaMA pretraining", help="the workspace's name")
    p.add_argument("--dry-run", action="store_true", help="print the panels as JSON; save nothing")


def main(args: argparse.Namespace) -> None:
    """Build the workspace; print it (--dry-run) or save it and print its URL."""
    entity, slash, project = args.project.partition("/")
    if not entity or not slash or not project or "/" in project:
        raise ConfigError(f"dashboard {args.project!r}: expected ENTITY/PROJECT, e.g. my-team/llama-pretrain")
    sources = [s.strip() for s in (args.sources or "").split(",") if s.strip()]
    workspace = workspace_spec(entity, project, sources, args.name)  # checks the extra is installed
    if args.dry_run:
        print(json.dumps(spec_dict(entity, project, sources, args.name), indent=2))
        return
    if not os.environ.get("WANDB_API_KEY") and not _logged_in():
        raise ConfigError("dashboard: no wandb credentials; set WANDB_API_KEY (or run `wandb login`), or --dry-run")
    workspace.save()
    print(f"saved workspace {args.name!r}: {workspace.url}")


def _logged_in() -> bool:
    """Whether `wandb login` left an API key (in ~/.netrc)."""
    try:
        import wandb

        return bool(wandb.Api().api_key)
    except Exception:
        return False
