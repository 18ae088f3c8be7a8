"""Benchmarks through lm-evaluation-harness: our model and its Hugging Face export score the same on
the bundled task; the in-training hook equals the command line; the task file is rebuilt exactly."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import CORPUS, ROOT, run_ranks, tiny_config
from pretrain.lm_eval import INSTALL
from pretrain.trainer import train

pytest.importorskip("lm_eval")
TASK = "sample_continuation"
LIMIT = 12  # examples scored per run: enough to compare, quick on CPU


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict:
    """A tiny model trained 2 steps (checkpoint) and its fp32 Hugging Face export."""
    from pretrain.export import export_hf

    base = tmp_path_factory.mktemp("lm_eval")
    cfg = tiny_config(tiny_data, base / "run", "train.steps=2", "train.save_every=2")
    train(cfg)
    checkpoint = base / "run" / "checkpoints" / "step-00000002"
    export = export_hf(checkpoint, base / "hf", tiny_data["tokenizer"], dtype="fp32")
    return {"cfg": cfg, "checkpoint": checkpoint, "export": export}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def per_example(result: dict) -> list[list[float]]:
    """Each example's log-likelihood of each choice, in document order."""
    samples = sorted(result["samples"][TASK], key=lambda s: s["doc_id"])
    return [[r[0][0] for r in s["resps"]] for s in samples]


def test_our_model_and_its_export_score_the_same(trained):
    from pretrain.lm_eval import evaluate, load_lm, scores

    hf = load_lm(trained["export"])
    assert type(hf).__name__ == "HFLM"
    ours = evaluate(load_lm(trained["checkpoint"]), [TASK], limit=LIMIT, log_samples=True)
    theirs = evaluate(hf, [TASK], limit=LIMIT, log_samples=True)
    a, b = per_example(ours), per_example(theirs)
    assert len(a) == LIMIT and all(len(row) == 4 for row in a)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4), (a[:2], b[:2])
    assert scores(ours)[TASK] == pytest.approx(scores(theirs)[TASK])
    assert set(scores(ours)[TASK]) >= {"acc", "acc_norm", "acc_stderr"}


def test_rolling_and_generation_match_the_export(trained):
    """loglikelihood_rolling over several windows and greedy generate_until, against HFLM."""
    from lm_eval.api.instance import Instance

    from pretrain.lm_eval import load_lm

    text = (CORPUS / "gutenberg.jsonl").read_text().split("\n")[0][:6000]
    ours, theirs = load_lm(trained["checkpoint"]), load_lm(trained["export"])
    ours._max_length = theirs._max_length = 512  # several windows
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([text, "A short one."])]
    a, b = ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling)
    assert len(ours.tok_encode(text)) > 3 * 512
    assert a == pytest.approx(b, rel=1e-5)
    free = ours.generate_until([Instance("generate_until", {}, ("To Sherlock Holmes she is", {"max_gen_toks": 12}), 0)])
    stop = free[0][len(free[0]) // 2 :][:3]  # a string the model is sure to write: generation must stop there
    gen = [
        Instance("generate_until", {}, ("To Sherlock Holmes she is", {"until": [stop], "max_gen_toks": 12}), 0),
        Instance("generate_until", {}, ("The function returns", {"until": ["\n\n"], "max_gen_toks": 8}), 1),
    ]
    outputs = ours.generate_until(gen)
    assert outputs == theirs.generate_until(gen)
    assert len(stop) == 3 and outputs[0] == free[0].split(stop)[0] and outputs[1]


def test_command_line_on_a_checkpoint_and_its_export_and_the_training_hook_agree(trained, tmp_path, capsys):
    from pretrain.__main__ import main
    from pretrain.generate import load_for_inference
    from pretrain.lm_eval import scores_in_training
    from pretrain.parallel import build_strategy

    results = {}
    for name in ("checkpoint", "export"):
        out = tmp_path / f"{name}.json"
        args = ["lm-eval", str(trained[name]), "--tasks", TASK, "--limit", str(LIMIT), "--device", "cpu"]
        assert main([*args, "--batch-size", "5", "--output", str(out)]) == 0
        printed = capsys.readouterr().out
        assert TASK in printed and "took" in printed
        record = json.loads(out.read_text())
        assert record["model"] == ("pretrain" if name == "checkpoint" else "hf") and record["limit"] == LIMIT
        results[name] = record["results"][TASK]
    assert results["checkpoint"] == pytest.approx(results["export"])

    cfg = trained["cfg"]  # the same weights, live in training: another batch size, train mode, the single strategy
    cfg.lm_eval.tasks, cfg.lm_eval.limit, cfg.lm_eval.batch_size = [TASK], LIMIT, 3
    model = load_for_inference(trained["checkpoint"]).train()
    torch.manual_seed(7), random.seed(7)
    draws = (torch.rand(1).item(), random.random())
    torch.manual_seed(7), random.seed(7)
    flat = scores_in_training(model, cfg, build_strategy(cfg))
    assert model.training, "the model goes back to train mode"
    assert (torch.rand(1).item(), random.random()) == draws, "the trainer's random generators are left as they were"
    assert flat == {f"lm_eval/{TASK}/{k}": v for k, v in results["checkpoint"].items() if "stderr" not in k}


def test_command_line_errors_in_one_line(tmp_path, monkeypatch, capsys):
    from pretrain.__main__ import main

    assert main(["lm-eval", str(tmp_path / "nowhere"), "--tasks", TASK]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: no such checkpoint folder"]
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # the extra not installed
    assert main(["lm-eval", str(tmp_path), "--tasks", TASK]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {INSTALL}"]


def test_task_file_is_rebuilt_byte_for_byte_from_held_out_text(tmp_path):
    from data_pipeline.tokenize import is_validation

    script = ROOT / "scripts" / "make_lm_eval_task.py"
    for name in ("a.jsonl", "b.jsonl"):
        subprocess.run([sys.executable, str(script), "--output", str(tmp_path / name)], check=True, capture_output=True)
    shipped = ROOT / "pretrain" / "lm_eval_tasks" / f"{TASK}.jsonl"
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes() == shipped.read_bytes()
    examples = [json.loads(line) for line in shipped.read_text().splitlines()]
    assert 100 <= len(examples) <= 200
    held_out = {}
    for path in CORPUS.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            doc = json.loads(line)
            if is_validation(path.stem, doc["id"], 0.03):
                held_out[f"{path.stem}/{doc['id']}"] = " ".join(doc["text"].split())
    for e in examples:
        doc = e["id"].rsplit("/", 1)[0]
        assert f"{e['passage']} {e['choices'][e['label']]}" in held_out[doc]
        others = [c for i, c in enumerate(e["choices"]) if i != e["label"]]
        assert len(others) == 3 and not any(f"{e['passage']} {c}" in held_out[doc] for c in others)


ROLLING = ["To Sherlock Holmes she is always THE woman. " * 12, "A short one.", "Two short ones."]


def uneven_requests(rank: int) -> tuple[list, list]:
    """Rolling and generation requests of very different sizes per rank (rank -1: all of them)."""
    from lm_eval.api.instance import Instance

    texts = ROLLING[:1] if rank == 0 else ROLLING[1:] if rank == 1 else ROLLING
    prompts = [] if rank == 0 else ["The function returns", "In 1887"]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    options = {"until": ["\n\n"], "max_gen_toks": 6}
    gen = [Instance("generate_until", {}, (t, options), i) for i, t in enumerate(prompts)]
    return rolling, gen


def _rank(rank: int, world_size: int, port: int, tiny_data: dict, run_dir, overrides: list, out) -> None:
    """One rank of `test_two_ranks_score_as_one_process`: the checkpoint's weights, sharded, scored live."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    import torch.distributed as dist

    from pretrain.lm_eval import PretrainLM, scores_in_training
    from pretrain.parallel import build_strategy

    cfg = tiny_config(tiny_data, run_dir, *overrides)
    strategy = build_strategy(cfg)
    model, _ = strategy.setup(cfg)
    flat = scores_in_training(model, cfg, strategy)
    lm = PretrainLM(model, cfg.data.tokenizer, 32, strategy.device, 2, strategy)  # 32-token windows: many passes
    rolling, gen = uneven_requests(rank if strategy.data_world_size > 1 else -1)  # a TP group: the same requests
    record = {"flat": flat, "rolling": lm.loglikelihood_rolling(rolling), "gen": lm.generate_until(gen)}
    out.with_name(f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["fsdp", "tp2", pytest.param("zero3", marks=pytest.mark.slow)])
def test_two_ranks_score_as_one_process(trained, tiny_data, tmp_path, strategy):
    """2 gloo ranks under FSDP (every forward gathers parameters from both), each scoring its half of an
    odd number of examples: the scores of one process, on both ranks. Rolling log-likelihoods and
    generations of very different lengths per rank (one rank has none) finish, as in one process. Under
    tensor parallel 2 both ranks score every example together, sequences padded to an even length,
    and greedy generation reads the last real position, not the padding."""
    from test_distributed import free_port

    from pretrain.lm_eval import load_lm, run

    limit = 2 * (LIMIT // 2) + 1
    overrides = {
        "fsdp": ["train.strategy=fsdp"],
        "tp2": ["train.strategy=fsdp", "train.tensor_parallel=2"],
        "zero3": ["train.strategy=deepspeed", "train.zero_stage=3"],
    }[strategy]
    overrides += [f"train.init_from={trained['checkpoint']}", "train.precision=fp32"]
    overrides += [f"lm_eval.tasks=[{TASK}]", f"lm_eval.limit={limit}", "lm_eval.batch_size=2"]
    args = (2, free_port(), tiny_data, tmp_path / "run", overrides, tmp_path / "out.json")
    run_ranks(_rank, args, 2, limit=150, what="a forward pass missing on one rank?")
    one = load_lm(trained["checkpoint"])
    expected = run(one, [TASK], limit=limit)[TASK]
    one._max_length, one.batch_size = 32, 2
    rolling, gen = uneven_requests(-1)
    rolling, gen = one.loglikelihood_rolling(rolling), one.generate_until(gen)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for record in ranks:
        assert record["flat"] == {f"lm_eval/{TASK}/{k}": v for k, v in expected.items() if "stderr" not in k}
    if strategy == "tp2":
        for record in ranks:
            assert record["rolling"] == pytest.approx(rolling, rel=1e-5)
            assert record["gen"] == gen
        return
    assert ranks[0]["rolling"] + ranks[1]["rolling"] == pytest.approx(rolling, rel=1e-5)
    assert ranks[0]["gen"] == [] and ranks[1]["gen"] == gen


def test_the_command_under_torchrun_shards_the_model_and_scores_as_one_process(trained, tmp_path):
    """`torchrun --nproc-per-node 2 -m pretrain lm-eval CKPT`: FSDP2 shards the model over the 2 ranks (each
    holds half), each scores half of an odd number of documents, and rank 0 reports the scores of one process;
    the other rank prints no table."""
    from pretrain.lm_eval import load_lm, run

    limit = 2 * (LIMIT // 2) + 1
    alone = run(load_lm(trained["checkpoint"], "cpu", 4), [TASK], limit, bootstrap_iters=0)[TASK]
    out = tmp_path / "two.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "pretrain", "lm-eval"]
    command += [str(trained["checkpoint"]), "--tasks", TASK, "--limit", str(limit), "--device", "cpu"]
    command += ["--batch-size", "3", "--output", str(out)]
    done = subprocess.run([sys.executable, *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the model sharded over 2 ranks (FSDP): each holds 1/2 of it" in done.stderr, done.stderr
    assert done.stdout.count("took ") == 1, done.stdout  # one table, rank 0's
    record = json.loads(out.read_text())
    assert record["ranks"] == 2 and record["limit"] == limit
    two = {k: v for k, v in record["results"][TASK].items() if "stderr" not in k}
    assert two == pytest.approx({k: v for k, v in alone.items() if "stderr" not in k}, abs=1e-5)
