"""What a months-long run needs: per-source evaluation the same on any number of ranks, loss-spike rollback
with a cap, token budgets, and a relaunch of a finished run that says so."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import ROOT, tiny_config
from pretrain.config import load_config
from pretrain.trainer import NonFiniteLoss, train


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def training_losses(run_dir) -> dict[int, float]:
    """step -> loss of the training records; fails on a step logged twice."""
    found = {}
    for r in records(run_dir):
        if "loss" in r:
            assert r["step"] not in found, f"step {r['step']} logged twice in {run_dir}/metrics.jsonl"
            found[r["step"]] = r["loss"]
    return found


# --- evaluation per source, shared out between the ranks ------------------------------------------------


def _evaluate_cli(checkpoint, out, batches: int, ranks: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = ["-m", "pretrain", "evaluate", str(checkpoint), f"--batches={batches}", f"--json={out}"]
    if ranks > 1:
        cmd = ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--standalone", *cmd]
    done = subprocess.run([sys.executable, *cmd], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    if ranks > 1:  # under torchrun the model is sharded, never whole on a rank
        assert f"the model sharded over {ranks} ranks (FSDP): each holds 1/{ranks} of it" in done.stdout, done.stdout
    return json.loads(out.read_text())


def test_per_source_validation_on_two_ranks_equals_one_process_over_the_same_samples(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, "train.steps=2", "train.micro_batch_size=2", "train.eval_every=1"))
    checkpoint = run / "checkpoints" / "step-00000002"
    one_process = _evaluate_cli(checkpoint, tmp_path / "one.json", batches=3, ranks=1)
    two_ranks = _evaluate_cli(checkpoint, tmp_path / "two.json", batches=3, ranks=2)  # 3 x 2 windows: 3 on each rank
    sources = tiny_data["sources"]
    assert sorted(k.split("/")[1] for k in two_ranks if k.startswith("val_loss/")) == sorted(sources)
    for s in sources:
        assert two_ranks[f"val_tokens/{s}"] == one_process[f"val_tokens/{s}"] == 3 * 2 * 32  # --batches: in all
        assert two_ranks[f"val_loss/{s}"] == pytest.approx(one_process[f"val_loss/{s}"], abs=1e-6)
        assert two_ranks[f"val_ppl/{s}"] == pytest.approx(math.exp(two_ranks[f"val_loss/{s}"]))
    assert two_ranks["val_loss"] == pytest.approx(one_process["val_loss"], abs=1e-6)
    # blended by the training mixture's weights (here: by size, as the sampler draws)
    assert min(two_ranks[f"val_loss/{s}"] for s in sources) <= two_ranks["val_loss"]
    assert two_ranks["val_loss"] <= max(two_ranks[f"val_loss/{s}"] for s in sources)
    # the trainer logged the same per-source figures at its last step
    last = [r for r in records(run) if "val_loss" in r][-1]
    assert last["step"] == 2 and all(f"val_loss/{s}" in last for s in sources)


def test_fsdp_training_evaluates_the_held_out_tokens_of_one_process(tiny_data, tmp_path):
    from test_distributed import run_distributed

    common = ["train.steps=2", "train.micro_batch_size=2", "train.eval_every=2", "train.eval_batches=2"]
    run_distributed(tiny_data, tmp_path / "fsdp", *common)
    train(tiny_config(tiny_data, tmp_path / "one", *common))
    fsdp, one = ([r for r in records(tmp_path / n) if "val_loss" in r][-1] for n in ("fsdp", "one"))
    for s in tiny_data["sources"]:
        assert fsdp[f"val_tokens/{s}"] == one[f"val_tokens/{s}"] == 2 * 2 * 32  # train.eval_batches: in all
        assert fsdp[f"val_loss/{s}"] == pytest.approx(one[f"val_loss/{s}"], abs=1e-5)  # FSDP's weights: 1e-5
    # `evaluate` on the FSDP checkpoint, in one process over the same windows, gives what its 2 ranks logged
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step-00000002"
    cli = _evaluate_cli(checkpoint, tmp_path / "fsdp.json", batches=2, ranks=1)
    keys = [k for k in fsdp if k.startswith(("val_loss", "val_tokens"))]
    assert [cli[k] for k in keys] == pytest.approx([fsdp[k] for k in keys], abs=1e-6)


# --- loss spikes -----------------------------------------------------------------------------------------

SPIKY = [
    "train.steps=10",
    "train.save_every=2",
    "train.keep_last=10",
    "spike.factor=3",
    "spike.window=3",
    "spike.after_step=0",
    "spike.skip_batches=2",
]


def _spike_at(monkeypatch, steps: set, every_time: bool = False) -> list:
    """At the optimizer steps in `steps`, wreck the weights and report a 10x loss (once per step, or every
    time with `every_time`); returns the steps at which it struck."""
    import pretrain.trainer as trainer_mod

    real, struck, step = trainer_mod.train_step, [], {"n": 0}

    def train_step(model, micro_batches, optimizer, scheduler, strategy, grad_clip):
        loss, grad_norm, applied = real(model, micro_batches, optimizer, scheduler, strategy, grad_clip)
        step["n"] = scheduler.last_epoch  # the step just taken (the schedule counts them, and is restored)
        if step["n"] in steps and (every_time or step["n"] not in struck):
            struck.append(step["n"])
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            loss = loss * 10
        return loss, grad_norm, applied

    monkeypatch.setattr(trainer_mod, "train_step", train_step)
    return struck


def test_a_spike_rolls_back_skips_the_batches_and_continues_as_a_run_resumed_that_way(
    tiny_data, tmp_path, monkeypatch, capsys
):
    from wandb_history import offline_history

    run, by_hand = tmp_path / "run", tmp_path / "by_hand"
    struck = _spike_at(monkeypatch, {7})
    summary = train(tiny_config(tiny_data, run, *SPIKY, "wandb.mode=offline"))
    assert struck == [7] and summary["step"] == 10
    events = [r for r in records(run) if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["step"] == 6 and events[0]["from_step"] == 7
    assert events[0]["skipped_batches"] == 2 and "loss spike" in events[0]["why"]
    monkeypatch.undo()
    # the remedy by hand: resume from the checkpoint before the spike, the data moved 2 batches on
    step6 = run / "checkpoints" / "step-00000006"
    by_hand_args = (*SPIKY, f"train.resume={step6}", "train.skip_batches=2")
    train(tiny_config(tiny_data, by_hand, *by_hand_args, "train.stop_at=8"))  # a job that ends (or is preempted)
    train(tiny_config(tiny_data, by_hand, *by_hand_args))  # requeued as it was: resumes step 8, skips nothing again
    assert "was applied already: resuming" in capsys.readouterr().out
    # the data moved on: the last checkpoint's next sample is 2 batches past the 10 batches trained
    data = torch.load(run / "checkpoints" / "step-00000010" / "trainer.pt", weights_only=False)["data"]
    assert data["index"] == (10 + 2) * data["global_batch_size"]
    rolled, manual = training_losses(run), training_losses(by_hand)
    assert sorted(rolled) == list(range(1, 11))  # each step once, none missing
    assert [rolled[s] for s in range(7, 11)] == [manual[s] for s in range(7, 11)]
    assert all(math.isfinite(v) and v < 10 for v in rolled.values())  # the 10x loss was rolled back
    # wandb (offline run files, as the server shows them after `wandb sync`): each step once, the kept losses
    history = [row for row in offline_history(run) if "loss" in row]
    assert [row["step"] for row in history] == list(range(1, 11))
    assert [row["loss"] for row in history] == pytest.approx([rolled[s] for s in range(1, 11)])
    from pretrain.plot import plot_metrics  # a metrics.jsonl with an event line still plots

    assert plot_metrics(run / "metrics.jsonl", tmp_path / "plot.png").stat().st_size > 1000


def test_a_second_spike_before_the_next_save_moves_the_data_past_both(tiny_data, tmp_path, monkeypatch):
    struck = _spike_at(monkeypatch, {8, 9})  # both go back to step 6
    train(tiny_config(tiny_data, tmp_path / "run", *SPIKY, "train.save_every=6"))
    assert struck == [8, 9]
    events = [(r["step"], r["from_step"], r["skipped_batches"]) for r in records(tmp_path / "run") if "event" in r]
    # at step 8 the data had read 8 batches: back to 6, on to batch 8 (past the spike's, not 6 + 2 again);
    # at step 9 (the third step after going back) it had read 11: on to batch 11
    assert events == [(6, 8, 2), (6, 9, 5)]
    data = torch.load(tmp_path / "run" / "checkpoints" / "step-00000010" / "trainer.pt", weights_only=False)["data"]
    assert data["index"] == (11 + 4) * data["global_batch_size"]
    assert sorted(training_losses(tmp_path / "run")) == list(range(1, 11))


def test_a_rollback_keeps_the_changes_a_resume_applied(tiny_data, tmp_path, monkeypatch):
    first = [*SPIKY, "train.stop_at=4", "optim.lr=1e-3"]
    again = [*SPIKY, "optim.lr=2e-3", "train.resume_changes=[optim.lr]"]
    for name in ("straight", "spiky"):
        train(tiny_config(tiny_data, tmp_path / name, *first))
    train(tiny_config(tiny_data, tmp_path / "straight", *again))
    _spike_at(monkeypatch, {6})  # back to step 4, saved before optim.lr changed
    train(tiny_config(tiny_data, tmp_path / "spiky", *again, "spike.skip_batches=0"))
    lrs = {
        name: {r["step"]: r["lr"] for r in records(tmp_path / name) if "loss" in r} for name in ("straight", "spiky")
    }
    assert lrs["spiky"] == lrs["straight"]  # steps 5-10 on the new peak rate, before and after going back


def test_a_run_that_keeps_spiking_goes_further_back_each_retry_and_stops_after_the_cap(
    tiny_data, tmp_path, monkeypatch, capsys
):
    struck = _spike_at(monkeypatch, {7}, every_time=True)
    cfg = tiny_config(tiny_data, tmp_path / "run", *SPIKY, "train.max_consecutive_skips=3", "spike.skip_batches=1")
    with pytest.raises(
        NonFiniteLoss, match=r"4 rollbacks in a row without getting past step 7 \(train.max_consecutive_skips=3"
    ):
        train(cfg)
    assert len(struck) == 4  # three rollbacks, then the fourth spike in a row stops it
    # each retry that spiked again went one checkpoint further back than the last (6, then 4, then 2)
    out = capsys.readouterr().out
    assert [line.split(": back to ")[1].split(",")[0] for line in out.splitlines() if ": back to " in line] == [
        "step-00000006",
        "step-00000004",
        "step-00000002",
    ]


def test_a_retry_with_no_older_checkpoint_says_where_the_last_retry_started(tiny_data, tmp_path, monkeypatch):
    _spike_at(monkeypatch, {5}, every_time=True)
    cfg = tiny_config(tiny_data, tmp_path / "run", *SPIKY, "train.save_every=4")
    with pytest.raises(NonFiniteLoss, match="no checkpoint before step 4, where the last retry started"):
        train(cfg)


def test_a_gradient_norm_spike_rolls_back_when_its_rule_is_on(tiny_data, tmp_path, monkeypatch):
    import pretrain.trainer as trainer_mod

    real = trainer_mod.train_step

    def train_step(model, micro_batches, optimizer, scheduler, strategy, grad_clip):
        loss, grad_norm, applied = real(model, micro_batches, optimizer, scheduler, strategy, grad_clip)
        if scheduler.last_epoch == 7 and not getattr(train_step, "done", False):
            train_step.done = True
            grad_norm = grad_norm * 50  # the loss as it was: only the gradient norm says something is wrong
        return loss, grad_norm, applied

    monkeypatch.setattr(trainer_mod, "train_step", train_step)
    rule = [*SPIKY, "spike.factor=0", "spike.grad_norm_factor=5"]
    train(tiny_config(tiny_data, tmp_path / "on", *rule))
    events = [r for r in records(tmp_path / "on") if r.get("event") == "rollback"]
    assert len(events) == 1 and (events[0]["step"], events[0]["from_step"]) == (6, 7)
    assert events[0]["why"].startswith("gradient-norm spike, grad norm ")
    train_step.done = False
    train(tiny_config(tiny_data, tmp_path / "off", *rule, "spike.grad_norm_factor=0"))
    assert not [r for r in records(tmp_path / "off") if r.get("event") == "rollback"]


def test_keep_every_keeps_those_checkpoints_out_of_rotation(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", "train.steps=10", "train.save_every=2", "train.keep_last=2")
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == [
        "step-00000008",
        "step-00000010",
    ]
    cfg = tiny_config(tiny_data, tmp_path / "kept", "train.steps=10", "train.save_every=2", "train.keep_last=2")
    cfg = replace(cfg, train=replace(cfg.train, keep_every=4))
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "kept" / "checkpoints").glob("step-*")) == [
        "step-00000004",
        "step-00000006",
        "step-00000008",
        "step-00000010",
    ]


def test_a_spike_before_any_checkpoint_stops_with_a_clear_message(tiny_data, tmp_path, monkeypatch):
    _spike_at(monkeypatch, {5})
    cfg = tiny_config(tiny_data, tmp_path / "run", *SPIKY, "train.save_every=0")
    with pytest.raises(NonFiniteLoss, match="step 5: loss spike.*no checkpoint before it"):
        train(cfg)


def test_nan_skips_in_a_row_stop_at_the_cap_and_on_nan_rollback_goes_back(tiny_data, tmp_path, monkeypatch):
    import pretrain.trainer as trainer_mod

    real = trainer_mod.lm_loss

    def nan_from_step_4(model, inputs, targets, strategy, *positions):
        loss = real(model, inputs, targets, strategy, *positions)
        return loss * float("nan") if model.training and optimizer_step["n"] >= 4 else loss

    optimizer_step = {"n": 0}
    real_step = trainer_mod.train_step

    def counting_step(model, micro_batches, optimizer, scheduler, *rest):
        optimizer_step["n"] = scheduler.last_epoch + 1
        return real_step(model, micro_batches, optimizer, scheduler, *rest)

    monkeypatch.setattr(trainer_mod, "lm_loss", nan_from_step_4)
    monkeypatch.setattr(trainer_mod, "train_step", counting_step)
    with pytest.raises(NonFiniteLoss, match=r"step 6: loss nan.* 3 skipped updates in a row"):
        train(
            tiny_config(
                tiny_data, tmp_path / "skip", "train.steps=8", "train.on_nan=skip", "train.max_consecutive_skips=2"
            )
        )
    # back to step 2; the retry fails again at step 4, and there is nothing further back than step 2
    with pytest.raises(NonFiniteLoss, match=r"step 4: non-finite .*no checkpoint before step 2, where the last retry"):
        train(
            tiny_config(
                tiny_data, tmp_path / "rollback", *SPIKY, "train.on_nan=rollback", "train.max_consecutive_skips=2"
            )
        )
    events = [r for r in records(tmp_path / "rollback") if r.get("event") == "rollback"]
    assert [e["step"] for e in events] == [2] and "non-finite" in events[0]["why"]


# --- budgets in tokens, finished runs --------------------------------------------------------------------


@pytest.mark.parametrize(
    "experiment,tokens,steps",
    [
        ("llama1-7b", 1.0e12, 238_419),
        ("llama1-13b", 1.0e12, 238_419),
        ("llama1-33b", 1.4e12, 333_787),
        ("llama1-65b", 1.4e12, 333_787),
        ("llama2-70b", 2.0e12, 476_838),
    ],
)
def test_the_experiments_give_the_papers_token_budgets(experiment, tokens, steps):
    cfg = load_config(ROOT / "configs" / "experiments" / f"{experiment}.yaml")
    assert cfg.train.tokens == tokens and cfg.train.steps == steps
    assert (steps - 1) * cfg.train.global_batch_tokens < tokens <= steps * cfg.train.global_batch_tokens
    assert load_config(ROOT / "configs" / "experiments" / f"{experiment}.yaml", ["train.steps=10"]).train.steps == 10


def test_train_tokens_sets_the_steps_of_a_run(tiny_data, tmp_path):
    summary = train(tiny_config(tiny_data, tmp_path / "run", "train.tokens=1000"))  # 256-token steps: 4
    assert summary["step"] == 4 and max(training_losses(tmp_path / "run")) == 4


def test_relaunching_a_finished_run_says_so_with_its_last_loss(tiny_data, tmp_path, capsys):
    from conftest import tiny_overrides
    from pretrain.__main__ import main

    args = ["train", str(ROOT / "configs" / "experiments" / "debug.yaml"), *tiny_overrides(tiny_data, tmp_path / "r")]
    assert main(args) == 0
    first = capsys.readouterr().out
    # the start-up banner: what runs, where, how; then log lines with the time left
    for part in (
        "== debug: a new run",
        "parameters (2 layers, dim 64)",
        "budget    6 steps x 256 tokens",
        "single on 1 x cpu",
        "precision fp32",
        "activation checkpointing none",
        "intra-op thread",
        f"run       {tmp_path / 'r'}",
    ):
        assert part in first, part
    etas = [r["eta_s"] for r in records(tmp_path / "r") if "loss" in r]
    assert etas[-1] == 0 and all(e > 0 for e in etas[:-1]) and "| ETA " in first
    last = training_losses(tmp_path / "r")[6]
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"already finished at step 6 (train.steps=6); last logged loss {last:.4f}" in out
    assert "loss nan" not in out.lower() and "done:" not in out
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before  # nothing written


def test_benchmarks_run_every_n_steps_in_training(tiny_data, tmp_path):
    pytest.importorskip("lm_eval")
    every = ["lm_eval.every=3", "lm_eval.tasks=[sample_continuation]", "lm_eval.limit=8", "train.save_every=6"]
    train(tiny_config(tiny_data, tmp_path / "run", *every))
    scored = [r for r in records(tmp_path / "run") if "lm_eval/sample_continuation/acc" in r]
    assert [r["step"] for r in scored] == [3, 6]
    assert all(0 <= r["lm_eval/sample_continuation/acc"] <= 1 for r in scored)
    assert training_losses(tmp_path / "run").keys() == set(range(1, 7))  # the run went on around them


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_a_nan_on_one_rank_rolls_back_every_rank(tiny_data, tmp_path, strategy):
    from test_distributed import STRATEGIES, run_distributed

    run = tmp_path / "run"
    common = [*STRATEGIES[strategy], "train.steps=6", "train.micro_batch_size=2", "train.save_every=2"]
    common.append("spike.skip_batches=3")
    # a NaN in rank 1's second micro-batch of step 3: both ranks go back to step 2, none hangs
    run_distributed(tiny_data, run, *common, "train.on_nan=rollback", inject=(1, 6, "nan"))
    events = [r for r in records(run) if r.get("event") == "rollback"]
    assert [(e["step"], e["from_step"]) for e in events] == [(2, 3)]
    losses = training_losses(run)
    assert sorted(losses) == list(range(1, 7)) and all(math.isfinite(v) for v in losses.values())
    data = torch.load(run / "checkpoints" / "step-00000006" / "trainer.pt", weights_only=False)["data"]
    assert data["index"] == (6 + 3) * data["global_batch_size"]


def test_steps_and_tokens_given_together_in_a_yaml_are_refused_and_a_budget_run_extends_by_steps(tmp_path):
    from pretrain.config import ConfigError, resume_changes, to_dict

    both = tmp_path / "both.yaml"
    both.write_text("defaults: [experiments/llama1-7b]\ntrain:\n  steps: 1000\n")
    with pytest.raises(ConfigError, match="train.steps=1000 and train.tokens=1e\\+12 .* are both set"):
        load_config(both)
    saved = to_dict(load_config(ROOT / "configs" / "experiments" / "llama1-7b.yaml"))  # a checkpoint's config
    extended = load_config(
        ROOT / "configs" / "experiments" / "llama1-7b.yaml",
        ["train.steps=300000", "train.resume_changes=[train.steps]"],
    )
    applied, _ = resume_changes(saved, extended, "step-00238419")  # the README's way to extend a run
    assert applied == ["train.steps: 238419 -> 300000"]


def test_profile_steps_write_a_chrome_trace_of_those_steps_with_memory(tiny_data, tmp_path):
    import json

    from conftest import tiny_config
    from pretrain.trainer import train

    train(tiny_config(tiny_data, tmp_path / "run", "train.steps=4", "train.profile_steps=[2,3]"))
    (trace,) = (tmp_path / "run" / "profile").glob("rank00000*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]  # the Chrome trace format: Perfetto and TensorBoard
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert len(steps) == 2, steps  # steps 2 and 3, not 1 or 4
    assert any(e.get("name") == "[memory]" for e in events)  # allocations recorded
    assert any("aten::mm" == e.get("name") for e in events)  # the model's matmuls are in it


def test_profile_steps_are_checked():
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.profile_steps=\[3, 2\]: give \[first, last\]"):
        load_config("debug", ["train.profile_steps=[3,2]"])


def test_an_adapter_checkpoint_evaluated_sharded_on_two_ranks_equals_one_process(tiny_data, tmp_path):
    run = tmp_path / "run"
    lora = ["peft.method=lora", "peft.rank=4", "optim.lr=1e-2", "train.steps=2", "train.micro_batch_size=2"]
    train(tiny_config(tiny_data, run, *lora))
    checkpoint = run / "checkpoints" / "step-00000002"
    one_process = _evaluate_cli(checkpoint, tmp_path / "one.json", batches=3, ranks=1)
    two_ranks = _evaluate_cli(checkpoint, tmp_path / "two.json", batches=3, ranks=2)  # base + adapter, sharded
    assert two_ranks["val_loss"] == pytest.approx(one_process["val_loss"], abs=1e-6)
