"""Config faults: values no run can use are refused when the config loads, and a resumed run either
refuses a changed config (naming the keys, their two values and what to do) or applies the changes
that `train.resume_changes` names, and says so."""

import json
import re

import pytest
import torch

from conftest import DEBUG_EXPERIMENT, tiny_config
from pretrain.config import ConfigError, OptimConfig, load_config, resume_changes, to_dict
from pretrain.optim import apply_optim_config, build_scheduler, lr_factor
from pretrain.trainer import train


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
        ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
        ("optim.grad_clip=inf", "optim.grad_clip must be a finite number"),
        ("model.norm_eps=nan", "model.norm_eps must be a finite number"),
        ("data.weights.web=inf", "data.weights.web must be a finite number"),
        ("metrics.peak_flops=inf", "metrics.peak_flops must be a finite number"),
        ("optim.eps=0", "optim.eps must be positive"),
        ("optim.beta1=1.0", r"optim.beta1 must be in \[0, 1\), got 1.0"),
        ("optim.beta2=-0.5", r"optim.beta2 must be in \[0, 1\)"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
        ("metrics.peak_flops=0", "metrics.peak_flops must be positive"),
        ("train.stop_at=0", "train.stop_at must be positive, got 0"),
        ("train.stop_at=-3", "train.stop_at must be positive, got -3"),
        ("train.eval_batches=0", "train.eval_batches must be positive, got 0"),
        (
            "train.resume_changes=[optim.learning_rate]",
            "train.resume_changes: unknown config key 'optim.learning_rate'",
        ),
        ("train.resume_changes=[model.dim]", "train.resume_changes: model.dim cannot change in a run"),
        ("train.resume_changes=[data.seq_len]", "train.resume_changes: data.seq_len cannot change in a run"),
    ],
)
def test_values_no_run_can_use_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEBUG_EXPERIMENT, ["train.eval_every=10", override])


def test_values_that_mean_something_are_accepted():
    cfg = load_config(DEBUG_EXPERIMENT, ["train.eval_every=0", "train.eval_batches=0", "train.stop_at=1"])
    assert cfg.train.eval_batches == 0 and cfg.train.stop_at == 1  # no evaluation: its batch count is unused
    cfg = load_config(DEBUG_EXPERIMENT, ["train.resume_changes=[optim,train.steps,data.document_attention]"])
    assert cfg.train.resume_changes == ["optim", "train.steps", "data.document_attention"]


def test_only_named_changes_to_what_is_trained_pass_a_resume():
    saved = to_dict(load_config(DEBUG_EXPERIMENT))
    assert resume_changes(saved, load_config(DEBUG_EXPERIMENT), "ckpt") == ([], [])
    free = ["train.log_every=1", "train.micro_batch_size=2", "train.precision=fp32", "train.strategy=fsdp"]
    free += ["train.stop_at=3", "train.keep_last=9", "train.seed=5", "wandb.mode=offline", "name=other"]
    free += ["data.root=elsewhere", "train.activation_checkpointing=llama", "metrics.skip_steps=0"]
    applied, how = resume_changes(saved, load_config(DEBUG_EXPERIMENT, free), "ckpt")
    assert applied == [] and {"train.strategy: single -> fsdp", "train.run_dir: runs/debug -> runs/other"} < set(how)
    imported = {"model": {**saved["model"], "dim": 512}}  # an `import` folder: the trainer says to init_from it
    assert resume_changes(imported, load_config(DEBUG_EXPERIMENT), "ckpt") == ([], [])
    changed = ["optim.lr=1e-3", "optim.beta2=0.99", "train.steps=240", "data.document_attention=true"]
    with pytest.raises(ConfigError) as refused:
        resume_changes(saved, load_config(DEBUG_EXPERIMENT, changed), "ckpt")
    listed = "data.document_attention: False -> True, optim.lr: 0.002 -> 0.001, optim.beta2: 0.95 -> 0.99, "
    assert listed + "train.steps: 120 -> 240 would change the rest of the run" in str(refused.value)
    resume = "train.resume_changes=[data.document_attention,optim.lr,optim.beta2,train.steps]"
    assert f"{resume} (README: extending a run)" in str(refused.value)
    section = "train.resume_changes=[optim,train.steps]"
    with pytest.raises(ConfigError, match=r"data.document_attention: False -> True would change") as refused:
        resume_changes(saved, load_config(DEBUG_EXPERIMENT, [*changed, section]), "ckpt")
    assert "optim" not in str(refused.value)  # the section names every optim key
    applied, how = resume_changes(saved, load_config(DEBUG_EXPERIMENT, [*changed, resume]), "ckpt")
    assert how == ["train.resume_changes: [] -> ['data.document_attention', 'optim.lr', 'optim.beta2', 'train.steps']"]
    assert applied == [
        "data.document_attention: False -> True",
        "optim.lr: 0.002 -> 0.001",
        "optim.beta2: 0.95 -> 0.99",
        "train.steps: 120 -> 240",
    ]
    fixed_keys = ["model.n_layers=2", "data.seq_len=128", "data.seed=7", "train.global_batch_tokens=16384"]
    for fixed in [*fixed_keys, "data.weights.x=1.0"]:
        with pytest.raises(ConfigError, match=r"cannot change in a run; .* train.init_from=ckpt with another"):
            resume_changes(saved, load_config(DEBUG_EXPERIMENT, [fixed, resume]), "ckpt")


def test_apply_optim_config_puts_every_value_into_a_restored_optimizer():
    params = [torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))]
    old, new = OptimConfig(warmup_steps=2), OptimConfig(lr=1e-3, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.01)

    def optimizer_and_scheduler(cfg: OptimConfig):
        groups = [{"params": params[:1], "weight_decay": cfg.weight_decay}, {"params": params[1:], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        return optimizer, build_scheduler(optimizer, cfg, 10)

    optimizer, scheduler = optimizer_and_scheduler(old)
    for _ in range(5):
        sum(p.sum() for p in params).backward()
        optimizer.step()
        scheduler.step()
    restored, restored_scheduler = optimizer_and_scheduler(new)
    restored.load_state_dict(optimizer.state_dict())  # the checkpoint's values come back with its state
    restored_scheduler.load_state_dict(scheduler.state_dict())
    assert restored.param_groups[0]["betas"] == (0.9, 0.95) and restored_scheduler.base_lrs == [3e-4, 3e-4]
    apply_optim_config(restored, restored_scheduler, new)
    decay, no_decay = restored.param_groups
    assert decay["betas"] == no_decay["betas"] == (0.8, 0.99) and decay["eps"] == no_decay["eps"] == 1e-8
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    expected = 1e-3 * lr_factor(5, new.warmup_steps, 10, new.min_lr_ratio)
    assert restored_scheduler.get_last_lr() == [expected, expected] and decay["lr"] == no_decay["lr"] == expected
    restored_scheduler.step()
    assert decay["lr"] == 1e-3 * lr_factor(6, new.warmup_steps, 10, new.min_lr_ratio)


def test_resume_refuses_a_changed_schedule_before_anything_is_written(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, "train.steps=8", "train.stop_at=4", "optim.lr=1e-3"))
    config_yaml, metrics = (run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()
    for changed, message in [
        (["optim.lr=2e-3"], r"optim.lr: 0.001 -> 0.002 would change the rest of the run"),
        (
            ["optim.lr=1e-3", "train.steps=16"],
            r"train.steps: 8 -> 16 would change .* train.resume_changes=\[train.steps\]",
        ),
        (["optim.lr=1e-3", "optim.warmup_steps=4"], "optim.warmup_steps: 2 -> 4"),
        (["optim.lr=1e-3", "data.seed=99"], r"data.seed: 1234 -> 99 cannot change in a run"),
    ]:
        where = re.escape(f"resuming {run / 'checkpoints' / 'step-00000004'} with a changed config: ")
        with pytest.raises(ConfigError, match=where + message):
            train(tiny_config(tiny_data, run, "train.steps=8", *changed))
    assert (run / "config.yaml").read_text() == config_yaml and (run / "metrics.jsonl").read_text() == metrics
    with pytest.raises(ConfigError, match=r"train.stop_at=4, but .*step-00000004 is at step 4: nothing to train"):
        train(tiny_config(tiny_data, run, "train.steps=8", "optim.lr=1e-3", "train.stop_at=4"))


def test_a_run_extended_on_purpose_follows_the_new_schedule_and_says_so(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, "train.steps=8", "train.stop_at=4", "optim.lr=1e-3"))
    extend = ["train.steps=16", "optim.lr=2e-3", "train.resume_changes=[train.steps,optim.lr]"]
    capsys.readouterr()
    summary = train(tiny_config(tiny_data, run, *extend, "train.stop_at=6"))
    out = capsys.readouterr().out
    assert summary["step"] == 6
    old_rate, new_rate = 1e-3 * lr_factor(4, 2, 8, 0.1), 2e-3 * lr_factor(4, 2, 16, 0.1)
    assert (
        "applied on resume (train.resume_changes): optim.lr: 0.001 -> 0.002; train.steps: 8 -> 16; "
        f"the learning rate of step 5 is {new_rate:.6g} (the checkpoint's schedule: {old_rate:.6g})" in out
    )
    assert (
        "changed since the checkpoint (how it runs, not what it trains): train.stop_at: 4 -> 6; train.resume_changes: "
        in out
    )
    assert "steps: 16" in (run / "config.yaml").read_text()
    train(tiny_config(tiny_data, run, *extend))  # the next job: the checkpoint holds the new values already
    logged = {r["step"]: r["lr"] for r in records(run) if "lr" in r}
    assert list(logged) == list(range(1, 17))
    assert [logged[s] for s in range(1, 5)] == pytest.approx([1e-3 * lr_factor(s - 1, 2, 8, 0.1) for s in range(1, 5)])
    assert [logged[s] for s in range(5, 17)] == pytest.approx(
        [2e-3 * lr_factor(s - 1, 2, 16, 0.1) for s in range(5, 17)]
    )
    assert "applied on resume" not in capsys.readouterr().out  # nothing changed the second time
    train(tiny_config(tiny_data, run, *extend))
    assert "already finished at step 16 (train.steps=16)" in capsys.readouterr().out
