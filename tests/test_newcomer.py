"""A newcomer's first hour: `--help` lists the config from the schema without torch, `config` prints the
resolved config, outputs get the user's umask and land outside the checkpoints, the CPU threads follow the
usable cores, and library lines show once, not once per rank."""

from __future__ import annotations

import ast
import json
import math
import os
import stat
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import QUICK, ROOT, tiny_config, tiny_overrides
from data_pipeline.config import PipelineConfig
from data_pipeline.confighelp import config_keys, field_meanings
from pretrain.__main__ import main
from pretrain.config import ExperimentConfig, flat_config, load_config, to_dict
from pretrain.trainer import train

pytestmark = pytest.mark.quick


def run(*args: str, umask: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, **(env or {})},
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    return {
        line.rsplit("|", 1)[-1].strip() for line in importtime_stderr.splitlines() if line.startswith("import time")
    }


@pytest.mark.parametrize("command", ["train", "config", "info", "plan", "memory"])
def test_help_lists_every_config_key_with_default_and_meaning_without_torch(command):
    result = run("-X", "importtime", "-m", "pretrain", command, "--help")
    assert result.returncode == 0, result.stderr
    modules = imported_modules(result.stderr)
    assert "data_pipeline.confighelp" in modules and not {"torch", "numpy"} & modules
    lines = result.stdout.splitlines()
    for key in flat_config(to_dict(ExperimentConfig())):
        assert any(line.split()[:1] == [key] for line in lines), f"{key} missing from `{command} --help`"
    # the trailing comment of a field is its meaning, on the key's line, beside its default
    meaning = field_meanings(type(ExperimentConfig().train))["global_batch_tokens"]
    assert meaning and any(
        ln.split()[:2] == ["train.global_batch_tokens", "4_194_304"] and meaning in ln for ln in lines
    )
    assert any(ln.startswith("train: ") and "training loop" in ln for ln in lines)  # the section's docstring


def test_data_pipeline_help_lists_its_config_keys():
    result = run("-m", "data_pipeline", "prepare", "--help")
    assert result.returncode == 0, result.stderr
    assert "torch" not in imported_modules(run("-X", "importtime", "-m", "data_pipeline", "--help").stderr)
    for key, default, meaning, _ in config_keys(PipelineConfig):
        line = next(ln for ln in result.stdout.splitlines() if ln.split()[:1] == [key])
        assert default in line and meaning in line


def cli(capsys, *args: str) -> str:
    """`python -m pretrain ARGS` in this process (torch is loaded already): its output; it must succeed."""
    capsys.readouterr()
    assert main(list(args)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_config_prints_the_resolved_config_with_the_token_budget_deciding_steps(capsys):
    resolved = json.loads(cli(capsys, "config", "configs/experiments/llama1-65b.yaml", "--json"))
    train = resolved["train"]
    assert train["tokens"] and train["steps"] == math.ceil(train["tokens"] / train["global_batch_tokens"])
    assert resolved == to_dict(load_config("configs/experiments/llama1-65b.yaml"))
    assert train["run_dir"] == "runs/llama1-65b"  # interpolations resolved
    again = yaml.safe_load(cli(capsys, "config", "configs/experiments/llama1-65b.yaml", "train.steps=7"))
    assert again["train"]["steps"] == 7 and again["train"]["tokens"] is None
    assert {k: v for k, v in again.items() if k != "train"} == {k: v for k, v in resolved.items() if k != "train"}


def test_info_reports_the_token_budget(capsys):
    info = json.loads(cli(capsys, "info", "configs/experiments/llama1-65b.yaml", "--json"))
    cfg = load_config("configs/experiments/llama1-65b.yaml")
    assert info["tokens_budget"] == cfg.train.tokens and info["steps"] == cfg.train.steps
    text = cli(capsys, "info", "configs/experiments/llama1-65b.yaml")
    assert f"train.tokens={cfg.train.tokens:g} -> {cfg.train.steps:,} steps" in text
    assert json.loads(cli(capsys, "info", "debug", "--json"))["tokens_budget"] is None


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_outputs_get_the_umask_and_consolidate_writes_beside_the_checkpoints(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with umask(0o022):
        train(tiny_config(tiny_data, run_dir, "train.steps=2"))
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    assert modes(checkpoint) and set(modes(checkpoint).values()) == {0o644}
    for mask, mode in ((0o022, 0o644), (0o077, 0o600)):
        out = tmp_path / f"hf-{mask:o}"
        with umask(mask):
            cli(capsys, "export-hf", str(checkpoint), str(out), "--tokenizer", str(tiny_data["tokenizer"]))
        written = modes(out)
        assert {"model.safetensors", "config.json", "tokenizer.model"} <= set(written)
        assert set(written.values()) == {mode}, written
    with umask(0o022):
        path = Path(cli(capsys, "consolidate", str(checkpoint)).strip())
    assert path == run_dir / "consolidated" / "step-00000002.pth" and path.is_file()
    assert checkpoint not in path.parents and stat.S_IMODE(path.stat().st_mode) == 0o644
    with umask(0o077):
        given = Path(cli(capsys, "consolidate", str(checkpoint), "-o", str(tmp_path / "w.pth")).strip())
    assert given == tmp_path / "w.pth" and stat.S_IMODE(given.stat().st_mode) == 0o600


THREADS = """
import json, os, sys
from pretrain import runtime
import torch
cases = json.loads(sys.argv[1])
out = []
for env, cpus in cases:
    runtime._threads = None
    os.environ.pop("OMP_NUM_THREADS", None)
    os.environ.update(env)
    if cpus:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cpus]))
    torch.set_num_threads(64)
    text = runtime.configure_threads()
    out.append([torch.get_num_threads(), text, runtime.configure_threads() == text])
print(json.dumps(out))
"""


def test_threads_follow_the_usable_cpus_and_the_processes_per_node():
    usable = len(os.sched_getaffinity(0))
    cases = [({"LOCAL_WORLD_SIZE": "1"}, 0), ({"LOCAL_WORLD_SIZE": "2"}, 0)]
    cases += [({"LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "3"}, 0), ({"LOCAL_WORLD_SIZE": "1"}, 1)]  # 1 CPU: last
    result = run("-c", THREADS, json.dumps(cases), env={"OMP_NUM_THREADS": "", "MKL_NUM_THREADS": ""})
    assert result.returncode == 0, result.stderr
    (all_cpus, _, same), (half, half_text, _), (user, user_text, _), (one, one_text, _) = json.loads(result.stdout)
    assert all_cpus == usable and same
    assert half == max(usable // 2, 1) and "2 processes on this node" in half_text
    assert one == 1 and "1 CPU usable" in one_text and one_text.startswith("1 intra-op thread ")
    assert user == 64 and "OMP_NUM_THREADS=3" in user_text  # the user's choice is left alone


RANKS = """
import os, warnings
from pretrain.runtime import quiet_other_ranks
quiet_other_ranks(int(os.environ["RANK"]))
import deepspeed  # logs, from every rank, which accelerator it found
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
warnings.warn("a warning every rank gives")
out = torch.zeros(dist.get_world_size() * 2)
for _ in range(2):  # torch's deprecation warning, from every rank, and again after the filters change
    dist.all_gather_into_tensor(out, torch.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
dist.destroy_process_group()
"""


def test_library_lines_show_once_not_once_per_rank(tmp_path):
    pytest.importorskip("deepspeed")
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANKS))
    result = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script))
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert out.count("accelerator to") == 1, out
    assert out.count("UserWarning: a warning every rank gives") == 1, out
    assert out.count("all_gather_into_tensor` is deprecated") == 1, out


def test_the_quick_subset_names_existing_tests():
    for file, names in QUICK.items():
        tree = ast.parse((ROOT / "tests" / file).read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert set(names) <= defined, f"conftest.QUICK: {file} has no {sorted(set(names) - defined)}"


def test_a_nan_loss_under_the_cli_is_one_error_line(tiny_data, tmp_path, monkeypatch, capsys):
    import pretrain.trainer as trainer_mod

    real = trainer_mod.lm_loss
    monkeypatch.setattr(trainer_mod, "lm_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    capsys.readouterr()
    code = main(["train", "configs/experiments/debug.yaml", *tiny_overrides(tiny_data, tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and errors[0].startswith("error: step 1: loss nan")


# Traps a newcomer falls into (issue 24): each is one `error:` line and exit code 2, or says what it did.


def error_line(capsys, *args: str) -> str:
    """`python -m pretrain ARGS` in this process: it must fail with exit code 2 and one `error:` line."""
    capsys.readouterr()
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (code, err)
    return err


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_data, tmp_path_factory) -> Path:
    """A one-step checkpoint of the tiny config."""
    run_dir = tmp_path_factory.mktemp("newcomer_run")
    train(tiny_config(tiny_data, run_dir, "train.steps=1"))
    return run_dir / "checkpoints" / "step-00000001"


def test_a_bare_name_trains_its_experiment_and_says_which_file(tiny_data, tmp_path, capsys):
    out = cli(capsys, "train", "debug", *tiny_overrides(tiny_data, tmp_path / "run", "train.steps=1"))
    assert f"read {ROOT / 'configs' / 'experiments' / 'debug.yaml'}\n" in out
    assert "== debug: a new run" in out


def test_an_unknown_config_name_is_one_line_naming_the_experiments(capsys):
    err = error_line(capsys, "train", "no-such-run")
    experiments = sorted(path.stem for path in (ROOT / "configs" / "experiments").glob("*.yaml"))
    assert "'no-such-run'" in err and f"experiments: {', '.join(experiments)}" in err
    err = error_line(capsys, "train", "train.steps=3", "debug")  # an override where the config goes
    assert err.startswith("error: 'train.steps=3' stands where the config goes")


def test_a_part_of_an_experiment_is_not_trained_on_the_defaults_of_everything_else(tiny_data, tmp_path, capsys):
    """`train configs/model/debug.yaml` (a model only) would be a 1T-token run on the default data: one line naming
    the file and the experiments that use it. With a budget given, it trains."""
    err = error_line(capsys, "train", "configs/model/debug.yaml")
    assert err.startswith("error: configs/model/debug.yaml sets only model.*: a run of it would take the defaults")
    assert "one that uses it (debug)" in err and "train.steps=N" in err
    err = error_line(capsys, "train", "configs/data/sample.yaml")
    assert "sets only data.*" in err
    out = cli(
        capsys, "train", "configs/model/debug.yaml", *tiny_overrides(tiny_data, tmp_path / "run", "train.steps=1")
    )
    assert "== default: a new run" in out


def test_relative_paths_name_what_they_are_relative_to(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = f"train.run_dir={tmp_path / 'run'}"
    away = f"(relative to {Path.cwd()}); run from the repository root ({ROOT}) or give an absolute path"
    err = error_line(capsys, "train", "debug", run_dir, "wandb.mode=disabled")
    assert err == f"error: data.tokenizer=data/tokenizer/sample.model: not found {away}"
    assert not (tmp_path / "run").exists()
    err = error_line(capsys, "plan", "debug")
    assert err == f"error: data.root=data/tokens/sample: not found {away}"


def test_a_batch_that_does_not_split_over_the_ranks_is_one_line_from_rank_0(tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_data, tmp_path / "run", "train.strategy=fsdp")  # 8 sequences, 2 micro-batches
    launch = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3")
    result = run(*launch, "-m", "pretrain", "train", "debug", *overrides)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stdout + result.stderr
    assert "train.global_batch_tokens=256" in errors[0] and "WORLD_SIZE=3" in errors[0], errors
    assert "exitcode  : 2" in result.stderr  # every rank exits with the same code
    assert not (tmp_path / "run").exists()


def test_generate_with_a_missing_or_wrong_tokenizer_is_one_line(tiny_checkpoint, tmp_path, capsys):
    missing = tmp_path / "nope.model"
    err = error_line(capsys, "generate", str(tiny_checkpoint), "hello", "--tokenizer", str(missing))
    assert err == f"error: --tokenizer {missing}: not found"
    wrong = tmp_path / "notes.model"
    wrong.write_text("not a model")
    err = error_line(capsys, "generate", str(tiny_checkpoint), "hello", "--tokenizer", str(wrong))
    assert err.startswith(f"error: --tokenizer {wrong}: not a SentencePiece model")


def val_tokens(path: Path) -> set[int]:
    return {v for k, v in json.loads(path.read_text()).items() if k.startswith("val_tokens/")}


def test_evaluate_refuses_overrides_a_checkpoint_cannot_take_and_applies_the_others(
    tiny_checkpoint, tiny_data, tmp_path, monkeypatch, capsys
):
    for override in ("model.dim=512", "optim.lr=1", "peft.method=lora", "train.steps=9", "wandb.mode=online"):
        err = error_line(capsys, "evaluate", str(tiny_checkpoint), "train.eval_batches=1", override)
        key = override.split("=")[0]
        assert err.startswith(f"error: {override}: evaluate cannot apply {key} to a saved checkpoint"), err
    with monkeypatch.context() as launched:  # rank 1 of a launch: the same refusal, said by rank 0 only
        launched.setenv("RANK", "1")
        assert main(["evaluate", str(tiny_checkpoint), "model.dim=512"]) == 2 and capsys.readouterr().err == ""
    out = tmp_path / "eval.json"
    cli(
        capsys,
        "evaluate",
        str(tiny_checkpoint),
        "train.eval_batches=1",
        f"data.root={tiny_data['root']}",
        "--json",
        str(out),
    )
    assert val_tokens(out) == {4 * 32}  # 1 micro-batch of 4 windows of data.seq_len=32 per source


def test_overrides_after_a_flag_are_taken_and_a_stray_word_is_one_line(tiny_checkpoint, tmp_path, capsys):
    resolved = json.loads(cli(capsys, "config", "debug", "train.steps=5", "--json", "train.steps=7"))
    assert resolved["train"]["steps"] == 7
    out = tmp_path / "eval.json"
    cli(capsys, "evaluate", str(tiny_checkpoint), "--batches", "1", "train.micro_batch_size=2", "--json", str(out))
    assert val_tokens(out) == {2 * 32}
    err = error_line(capsys, "config", "debug", "--json", "steps")
    assert err.startswith("error: config: 'steps' is neither a key=value override nor an option")
