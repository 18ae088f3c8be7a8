"""Metrics histories that survive resumes and rollbacks (metrics.jsonl, offline wandb, TensorBoard); the dashboard."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from wandb_history import offline_history, offline_segments, read_segment

from conftest import DEBUG_EXPERIMENT, ROOT, tiny_config, tiny_overrides

pytest.importorskip("wandb")


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_history(run_dir: Path) -> list[dict]:
    """metrics.jsonl as wandb rows: one per step, with the values of its records (an event as `events/<name>` = 1
    and its numeric fields as `events/<name>/<field>`; nulls left out)."""
    rows: dict[int, dict] = {}
    for record in jsonl(run_dir):
        row = rows.setdefault(record["step"], {"step": record["step"]})
        if "event" in record:
            name = record["event"]
            row[f"events/{name}"] = 1
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            row.update({f"events/{name}/{k}": v for k, v in numbers.items()})
        else:
            row.update({k: v for k, v in record.items() if v is not None})
    return list(rows.values())


def superseded_segments(run_dir: Path) -> list:
    """The offline segments the logger moved out of `wandb sync`'s reach (their history went into a later one)."""
    return [read_segment(f) for f in sorted((run_dir / "wandb" / "superseded").glob("*/run-*.wandb"))]


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a tag as TensorBoard shows it (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


COMMON = [
    "train.steps=4",
    "train.save_every=2",
    "train.keep_last=5",
    "train.eval_every=2",
    "train.eval_batches=1",
    "wandb.mode=offline",
    "wandb.group=ablation-a",
    "wandb.job_type=pretrain",
    "wandb.notes=rewind test",
    "metrics.tensorboard=true",
]


@pytest.fixture(scope="module")
def rerun(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """A 4-step run with evaluations, then a re-run of steps 3..4 from its step-2 checkpoint (as after a crash):
    (run folder, the first run's training records by step)."""
    pytest.importorskip("tensorboard")
    from pretrain.trainer import train

    run = tmp_path_factory.mktemp("rerun") / "run"
    train(tiny_config(tiny_data, run, *COMMON))
    first = {r["step"]: r for r in jsonl(run) if "loss" in r}
    train(tiny_config(tiny_data, run, *COMMON, f"train.resume={run / 'checkpoints' / 'step-00000002'}"))
    return run, first


def test_resume_from_an_older_checkpoint_rewinds_every_history(rerun):
    """A crash re-runs steps 3..4: wandb (offline files), metrics.jsonl and TensorBoard show each step once, and
    the re-run's values."""
    run, first = rerun
    records = jsonl(run)
    steps = {r["step"]: r for r in records if "loss" in r}
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert all(r["tokens_seen"] == r["step"] * 256 for r in records if "val_loss" in r)  # eval records too
    assert steps[2]["step_time_s"] == first[2]["step_time_s"] and steps[4]["step_time_s"] != first[4]["step_time_s"]

    history = offline_history(run)
    assert [r["step"] for r in history] == [1, 2, 3, 4]  # each once, no holes
    for row in history:  # the re-run's values from step 3 on, the first run's before
        for key in ("loss", "step_time_s", "tokens_seen"):
            assert row[key] == steps[row["step"]][key], (row["step"], key)
    assert history[3]["val_loss"] == next(r["val_loss"] for r in records if r.get("val_loss") and r["step"] == 4)

    assert history == expected_history(run)
    # offline, nothing to branch from: one segment, the same run id, the whole history (syncs to any server);
    # the first run's segment is set aside, out of `wandb sync`'s reach
    segments, superseded = offline_segments(run), superseded_segments(run)
    assert len(segments) == 1 and segments[0].branch_run == ""
    assert [s.run_id for s in superseded] == [segments[0].run_id] and len(superseded[0].history) == 4
    assert (segments[0].group, segments[0].job_type, segments[0].notes) == ("ablation-a", "pretrain", "rewind test")
    assert segments[0].metrics["loss"] == "tokens_seen" and segments[0].metrics["val_loss"] == "tokens_seen"

    loss = tensorboard_scalars(run, "loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert [v for _, v in tensorboard_scalars(run, "step_time_s")] == pytest.approx(
        [steps[s]["step_time_s"] for s in range(1, 5)]
    )


def train_record(step: int, loss: float) -> dict:
    """A training record with every key the trainer logs (the console line prints them)."""
    keys = ("lr", "grad_norm", "tokens_per_sec_per_gpu", "tflops_per_gpu", "step_time_s", "data_wait_frac")
    return {"step": step, "loss": loss, **dict.fromkeys(keys, 1.0), "mfu": None, "peak_mem_gb": 1.0}


def logger_config(run_dir: Path, *overrides: str):
    from conftest import DEBUG_EXPERIMENT
    from pretrain.config import load_config

    return load_config(
        DEBUG_EXPERIMENT,
        [f"train.run_dir={run_dir}", "wandb.mode=offline", "metrics.tensorboard=true", *overrides],
    )


@pytest.mark.parametrize("mode", ["rewind", "fork"])
def test_rollback_mid_run_keeps_each_step_once(tmp_path, mode):
    """logger.rewind(2) after step 5 (a loss-spike rollback), then an event and steps 3..6 again."""
    pytest.importorskip("tensorboard")
    from pretrain.metrics import MetricLogger

    cfg = logger_config(tmp_path, f"wandb.history={mode}")
    logger = MetricLogger(tmp_path, cfg, "firstrun0001", 0)
    for step in range(1, 6):
        logger.log(train_record(step, 10.0 + step))
    logger.rewind(2)
    logger.event(2, "rollback", {"from_step": 5, "to_step": 2, "skipped_batches": 3, "why": "spike"})
    for step in range(3, 7):
        logger.log(train_record(step, 20.0 + step))
    logger.close()

    records = jsonl(tmp_path)
    assert all(r["tokens_seen"] == r["step"] * cfg.train.global_batch_tokens for r in records if "loss" in r)
    assert [(r["step"], "event" in r) for r in records] == [(1, 0), (2, 0), (2, 1), (3, 0), (4, 0), (5, 0), (6, 0)]
    assert records[2] == {"step": 2, "event": "rollback", "from_step": 5, "to_step": 2, "skipped_batches": 3,
                          "why": "spike"}  # fmt: skip
    expected = [11.0, 12.0, 23.0, 24.0, 25.0, 26.0]

    history = offline_history(tmp_path)
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in history] == expected
    assert history[1]["events/rollback"] == 1 and history[1]["events/rollback/skipped_batches"] == 3  # at step 2
    assert history == expected_history(tmp_path)
    segments = offline_segments(tmp_path)
    assert segments[-1].run_id == logger.run_id and segments[-1].branch_run == ""  # offline: no branch point
    if mode == "fork":  # a new run; the first stays a run of its own
        assert logger.run_id != "firstrun0001" and [s.run_id for s in segments] == ["firstrun0001", logger.run_id]
    else:  # the same run, its first segment set aside
        assert logger.run_id == "firstrun0001" and len(segments) == 1
        assert [s.run_id for s in superseded_segments(tmp_path)] == ["firstrun0001"]

    assert [v for _, v in tensorboard_scalars(tmp_path, "loss")] == expected
    assert [s for s, _ in tensorboard_scalars(tmp_path, "events/rollback")] == [2]


def test_plain_resume_would_lose_the_rerun_steps(tmp_path):
    """The reader is no rubber stamp: without a rewind, re-logged steps are not shown (what the issue reports)."""
    import wandb

    for segment in range(2):
        run = wandb.init(project="p", id="plain0000001", resume="allow", mode="offline", dir=str(tmp_path))
        for step in range(1 + 2 * segment, 5 + 2 * segment):  # 1..4, then 3..6 after a crash at 4
            run.log({"loss": 10.0 * segment + step}, step=step)
        run.finish()
    assert [(r["step"], r["loss"]) for r in offline_history(tmp_path)] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 15),
                                                                          (6, 16)]  # fmt: skip


def test_tensorboard_needs_its_package_and_says_so(tmp_path, monkeypatch):
    import sys

    from pretrain.config import ConfigError
    from pretrain.metrics import MetricLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match="metrics.tensorboard=true needs the tensorboard package"):
        MetricLogger(tmp_path, logger_config(tmp_path, "wandb.mode=disabled"), "x", 0)


def test_forked_history_survives_a_second_resume(tiny_data, tmp_path):
    """wandb.history=fork, offline: each resume starts a new run (its id saved in the later checkpoints) that
    carries the whole history, so the last run's charts show each step once with the latest values."""
    from pretrain.trainer import train

    run = tmp_path / "run"
    common = ["train.save_every=2", "train.keep_last=5", "wandb.mode=offline", "wandb.history=fork"]
    train(tiny_config(tiny_data, run, "train.steps=4", *common))
    older = run / "checkpoints" / "step-00000002"
    train(tiny_config(tiny_data, run, "train.steps=4", *common, f"train.resume={older}"))
    train(tiny_config(tiny_data, run, "train.steps=6", *common, "train.resume_changes=[train.steps]"))
    steps = {r["step"]: r for r in jsonl(run) if "loss" in r}
    history = offline_history(run)
    assert len({s.run_id for s in offline_segments(run)}) == 3
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert [r["step_time_s"] for r in history] == [steps[s]["step_time_s"] for s in range(1, 7)]


def logged_keys(run_dir: Path) -> set[str]:
    """The keys a real run logged to wandb: its metrics.jsonl records, plus events/<name> for each event the
    trainer can log (the names it passes to logger.event, read from its source)."""
    import pretrain.trainer

    keys = {k for r in jsonl(run_dir) if "event" not in r for k in r if k != "step"}
    events = re.findall(r"logger\.event\([^,]+,\s*\"(\w+)\"", Path(pretrain.trainer.__file__).read_text())
    assert events, "the trainer logs no events any more: update this test and EVENTS in pretrain/dashboard.py"
    return keys | {f"events/{name}" for name in events}


def test_dashboard_panels_use_the_keys_the_trainer_logs(rerun, tiny_data):
    pytest.importorskip("wandb_workspaces")
    from pretrain.dashboard import spec_dict, workspace_spec

    run, _ = rerun
    keys = logged_keys(run)
    spec = spec_dict("team", "proj", tiny_data["sources"], "LLaMA")
    panels = [p for section in spec["sections"] for p in section["panels"]]
    for panel in panels:
        assert set(panel["keys"]) <= keys, (panel["title"], set(panel["keys"]) - keys)
        if panel["regex"] and not panel["regex"].startswith("^lm_eval/"):  # no benchmark in this run
            assert any(re.match(panel["regex"], k) for k in keys), panel
    shown = {k for p in panels for k in p["keys"]}
    for family in ("val_loss/", "val_ppl/", "tokens_seen/"):  # every source in the per-source panels
        assert {k for k in keys if k.startswith(family)} <= shown, family
    for key in ("loss", "val_loss", "tokens_per_sec_per_gpu", "mfu", "grad_norm", "lr", "peak_mem_gb",
                "data_wait_frac", "skipped_steps", "events/rollback"):  # fmt: skip
        assert key in shown, key
    assert [s["x_axis"] for s in spec["sections"]][-1] == "tokens_seen"

    workspace = workspace_spec("team", "proj", tiny_data["sources"], "LLaMA")
    assert [[(p.title, list(p.y or []), p.x) for p in s.panels] for s in workspace.sections] == [
        [(p["title"], p["keys"], s["x_axis"]) for p in s["panels"]] for s in spec["sections"]
    ]
    view = workspace._to_model()  # what save() sends, built without a server
    assert view.entity == "team" and view.project == "proj"


def test_dashboard_dry_run_prints_the_spec_and_bad_input_is_one_line(capsys, monkeypatch):
    pytest.importorskip("wandb_workspaces")
    from pretrain import dashboard
    from pretrain.__main__ import main

    assert main(["dashboard", "team/proj", "--sources", "arxiv,github", "--name", "N", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == dashboard.spec_dict("team", "proj", ["arxiv", "github"], "N")
    assert "val_loss/arxiv" in printed["sections"][0]["panels"][1]["keys"]

    assert main(["dashboard", "teamproj", "--dry-run"]) == 2
    assert "expected ENTITY/PROJECT" in capsys.readouterr().err
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(dashboard, "_logged_in", lambda: False)
    assert main(["dashboard", "team/proj"]) == 2
    assert "set WANDB_API_KEY" in capsys.readouterr().err


@pytest.mark.parametrize("branching", ["auto", "rewind", "rewind fails"])
def test_on_wandb_cloud_the_run_branches_where_the_server_still_agrees(tmp_path, monkeypatch, capsys, branching):
    """On W&B's cloud the logger forks the run (by default, as W&B recommends) or rewinds it (`wandb.history=rewind`;
    where rewind fails, as without W&B's preview, it forks) at the last step the server holds, at most S - 1, and
    sends the rows after it again from metrics.jsonl. Here the server answers step 2 (it lost steps 3 and 4) and
    the run rolls back to step 3."""
    import wandb

    from pretrain import metrics
    from pretrain.metrics import MetricLogger

    overrides = ["metrics.tensorboard=false", f"wandb.history={branching.split()[0]}"]
    logger = MetricLogger(tmp_path, logger_config(tmp_path, *overrides), "firstrun0002", 0)
    for step in (1, 2, 3, 4):
        logger.log(train_record(step, float(step)))
    monkeypatch.setattr(metrics, "server_last_step", lambda mode, entity, project, run_id: 2)
    real_init, tried = wandb.init, []

    def init(**kwargs):
        tried.append("rewind" if "resume_from" in kwargs else "fork" if "fork_from" in kwargs else "new")
        if "resume_from" in kwargs and branching == "rewind fails":
            raise wandb.errors.CommError("failed to rewind run: unknown mutation rewindRun")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    logger.rewind(3)
    logger.event(3, "rollback", {"from_step": 4})
    logger.log(train_record(4, 40.0))
    logger.close()

    segment = offline_segments(tmp_path)[-1]
    assert (segment.branch_run, segment.branch_step) == ("firstrun0002", 2)
    assert [r["step"] for r in segment.history] == [3, 4]  # sent again: step 3 only
    assert tried == {"auto": ["fork"], "rewind": ["rewind"], "rewind fails": ["rewind", "fork"]}[branching]
    assert (logger.run_id != "firstrun0002") == (branching != "rewind")
    history = offline_history(tmp_path, logger.run_id)
    assert [(r["step"], r["loss"]) for r in history] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert history == expected_history(tmp_path)
    failed = "rewind of run firstrun0002 at step 2 failed (failed to rewind run" in capsys.readouterr().out
    assert failed == (branching == "rewind fails")


# --- killed runs: the history wandb lost is sent again from metrics.jsonl --------------------------------------

# wandb writes its offline file in whole 32 KiB blocks, and every 15 s (wandb >= 0.2x); without the timer, a process
# killed in its first block leaves the 7-byte header only, as in the issue. The children get this environment.
NO_FLUSH = {**os.environ, "WANDB_SILENT": "true", "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0"}


def start(args: list[str], out) -> subprocess.Popen:
    """`python *args` in its own session (so that its process group can be signalled), its output to `out`."""
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=NO_FLUSH, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def signal_when(proc: subprocess.Popen, ready, sig: signal.Signals, log: Path) -> None:
    """Send `sig` to the process group of `proc` (its wandb service too, as a node failure or a scheduler does)
    once `ready()` is true, and wait for it to end."""
    deadline = time.monotonic() + 300
    try:
        while not ready():
            assert proc.poll() is None, f"it ended before the signal (exit {proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"not ready in 300 s:\n{log.read_text()}"
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


CRASH = ["train.steps=12", "train.save_every=2", "train.keep_last=10", "train.eval_every=4", "train.eval_batches=1",
         "wandb.mode=offline"]  # fmt: skip


@pytest.mark.parametrize(
    "sig, history",
    [(signal.SIGKILL, "rewind"), (signal.SIGKILL, "fork"), (signal.SIGTERM, "rewind")],
    ids=["SIGKILL-rewind", "SIGKILL-fork", "SIGTERM-rewind"],
)
def test_a_killed_run_resumed_to_the_end_has_every_step_of_metrics_jsonl_in_wandb(tiny_data, tmp_path, sig, history):
    """`python -m pretrain train` killed after 5 records (SIGKILL: wandb had written none of them; SIGTERM: it saves
    and stops), then resumed to the end from its last checkpoint: the offline wandb files, as the server shows them
    after `wandb sync`, hold every step of metrics.jsonl once, with its values."""
    from pretrain.trainer import train

    run, log = tmp_path / "run", tmp_path / "killed.log"
    overrides = [*CRASH, f"wandb.history={history}"]
    command = ["-m", "pretrain", "train", str(DEBUG_EXPERIMENT), *tiny_overrides(tiny_data, run, *overrides)]
    with open(log, "w") as out:
        proc = start(command, out)
        metrics, latest = run / "metrics.jsonl", run / "checkpoints" / "latest"
        signal_when(proc, lambda: latest.exists() and len(metrics.read_text().splitlines()) >= 5, sig, log)
    killed = jsonl(run)
    assert 5 <= len(killed) and killed[-1]["step"] < 12
    if sig == signal.SIGKILL:  # the crash lost what metrics.jsonl has: the killed segment holds no record
        assert proc.returncode == -signal.SIGKILL and offline_segments(run) == []
    else:  # saved at the step it stopped, and wandb finished
        assert proc.returncode == 0 and offline_history(run) == expected_history(run)

    train(tiny_config(tiny_data, run, *overrides))
    history = offline_history(run)
    assert [r["step"] for r in history] == list(range(1, 13))
    assert history == expected_history(run)


ROLLBACK_THEN_WAIT = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_wandb import logger_config, train_record
from pretrain.metrics import MetricLogger

run = Path(sys.argv[2])
logger = MetricLogger(run, logger_config(run, "metrics.tensorboard=false"), "rollback0001", 0)
for step in range(1, 6):
    logger.log(train_record(step, 10.0 + step))
logger.rewind(2)
logger.event(2, "rollback", {"from_step": 5, "skipped_batches": 3})
for step in (3, 4):
    logger.log(train_record(step, 20.0 + step))
print("KILL ME", logger.run_id, flush=True)
time.sleep(600)
"""


def test_a_run_killed_after_a_rollback_keeps_the_rolled_back_history(tmp_path):
    """A rollback to step 2 after step 5, steps 3..4 again, then SIGKILL before wandb wrote the new segment; resumed
    from a checkpoint at step 4: wandb shows metrics.jsonl (the first steps 1..2, the event, the new 3..6)."""
    from pretrain.metrics import MetricLogger

    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = start(["-c", ROLLBACK_THEN_WAIT, str(ROOT / "tests"), str(tmp_path)], out)
        signal_when(proc, lambda: "KILL ME" in log.read_text(), signal.SIGKILL, log)
    run_id = log.read_text().split("KILL ME ")[1].split()[0]
    assert offline_segments(tmp_path) == []  # the first segment was set aside at the rollback, the second lost

    logger = MetricLogger(tmp_path, logger_config(tmp_path, "metrics.tensorboard=false"), run_id, 4)
    for step in (5, 6):
        logger.log(train_record(step, 20.0 + step))
    logger.close()
    history = offline_history(tmp_path)
    assert [(r["step"], r["loss"]) for r in history] == [(1, 11), (2, 12), (3, 23), (4, 24), (5, 25), (6, 26)]
    assert history[1]["events/rollback"] == 1
    assert history == expected_history(tmp_path)
