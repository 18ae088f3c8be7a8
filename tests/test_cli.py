"""The commands a user types: train prints where everything went; mistakes are one line, exit 2."""

import subprocess
import sys

from conftest import ROOT, tiny_overrides


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_train_prints_where_checkpoint_metrics_plot_and_wandb_are(tiny_data, tmp_path):
    overrides = ["train.steps=4", "train.log_every=2", "train.eval_every=2", "train.save_every=2"]
    result = run(
        "pretrain", "train", "configs/experiments/debug.yaml", *tiny_overrides(tiny_data, tmp_path / "r", *overrides)
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "tok/s/gpu" in out and "MFU n/a" in out and "val loss" in out
    for label, path in (
        ("checkpoint:", tmp_path / "r" / "checkpoints" / "step-00000004"),
        ("metrics:", tmp_path / "r" / "metrics.jsonl"),
        ("plot:", tmp_path / "r" / "plot.png"),
    ):
        assert f"{label}" in out and str(path) in out
        assert path.exists()
    assert "wandb:       disabled" in out
    replot = run("pretrain", "plot", str(tmp_path / "r"), "-o", str(tmp_path / "again.png"))
    assert replot.returncode == 0 and (tmp_path / "again.png").stat().st_size > 1000


def test_user_mistakes_are_one_line_errors(tiny_data, tmp_path):
    cases = [
        (["pretrain", "train", "configs/experiments/debug.yaml", "train.stepz=1"], "unknown config key 'train.stepz'"),
        (["pretrain", "info", "debug", "model.dim=250"], "model.dim=250 is not divisible by model.n_heads=8"),
        (
            [
                "pretrain",
                "train",
                "configs/experiments/debug.yaml",
                f"data.root={tmp_path}/none",
                f"data.tokenizer={tiny_data['tokenizer']}",
            ],
            f"{tmp_path}/none: data folder not found",
        ),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
