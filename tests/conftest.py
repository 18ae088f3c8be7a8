"""Shared fixtures: a small tokenizer and token shards made from the bundled sample corpus."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from data_pipeline.sources import read_jsonl
from data_pipeline.tokenize import TokenizeSettings, tokenize_source
from data_pipeline.tokenizer import document_lines, train_tokenizer
from pretrain.config import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parent.parent

# Ranks of the distributed tests start from a fork server that imported torch, the trainer and DeepSpeed once
# (4 s a process here), so each rank starts in a fraction of a second instead. A rank forked from it gets the
# server's environment, not the test's: a worker sets what it needs (MASTER_PORT, RANK, ...) itself.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["torch", "pretrain.trainer", "deepspeed"])


def start_ranks(worker, args: tuple, nprocs: int):
    """`torch.multiprocessing.start_processes` of `worker(rank, *args)` on `nprocs` ranks from the fork server;
    the returned context is joined by the caller."""
    import torch.multiprocessing as mp

    return mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="forkserver")


def run_ranks(worker, args: tuple, nprocs: int, limit: float = 300, what: str = "") -> None:
    """`start_ranks`, joined: raises when a rank fails, fails the test (killing them) when they are still running
    after `limit` seconds, saying `what` they ran."""
    import time

    context = start_ranks(worker, args, nprocs)
    deadline = time.monotonic() + limit
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks of {worker.__name__} still running after {limit} s{what and ': ' + what}")


CORPUS = ROOT / "data_pipeline" / "sample_corpus"
os.environ.setdefault("WANDB_SILENT", "true")


def corpus_docs(per_source: int) -> dict[str, list[dict]]:
    """The first `per_source` documents of each bundled source."""
    files = sorted(CORPUS.glob("*.jsonl"))
    assert files, f"no sample corpus in {CORPUS}"
    out = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            out[path.stem] = [json.loads(line) for line in itertools.islice(f, per_source)]
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """Two sources of real text, a 512-piece tokenizer, and their token shards (train + val)."""
    base = tmp_path_factory.mktemp("tiny_data")
    docs = corpus_docs(120)
    inputs = {}
    for name, records in itertools.islice(docs.items(), 2):
        inputs[name] = base / "docs" / f"{name}.jsonl"
        inputs[name].parent.mkdir(parents=True, exist_ok=True)
        inputs[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = (d.text for p in inputs.values() for d in read_jsonl(p) if d.text)
    tokenizer_path = base / "tokenizer.model"
    train_tokenizer(document_lines(texts), tokenizer_path, vocab_size=512)
    for name, path in inputs.items():
        settings = TokenizeSettings(source=name, tokenizer_path=str(tokenizer_path), val_fraction=0.1)
        tokenize_source([path], base / "tokens" / name, settings)
    return {"root": base / "tokens", "tokenizer": tokenizer_path, "inputs": inputs, "sources": list(inputs)}


# `pytest -m quick`: a representative subset, under 2 minutes on 2 CPU cores (README: Tests). Each entry is a
# test function (every parameter of it) in a file; the tests of test_newcomer.py mark themselves.
QUICK = {
    "test_config.py": [
        "test_every_yaml_loads_and_validates",
        "test_overrides_win_and_are_typed",
        "test_unknown_key_is_named",
    ],
    "test_model.py": ["test_logits_match_huggingface_llama", "test_flops_per_token_llama1_7b_by_hand"],
    "test_train.py": ["test_resume_reproduces_the_unbroken_run_exactly"],
    "test_data.py": ["test_loader_state_dict_resumes_exactly", "test_global_batch_is_the_same_for_any_world_size"],
    "test_cli.py": ["test_train_prints_where_checkpoint_metrics_plot_and_wandb_are"],
    "test_memory.py": ["test_fewest_says_why_a_single_gpu_strategy_fits_nowhere_and_finds_the_sharded_one"],
}


def pytest_collection_modifyitems(config, items):
    """Mark the tests named in QUICK with `quick` (test_newcomer checks that each name is a test)."""
    for item in items:
        if item.originalname in QUICK.get(item.path.name, ()):
            item.add_marker(pytest.mark.quick)


DEBUG_EXPERIMENT = ROOT / "configs" / "experiments" / "debug.yaml"


def tiny_config(tiny_data: dict, run_dir: Path, *overrides: str) -> ExperimentConfig:
    """The debug experiment shrunk to seconds on CPU, on the tiny shards, writing into `run_dir`."""
    return load_config(DEBUG_EXPERIMENT, tiny_overrides(tiny_data, run_dir, *overrides))


def tiny_overrides(tiny_data: dict, run_dir: Path, *overrides: str) -> list[str]:
    """The key=value overrides of `tiny_config`, for the command line."""
    return [
        f"data.root={tiny_data['root']}",
        f"data.tokenizer={tiny_data['tokenizer']}",
        "model.dim=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.vocab_size=512",
        "model.multiple_of=16",
        "data.seq_len=32",
        "train.global_batch_tokens=256",
        "train.micro_batch_size=4",
        "train.device=cpu",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.steps=6",
        "optim.warmup_steps=2",
        "wandb.mode=disabled",
        f"train.run_dir={run_dir}",
        *overrides,
    ]


def assert_resumes_exactly(tiny_data: dict, tmp_path: Path, *overrides: str, steps: int = 4) -> list[float]:
    """Train `steps` steps straight, and again stopped at half and resumed: the losses must be equal, bit for
    bit. Returns them. (Runs in `tmp_path / "straight"` and `tmp_path / "broken"`.)"""
    import json

    from pretrain.trainer import train

    common = [*overrides, f"train.steps={steps}"]
    train(tiny_config(tiny_data, tmp_path / "straight", *common))
    train(tiny_config(tiny_data, tmp_path / "broken", *common, f"train.stop_at={steps // 2}"))
    train(tiny_config(tiny_data, tmp_path / "broken", *common))

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    straight = losses(tmp_path / "straight")
    assert losses(tmp_path / "broken") == straight and len(straight) == steps
    return straight
