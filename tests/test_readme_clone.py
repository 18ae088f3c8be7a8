"""A newcomer's first hour, as a test: clone the repository into an empty folder (nothing beside it) and
run the README's commands that need no GPU, in the order a new user meets them.

The clone is of the committed HEAD. Its `.venv` is the environment running this test (a symlink):
installing torch and the rest again would take minutes, and `scripts/setup.sh` finds it up to date
through its stamp, as it does on a user's second run. So that environment must have been made by
`scripts/setup.sh` (the README's test command runs it); otherwise the test fails, saying so. Every
other file comes from the clone, and each command must appear in the README as written here
(overrides that shorten a run aside).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
CHECKPOINT = "runs/debug/checkpoints/step-00000012"
SHORT = "train.steps=12 train.eval_every=6 train.save_every=6"  # the quickstart, shortened


def _clone(tmp_path: Path) -> Path:
    venv = Path(sys.prefix)
    stamp = venv / ".llama-setup"
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    if not stamp.is_file():  # a failure, not a skip: a skipped clone test is too easy to miss in CI
        pytest.fail(f"{venv} was not made by scripts/setup.sh (no {stamp.name}): run `bash scripts/setup.sh --dev`")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    setup_hash = hashlib.sha256((clone / "setup.py").read_bytes()).hexdigest()[:16]
    if not stamp.read_text().startswith(setup_hash):
        pytest.fail("setup.py changed since .venv was made (or is not committed): run `bash scripts/setup.sh --dev`")
    (clone / ".venv").symlink_to(venv)
    return clone


def test_a_bare_clone_runs_the_readme_commands_in_order(tmp_path):
    clone = _clone(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=sys.prefix)
    env.update(WANDB_SILENT="true", HOME=str(tmp_path / "home"))  # no key: wandb offline, as for a newcomer

    def run(readme: str, extra: str = "", timeout: int = 600) -> str:
        """Run `readme` (+ `extra`) in the clone as a user's shell would; it must be in the README and succeed."""
        assert readme in README, f"the README no longer says: {readme}"
        command = f"{readme} {extra}".strip()
        done = subprocess.run(
            ["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"`{command}` failed ({done.returncode}):\n{out[-4000:]}"
        return out

    # the first of the two commands: setup (up to date), tokenizer and shards, the debug model
    out = run("bash scripts/quickstart.sh", SHORT)
    assert "setup: .venv is up to date" in out and "done: step 12" in out, out[-2000:]
    assert "== debug: a new run" in out and "ETA" in out
    assert (clone / CHECKPOINT / "checksums.json").is_file()

    out = run("python -m pretrain info llama1-65b")
    assert "65,285,660,672" in out
    out = run("python -m pretrain memory configs/experiments/llama1-65b.yaml --fewest")
    gpus = re.search(r"fewest GPUs of 80 GB \(multiples of 8\): (\d+)", out)
    assert gpus and int(gpus.group(1)) > 8 and "train.strategy=fsdp" in out, out
    out = run("python -m pretrain plan configs/experiments/debug.yaml")
    assert re.search(r"total\s+100.00%", out), out
    run("python -m pretrain plot runs/debug")
    assert (clone / "runs" / "debug" / "plot.png").stat().st_size > 1000

    run("python -m data_pipeline recipe configs/recipe/sample.yaml")
    assert (clone / "data" / "clean" / "sample" / "report.md").is_file()

    # your own data: files on disk -> prepare -> a training run; raw dumps -> recipe -> prepare -> a run
    walkthrough = README.split("### Your own data, from files on disk to a training run")[1]
    files_block = walkthrough.split("```bash\n")[1].split("```")[0]
    prepare = files_block.split("python -m data_pipeline prepare mydata/pipeline.yaml")[0]
    out = run(prepare + "python -m data_pipeline prepare mydata/pipeline.yaml")
    assert "train on them: python -m pretrain train configs/experiments/debug.yaml data.root=mydata/tokens" in out
    short = "train.steps=3 train.eval_every=3 train.save_every=3"
    out = run(
        "python -m pretrain train configs/experiments/debug.yaml data.root=mydata/tokens "
        "data.tokenizer=mydata/tokenizer.model 'data.weights={web: 0.7, books: 0.3}' train.run_dir=runs/mydata",
        short,
    )
    assert "done: step 3" in out, out[-2000:]
    out = run("python -m data_pipeline recipe configs/recipe/sample.yaml output=mydata/clean")
    assert f"tokenize them: python -m data_pipeline prepare {clone / 'mydata' / 'clean' / 'pipeline.yaml'}" in out
    run("python -m data_pipeline prepare mydata/clean/pipeline.yaml tokenizer.vocab_size=2048")
    out = run(
        "python -m pretrain train configs/experiments/debug.yaml data.root=mydata/clean-tokens "
        "data.tokenizer=mydata/clean-tokenizer/tokenizer.model train.run_dir=runs/mydata-clean",
        short,
    )
    assert "done: step 3" in out, out[-2000:]

    # adapt the quickstart's checkpoint: new text through the recipe, its tokenizer, a LoRA run, export-peft
    section = README.split("## Adapt a pretrained LLaMA: LoRA, QLoRA, prompt and prefix tuning")[1]
    adapt = section.split("```bash\n")[1]
    run(adapt.split("python -m pretrain evaluate")[0].strip())
    assert (clone / "mydata" / "adapt-tokens" / "stackexchange" / "val-00000.bin").is_file()
    out = run(
        "python -m pretrain train configs/experiments/debug.yaml data.root=mydata/adapt-tokens peft.method=lora "
        "optim.lr=1e-2 train.steps=30 train.run_dir=runs/debug-lora",
        f"train.init_from={CHECKPOINT} train.steps=3",
    )
    assert "done: step 3" in out and "lora rank 8, alpha 16 on wq,wv" in out, out[-2000:]
    run("python -m pretrain export-peft", "runs/debug-lora/checkpoints/step-00000003 exports/debug-lora")
    assert (clone / "exports" / "debug-lora" / "adapter_model.safetensors").is_file()
    # supervised finetuning on the bundled examples: tokenized with the response mask, a short LoRA run on them
    tokenize, finetune = section.split("```bash\n")[2].split("```")[0].strip().splitlines()
    run(tokenize.split("#")[0].strip())
    assert list((clone / "data" / "tokens" / "sft_sample" / "sft_sample").glob("*.mask"))
    out = run(finetune, f"train.steps=3 train.init_from={CHECKPOINT}")  # the shortened quickstart's checkpoint
    assert "done: step 3" in out, out[-2000:]

    out = run("python -m pretrain evaluate", CHECKPOINT)
    assert re.search(r"blended\s+\d+\.\d+", out), out
    run(
        "python -m pretrain export-hf",
        f"{CHECKPOINT} exports/debug --tokenizer data/tokenizer/sample.model --dtype fp32",
    )
    assert json.loads((clone / "exports" / "debug" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]
    out = run("python -m pretrain generate", f'{CHECKPOINT} "The history of"')
    assert "The history of" in out

    # benchmarks: the bundled task on the checkpoint and on its export give the same score
    scores = {}
    for name, target in (("ours", CHECKPOINT), ("export", "exports/debug")):
        run("python -m pretrain lm-eval", f"{target} --tasks sample_continuation --limit 24 --output {name}.json")
        scores[name] = json.loads((clone / f"{name}.json").read_text())
    assert _accuracies(scores["ours"]) == _accuracies(scores["export"]) != {}

    # the quickstart again: the run is finished, it says so, with its last loss
    out = run("bash scripts/quickstart.sh", SHORT)
    assert "already finished at step 12" in out and "last logged loss" in out and "loss nan" not in out.lower()

    # torchrun with 2 CPU processes, in its own run folder
    out = run(
        "NGPU=2 bash launch/torchrun.sh configs/experiments/debug.yaml train.device=cpu train.run_dir=runs/debug-fsdp",
        "train.steps=4 train.eval_every=0",
    )
    assert "done: step 4" in out and "placement fsdp on 2 x cpu" in out, out[-2000:]
    assert (clone / "runs" / "debug-fsdp" / "checkpoints" / "step-00000004").is_dir()


def _accuracies(result: dict) -> dict:
    """{task: accuracy} of a `pretrain lm-eval --output` file."""
    return {task: metrics["acc"] for task, metrics in result["results"].items()}
