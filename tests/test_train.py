"""The trainer: exact resume, checkpoints, metrics, evaluation, plot, wandb."""

import json
import math

import pytest
import torch

from conftest import tiny_config
from pretrain.checkpoint import CheckpointManager
from pretrain.metrics import ThroughputMeter, device_peak_flops
from pretrain.optim import lr_factor
from pretrain.plot import plot_metrics
from pretrain.trainer import train


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_reproduces_the_unbroken_run_exactly(tiny_data, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_config(tiny_data, straight, "train.steps=8"))
    broken = tmp_path / "broken"
    summary = train(tiny_config(tiny_data, broken, "train.steps=8", "train.stop_at=4"))  # the job ends at step 4
    assert summary["step"] == 4
    state = torch.load(broken / "checkpoints" / "step-00000004" / "trainer.pt", weights_only=False)
    assert state["step"] == 4 and state["data"]["index"] == 4 * 8
    resumed = train(tiny_config(tiny_data, broken, "train.steps=8"))  # the next job picks up `latest`
    assert resumed["step"] == 8
    a, b = losses(straight), losses(broken)
    assert len(a) == len(b) == 8
    assert a == b  # bit-identical on CPU in fp32, data order included


def test_async_saves_are_published_whole_and_resume_exactly(tiny_data, tmp_path):
    train(tiny_config(tiny_data, tmp_path / "straight", "train.steps=8"))
    run = tmp_path / "run"
    train(
        tiny_config(tiny_data, run, "train.steps=8", "train.save_every=2", "train.async_save=true", "train.keep_last=9")
    )
    folders = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert folders == ["latest", "step-00000002", "step-00000004", "step-00000006", "step-00000008"]  # no .tmp
    again = tmp_path / "again"
    train(tiny_config(tiny_data, again, "train.steps=8", f"train.resume={run / 'checkpoints' / 'step-00000004'}"))
    assert losses(again) == losses(tmp_path / "straight")[4:]  # written in the background, read back exactly


def test_loss_falls_and_metrics_are_logged(tiny_data, tmp_path):
    run = tmp_path / "run"
    summary = train(
        tiny_config(
            tiny_data,
            run,
            "train.steps=30",
            "optim.lr=3e-3",
            "train.eval_every=15",
            "train.eval_batches=2",
            "metrics.skip_steps=2",
        )
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))  # log_every=1
    assert [r["step"] for r in evals] == [15, 30]
    for key in (
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_sec_per_gpu",
        "mfu",
        "step_time_s",
        "tokens_seen",
        "tflops_per_gpu",
        "data_wait_frac",
        "peak_mem_gb",
    ):
        assert key in steps[0], key
    assert steps[0]["mfu"] is None  # no known peak on a CPU, never a guess
    assert steps[-1]["tokens_seen"] == 30 * 256
    assert sum(v for k, v in steps[-1].items() if k.startswith("tokens_seen/")) == 30 * 256
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert evals[1]["val_loss"] < evals[0]["val_loss"] + 0.5 and evals[1]["val_ppl"] == pytest.approx(
        math.exp(evals[1]["val_loss"])
    )
    assert summary["tokens_per_sec_per_gpu"] > 0
    png = plot_metrics(run / "metrics.jsonl", tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_are_atomic_pointed_to_and_pruned(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, "train.steps=6", "train.save_every=2", "train.keep_last=2"))
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000004", "step-00000006"]
    assert (ckpts / "latest").read_text() == "step-00000006"
    state = torch.load(ckpts / "step-00000006" / "trainer.pt", weights_only=False)
    assert {"scheduler", "data", "config", "wandb_run_id", "step", "code_version"} <= set(state)
    assert state["config"]["train"]["steps"] == 6
    # a save that died half-way leaves a .tmp folder that resume ignores
    (ckpts / "step-00000008.tmp").mkdir()
    manager = CheckpointManager(run, strategy=None, keep_last=2)
    assert manager.latest() == ckpts / "step-00000006"


def test_resume_never_starts_over(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, "train.steps=2", "train.save_every=2"))
    again = train(tiny_config(tiny_data, run, "train.steps=2", "train.resume=never"))
    assert again["step"] == 2 and len(losses(run)) == 2  # metrics of the old run replaced, not appended


@pytest.mark.parametrize(
    "change",
    [
        "train.activation_checkpointing=full",
        "train.activation_checkpointing=selective",
        "train.activation_checkpointing=llama",
        "train.loss_chunk_tokens=40",
        "train.compile=true",
    ],
    ids=["full", "selective", "llama", "chunked-loss", "compiled-blocks"],
)
def test_memory_and_speed_options_give_the_same_losses(tiny_data, tmp_path, change):
    train(tiny_config(tiny_data, tmp_path / "a", "train.steps=5"))
    train(tiny_config(tiny_data, tmp_path / "b", "train.steps=5", change))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-5)


def test_document_attention_trains_and_checkpointing_keeps_its_losses(tiny_data, tmp_path):
    common = ["train.steps=4", "train.eval_every=2", "train.eval_batches=1"]
    train(tiny_config(tiny_data, tmp_path / "plain", *common))
    train(tiny_config(tiny_data, tmp_path / "docs", *common, "data.document_attention=true"))
    with_full = ["data.document_attention=true", "train.activation_checkpointing=full", "train.loss_chunk_tokens=40"]
    train(tiny_config(tiny_data, tmp_path / "docs-full", *common, *with_full))
    assert losses(tmp_path / "docs") != pytest.approx(losses(tmp_path / "plain"), abs=1e-4)  # documents are apart
    assert losses(tmp_path / "docs-full") == pytest.approx(losses(tmp_path / "docs"), abs=1e-5)
    records = [json.loads(line) for line in (tmp_path / "docs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]


def test_gradient_accumulation_matches_one_big_batch(tiny_data, tmp_path):
    train(tiny_config(tiny_data, tmp_path / "a", "train.steps=3", "train.micro_batch_size=8"))
    train(tiny_config(tiny_data, tmp_path / "b", "train.steps=3", "train.micro_batch_size=2"))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-5)


def test_wandb_offline_run_id_is_kept_on_resume(tiny_data, tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, "train.steps=2", "train.save_every=2", "wandb.mode=offline"))
    first = torch.load(run / "checkpoints" / "step-00000002" / "trainer.pt", weights_only=False)["wandb_run_id"]
    summary = train(
        tiny_config(tiny_data, run, "train.steps=4", "wandb.mode=offline", "train.resume_changes=[train.steps]")
    )
    second = torch.load(run / "checkpoints" / "step-00000004" / "trainer.pt", weights_only=False)["wandb_run_id"]
    assert first == second and "offline" in summary["wandb"]
    assert any(first in p.name for p in (run / "wandb").iterdir())


def test_missing_tokenizer_and_wrong_vocab_are_named(tiny_data, tmp_path):
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="data.tokenizer: .*nope.model not found"):
        train(tiny_config(tiny_data, tmp_path / "r", f"data.tokenizer={tmp_path}/nope.model"))
    with pytest.raises(ConfigError, match="model.vocab_size=100 is smaller than the tokenizer's 512"):
        train(tiny_config(tiny_data, tmp_path / "r", "model.vocab_size=100"))


def test_schedule_warms_up_then_decays_to_ten_percent():
    assert lr_factor(0, 2000, 10000, 0.1) == pytest.approx(1 / 2000)
    assert lr_factor(1999, 2000, 10000, 0.1) == pytest.approx(1.0)
    assert lr_factor(6000, 2000, 10000, 0.1) == pytest.approx(0.55)
    assert lr_factor(10000, 2000, 10000, 0.1) == pytest.approx(0.1)
    assert lr_factor(12000, 2000, 10000, 0.1) == pytest.approx(0.1)


def test_mfu_uses_the_device_peak_and_skips_warmup_steps():
    assert device_peak_flops(torch.device("cpu")) is None
    assert device_peak_flops(torch.device("cpu"), 1e12) == 1e12
    meter = ThroughputMeter(tokens_per_step=1000, flops_per_token=10**9, world_size=2, peak_flops=1e12, skip_steps=2)
    meter.window_start -= 1.0  # pretend two steps took one second
    meter.step(0.1)
    meter.step(0.1)
    w = meter.window()
    assert w["tokens_per_sec_per_gpu"] == pytest.approx(1000, rel=0.05)  # 2000 tokens / 1 s / 2 GPUs
    assert w["mfu"] == pytest.approx(1000 * 1e9 / 1e12, rel=0.05)
    assert w["data_wait_frac"] == pytest.approx(0.2, rel=0.05)
    assert meter.average()["tokens_per_sec_per_gpu"] is None  # both steps were warm-up


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_gpu_trains_and_reports_mfu(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, "train.device=cuda", "train.steps=20", "optim.lr=3e-3"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    if device_peak_flops(torch.device("cuda")) is not None:
        assert 0 < records[-1]["mfu"] < 1


def test_resume_refuses_a_checkpoint_of_another_model(tiny_data, tmp_path):
    from pretrain.config import ConfigError

    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, "train.steps=2"))
    with pytest.raises(ConfigError, match=r"step-00000002 with a changed config: model.n_layers: 2 -> 3 cannot change"):
        train(tiny_config(tiny_data, run, "train.steps=4", "model.n_layers=3"))


def test_resume_survives_a_half_written_metrics_line(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, "train.steps=4", "train.stop_at=2"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.')  # the process died while writing step 3
    train(tiny_config(tiny_data, run, "train.steps=4"))
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]


def test_logged_lr_is_the_rate_each_step_used(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, "train.steps=6", "optim.warmup_steps=2", "optim.lr=1e-3"))
    logged = [r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert logged == pytest.approx([1e-3 * lr_factor(s, 2, 6, 0.1) for s in range(6)])
    assert logged[0] == pytest.approx(0.5e-3)  # step 1 of a 2-step warmup


def test_validation_leaves_out_sources_without_a_held_out_sample(tiny_data, tmp_path, capsys):
    from data_pipeline.shards import SourceShards
    from pretrain.evaluation import held_out_sets

    val_tokens = {s: SourceShards(tiny_data["root"] / s, "val").n_tokens for s in tiny_data["sources"]}
    small, big = sorted(val_tokens, key=val_tokens.get)
    assert val_tokens[small] < val_tokens[big]
    seq = val_tokens[small]  # the small source cannot fill one sample of seq + 1 tokens
    cfg = tiny_config(
        tiny_data,
        tmp_path,
        f"data.seq_len={seq}",
        f"model.max_seq_len={seq}",
        f"train.global_batch_tokens={seq}",
        "train.micro_batch_size=1",
    )
    val = held_out_sets(cfg)
    assert list(val) == [big]
    assert f"no held-out sample of {seq + 1} tokens in ['{small}']" in capsys.readouterr().out


def _nan_at_step(monkeypatch, bad_step: int) -> None:
    """Make the loss of optimizer step `bad_step` NaN (through the loss function the step calls)."""
    import pretrain.trainer as trainer_mod

    real, calls = trainer_mod.lm_loss, {"n": 0}

    def lm_loss(model, inputs, targets, strategy):
        loss = real(model, inputs, targets, strategy)
        if model.training:
            calls["n"] += 1
            if calls["n"] == bad_step * 2:  # two micro-batches a step in tiny_config
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer_mod, "lm_loss", lm_loss)


def test_nan_loss_stops_the_run_by_default(tiny_data, tmp_path, monkeypatch):
    from pretrain.trainer import NonFiniteLoss

    _nan_at_step(monkeypatch, 3)
    with pytest.raises(NonFiniteLoss, match=r"step 3: loss nan.*train.on_nan=skip"):
        train(tiny_config(tiny_data, tmp_path / "run", "train.steps=5"))


def test_nan_loss_skips_the_update_when_asked(tiny_data, tmp_path, monkeypatch):
    _nan_at_step(monkeypatch, 3)
    summary = train(tiny_config(tiny_data, tmp_path / "run", "train.steps=5", "train.on_nan=skip"))
    assert summary["skipped_steps"] == 1 and summary["step"] == 5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(records[2]["loss"]) and math.isfinite(records[4]["loss"])
    assert records[4]["skipped_steps"] == 1


def test_sigterm_saves_and_the_next_launch_resumes_to_the_same_loss(tiny_data, tmp_path, monkeypatch):
    import os
    import signal

    import pretrain.trainer as trainer_mod

    before = signal.getsignal(signal.SIGTERM)
    train(tiny_config(tiny_data, tmp_path / "straight", "train.steps=6"))
    real, calls = trainer_mod.lm_loss, {"n": 0}

    def lm_loss(model, inputs, targets, strategy):
        calls["n"] += 1
        if calls["n"] == 4 * 2:  # during step 4
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, inputs, targets, strategy)

    monkeypatch.setattr(trainer_mod, "lm_loss", lm_loss)
    summary = train(tiny_config(tiny_data, tmp_path / "run", "train.steps=6"))
    assert summary["preempted"] and summary["step"] == 4
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000004"
    monkeypatch.setattr(trainer_mod, "lm_loss", real)
    assert not train(tiny_config(tiny_data, tmp_path / "run", "train.steps=6"))["preempted"]
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
    assert signal.getsignal(signal.SIGTERM) == before  # handlers put back


def test_a_stopped_run_puts_signal_handlers_back(tiny_data, tmp_path, monkeypatch):
    import signal

    from pretrain.trainer import NonFiniteLoss

    before = signal.getsignal(signal.SIGTERM)
    _nan_at_step(monkeypatch, 2)
    with pytest.raises(NonFiniteLoss):
        train(tiny_config(tiny_data, tmp_path / "run", "train.steps=4"))
    assert signal.getsignal(signal.SIGTERM) == before


def test_gradient_clipping_gives_the_update_of_the_clipped_gradient(tiny_data, tmp_path):
    """Two `train_step`s with optim.grad_clip far below the gradient norm move the weights as AdamW does on
    the gradients scaled down to that norm (torch's clip_grad_norm_ written out), not on the raw ones: the
    first step already differs (AdamW's eps), the second by the two steps' unequal scaling."""
    import copy

    from data_pipeline.loader import BatchLoader
    from pretrain.optim import build_scheduler
    from pretrain.parallel.single import SingleDevice
    from pretrain.trainer import load_data, train_step

    clip = 0.05
    cfg = tiny_config(tiny_data, tmp_path, f"optim.grad_clip={clip}")
    strategy = SingleDevice(cfg)
    torch.manual_seed(0)
    model, optimizer = strategy.setup(cfg)
    loader = BatchLoader(load_data(cfg), cfg.train.global_batch_tokens // cfg.data.seq_len, cfg.train.micro_batch_size)
    batches = [loader.next_batch() for _ in range(2)]
    loader.close()
    by_hand = {}
    for clipped in (True, False):
        reference = copy.deepcopy(model)
        reference_optimizer = strategy.build_optimizer(reference, cfg)
        reference_scheduler = build_scheduler(reference_optimizer, cfg.optim, cfg.train.steps)
        for micro_batches in batches:
            for inputs, targets in micro_batches:
                (reference(inputs, targets) / len(micro_batches)).backward()
            grads = [p.grad for p in reference.parameters()]
            norm = torch.stack([g.norm() for g in grads]).norm()
            for g in grads:
                g.mul_(min(1.0, clip / (float(norm) + 1e-6)) if clipped else 1.0)
            reference_optimizer.step()
            reference_optimizer.zero_grad(set_to_none=True)
            reference_scheduler.step()
        by_hand[clipped] = torch.cat([p.detach().flatten() for p in reference.parameters()])
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    norms = [float(train_step(model, mb, optimizer, scheduler, strategy, clip)[1]) for mb in batches]
    assert min(norms) > 10 * clip  # the norm returned is the one before clipping
    ours = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (ours - by_hand[True]).abs().max() < 1e-6
    assert (by_hand[False] - by_hand[True]).abs().max() > 1e-4  # unclipped, the update is another one


def test_evaluation_weighs_each_held_out_window_by_its_scored_tokens(tiny_data, tmp_path):
    """The first `batches x micro_batch_size` held-out windows, each target the loss scores counted once: the
    figures of an SFT source (targets masked out) are those of its windows scored one by one, however the
    windows are grouped into micro-batches."""
    import numpy as np
    from test_loader_shards import write_source

    from data_pipeline.loader import IGNORE_INDEX, targets
    from pretrain.evaluation import evaluate, held_out_sets
    from pretrain.parallel.single import SingleDevice

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 512, n) for n in (100, 37, 250, 61)]
    like = tiny_data["root"] / tiny_data["sources"][0]
    write_source(tmp_path / "tokens" / "sft", like, {"train-00000": docs, "val-00000": docs}, masked=True)
    cfg = tiny_config(tiny_data, tmp_path / "run", f"data.root={tmp_path / 'tokens'}")
    strategy = SingleDevice(cfg)
    torch.manual_seed(0)
    model, _ = strategy.setup(cfg)
    sets = held_out_sets(cfg)
    loss_sum, scored = 0.0, 0
    with torch.no_grad():
        for window in range(6):
            tokens, _, _, mask = sets["sft"].batch([window])
            labels = targets(tokens, mask)
            count = int((labels != IGNORE_INDEX).sum())
            loss_sum += float(model(torch.from_numpy(tokens[:, :-1]), torch.from_numpy(labels))) * count
            scored += count
    assert 0 < scored < 6 * cfg.data.seq_len  # some targets masked out
    for batches, micro_batch_size in [(6, 1), (3, 2), (2, 3), (1, 6)]:
        record = evaluate(model, sets, strategy, batches, micro_batch_size, documents=False)
        assert record["val_loss/sft"] == pytest.approx(loss_sum / scored, abs=1e-6)
        assert record["val_tokens/sft"] == scored
