"""The layout planner (`python -m pretrain layout`): its counts, its cost model, the published runs it must
reproduce, and what it tells a user (JSON, info, the trainer's predicted-vs-measured line)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from conftest import tiny_config
from pretrain.__main__ import main
from pretrain.config import Checkpointing, ConfigError, load_config
from pretrain.layout import (
    Layout,
    collective_seconds,
    compute_seconds,
    count_step,
    get_kind,
    load_kinds,
    plan_layouts,
    predict,
)
from pretrain.memory import fits, plan_memory
from pretrain.model import count_params

LLAMA1 = {  # LLaMA-1 paper, Table 15: GPU-hours on A100-80GB (2048 GPUs for 65B, 380 tokens/sec/GPU)
    "llama1-7b": 82_432,
    "llama1-13b": 135_168,
    "llama1-33b": 530_432,
    "llama1-65b": 1_022_362,
}
JSON_KEYS = {
    "strategy", "zero_stage", "fsdp_shard_size", "tensor_parallel", "activation_checkpointing", "micro_batch_size",
    "memory_gb", "fits", "step_time_s", "compute_s", "comm_exposed_s", "tokens_per_sec_per_gpu", "mfu", "days",
    "gpu_hours",
}  # fmt: skip


def cli_json(capsys, *argv) -> dict:
    capsys.readouterr()
    main(list(argv))
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("preset", list(LLAMA1))
def test_llama1_published_gpu_hours_within_20_percent(preset):
    cfg = load_config(f"configs/experiments/{preset}.yaml")
    best = next(p for p in plan_layouts(cfg, 2048, get_kind("a100-80gb")) if p.fits)
    assert best.gpu_hours == pytest.approx(LLAMA1[preset], rel=0.2), (best.layout, best.gpu_hours)
    if preset == "llama1-65b":
        assert 285 <= best.tokens_per_sec_per_gpu <= 475


def test_layout_json_schema_and_order(capsys):
    out = cli_json(
        capsys, "layout", "configs/experiments/llama1-65b.yaml", "--gpus", "2048", "--gpu", "a100-80gb", "--json"
    )
    layouts = out["layouts"]
    assert layouts and all(JSON_KEYS <= set(lay) for lay in layouts)
    fitting = [lay for lay in layouts if lay["fits"]]
    assert fitting and layouts[: len(fitting)] == fitting  # fitting ones first
    assert [lay["step_time_s"] for lay in fitting] == sorted(lay["step_time_s"] for lay in fitting)
    best = fitting[0]
    assert 285 <= best["tokens_per_sec_per_gpu"] <= 475
    assert best["days"] == pytest.approx(best["gpu_hours"] / 2048 / 24)
    tokens = 333_787 * 4_194_304
    assert best["tokens_per_sec_per_gpu"] * 2048 * best["days"] * 86400 == pytest.approx(tokens, rel=1e-9)
    # the overrides it prints select that layout
    cfg = load_config("configs/experiments/llama1-65b.yaml", best["overrides"])
    assert predict(cfg, 2048, get_kind("a100-80gb")).step_time_s == pytest.approx(best["step_time_s"])


def test_a_layout_that_does_not_fit_is_never_listed_as_fitting(capsys):
    kind = get_kind("a100-40gb")
    cfg = load_config("configs/experiments/llama1-13b.yaml")
    predictions = plan_layouts(cfg, 16, kind)
    assert any(p.fits for p in predictions) and any(not p.fits for p in predictions)
    for p in predictions:
        assert p.fits == fits(plan_memory(p.layout.apply(cfg), 16), 40)
    # and as the `memory` command says it, for the best layout and the first that does not fit
    for p in (predictions[0], next(p for p in predictions if not p.fits)):
        capsys.readouterr()
        main(["memory", "configs/experiments/llama1-13b.yaml", *p.layout.overrides(), "--gpus", "16", "--gpu", "40"])
        said = capsys.readouterr().out
        assert ("does NOT fit" not in said) == p.fits, said


def test_more_gpus_at_a_fixed_batch_never_beat_compute_bound():
    kind = get_kind("h100-80gb")
    cfg = load_config("configs/experiments/llama1-7b.yaml")
    # compute-bound: one GPU's best rate with nothing but its own compute, at any micro-batch and mode
    bound = max(
        b * cfg.data.seq_len / compute_seconds(count_step(cfg.model, cfg.data.seq_len, b, mode, 2), kind)
        for b in (1, 2, 4, 8)
        for mode in Checkpointing
    )
    previous = None
    for gpus in (64, 128, 256, 512, 1024, 2048):
        best = next(p for p in plan_layouts(cfg, gpus, kind) if p.fits).tokens_per_sec_per_gpu
        assert best <= bound
        if previous is not None:  # a smaller share of the same batch per GPU: never faster
            assert best <= previous * (1 + 1e-9), gpus
        previous = best
    assert previous < 0.9 * bound  # at 2048 GPUs communication shows


def test_deepspeed_and_fsdp_traffic_as_they_send_it():
    kind = get_kind("a100-80gb")
    cfg = load_config("configs/experiments/llama1-13b.yaml")

    def comm(*overrides):
        return predict(load_config("configs/experiments/llama1-13b.yaml", list(overrides)), 64, kind).comm_total_s

    # ZeRO-2 reduce-scatters every micro-batch's gradients, ZeRO-1 once a step: more traffic with 2+ micro-batches
    zero = [comm("train.strategy=deepspeed", f"train.zero_stage={s}") for s in (1, 2, 3)]
    assert zero[0] < zero[1] < zero[2]
    # HSDP with shards of 1 (pure replication) still all-reduces every gradient
    assert comm("train.strategy=fsdp", "train.fsdp_shard_size=1") > 0
    # with nothing hidden (overlap 0), the exposed communication is at most what is sent
    blocking = replace(kind, overlap=0.0, comm_compute_share=0.0)
    for overrides in (["train.strategy=fsdp"], ["train.strategy=fsdp", "train.tensor_parallel=4"]):
        p = predict(load_config("configs/experiments/llama1-13b.yaml", overrides), 64, blocking)
        assert p.comm_exposed_s == pytest.approx(p.comm_total_s)
    assert cfg.train.strategy == "single"  # the experiment itself: the planner picks its placement


def test_pasting_the_best_overrides_selects_that_layout_even_over_other_settings():
    kind = get_kind("a100-80gb")
    for preset in ("llama1-7b", "llama1-65b"):
        base = ["train.strategy=fsdp", "train.tensor_parallel=2", "train.fsdp_shard_size=4"]
        cfg = load_config(f"configs/experiments/{preset}.yaml", base)
        for p in plan_layouts(cfg, 256, kind)[:40]:
            again = load_config(f"configs/experiments/{preset}.yaml", [*base, *p.layout.overrides()])
            assert Layout.of(again) == p.layout


def test_layouts_the_config_checks_refuse_are_not_offered():
    kind = get_kind("a100-80gb")
    lora = load_config("configs/experiments/llama1-7b.yaml", ["peft.method=lora", "peft.dropout=0.1"])
    modes = {p.layout.activation_checkpointing for p in plan_layouts(lora, 1, kind)}
    assert "llama" not in modes and "none" in modes  # llama computes no LoRA dropout
    cfg = load_config("configs/experiments/llama1-7b.yaml", ["data.document_attention=true"])
    # HSDP shard sizes that do not divide the data-parallel ranks are not offered (12 GPUs: no shards of 8)
    assert all(p.layout.fsdp_shard_size in (0, 4) for p in plan_layouts(cfg, 12, kind))


def test_counted_flops_are_the_model_formula():
    args = load_config("configs/experiments/llama1-7b.yaml").model
    tokens = 2048
    _, n = count_params(args)
    matrices = n - (2 * args.n_layers + 1) * args.dim  # the norms' weights take no matmul
    plain = count_step(args, 2048, 1, Checkpointing.none, 2)
    assert plain.gemm_flops == 6 * matrices * tokens  # every weight: 2 FLOPs forward, 4 backward, per token
    causal_attention = 12 * args.n_layers * args.n_heads * args.head_dim * 2048 * tokens / 2 * 3.5 / 3
    assert plain.attention_flops == pytest.approx(causal_attention)
    full = count_step(args, 2048, 1, Checkpointing.full, 2)
    block_matrices = (matrices - args.vocab_size * args.dim) / args.n_layers
    # `full` runs each block's forward again up to the last tensor its backward needs: all but w2's matmul
    # (torch.utils.checkpoint stops the recomputation early)
    recomputed = block_matrices - args.dim * args.hidden_dim
    assert full.gemm_flops - plain.gemm_flops == pytest.approx(2 * recomputed * tokens * args.n_layers)
    llama = count_step(args, 2048, 1, Checkpointing.llama, 2)
    assert llama.gemm_flops == plain.gemm_flops  # the hand-written backward recomputes no matmul
    assert count_step(args, 2048, 2, Checkpointing.none, 2).memory_bytes == pytest.approx(2 * plain.memory_bytes, 0.01)


def test_collectives_cost_more_across_nodes_and_with_size():
    kind = get_kind("a100-80gb")
    inside = collective_seconds(kind, "all_gather", 1e9, 8, 1)
    across = collective_seconds(kind, "all_gather", 1e9, 16, 2)
    assert across > inside * 5  # a NIC is ~10x slower than NVLink
    assert collective_seconds(kind, "reduce_scatter", 2e9, 8, 1) > inside
    assert collective_seconds(kind, "all_reduce", 1e9, 1, 1) == 0.0
    # a latency-bound all-reduce over many nodes takes the tree (logarithmic in nodes), not the ring
    small = [collective_seconds(kind, "all_reduce", 1e3, 8 * nodes, nodes) for nodes in (32, 256)]
    assert small[1] < small[0] * 4


def test_kinds_yaml_extends_and_checks(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("a100-80gb:\n  inter_node_bw: 50.0e9\nmy-gpu:\n  memory_gb: 24\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: my-gpu: missing key\(s\) .*matmul_flops"):
        load_kinds(str(extra))
    extra.write_text("a100-80gb:\n  inter_node_bw: 50.0e9\n  nic_speed: 1\n")
    with pytest.raises(ConfigError, match="mine.yaml: a100-80gb: unknown key.*nic_speed"):
        load_kinds(str(extra))
    extra.write_text("a100-80gb:\n  inter_node_bw: 50.0e9\n")
    faster = load_kinds(str(extra))["a100-80gb"]
    assert faster.inter_node_bw == 50e9 and faster.matmul_flops == get_kind("a100-80gb").matmul_flops
    cfg = load_config("configs/experiments/llama1-65b.yaml", Layout("fsdp", None, 0, 8, "llama", 8).overrides())
    assert predict(cfg, 2048, faster).comm_exposed_s < predict(cfg, 2048, get_kind("a100-80gb")).comm_exposed_s
    with pytest.raises(ConfigError, match="--gpu b200"):
        get_kind("b200")


def test_info_reads_the_experiment_of_a_preset_and_prices_it(capsys):
    info = cli_json(capsys, "info", "llama1-65b", "--json")
    assert info["config_file"].endswith("configs/experiments/llama1-65b.yaml")
    assert info["total_tokens"] == pytest.approx(1.4e12, rel=1e-5)
    capsys.readouterr()
    main(["info", "llama1-65b", "--gpus", "2048", "--gpu", "a100-80gb"])
    out = capsys.readouterr().out
    assert "read " in out and "experiments/llama1-65b.yaml" in out
    assert "1,400,004,149,248" in out and "GPU-hours" in out and "days" in out


def test_the_trainer_logs_the_prediction_and_the_summary_compares(tiny_data, tmp_path, capsys):
    from pretrain.trainer import train

    kinds = tmp_path / "kinds.yaml"
    cpu = replace(get_kind("a100-80gb"), gpus_per_node=64, dtype_bytes=4)
    fields = {k: v for k, v in vars(cpu).items() if k != "name"}
    kinds.write_text("cpu:\n" + "".join(f"  {k}: {v}\n" for k, v in fields.items()))
    summary = train(tiny_config(tiny_data, tmp_path / "run", "train.steps=4", f"metrics.gpu_kinds={kinds}"))
    out = capsys.readouterr().out
    assert "predicted by the layout planner (cpu, single)" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in records if "loss" in r][0]
    assert first["predicted_tokens_per_sec_per_gpu"] == pytest.approx(summary["predicted_tokens_per_sec_per_gpu"])
    assert all("predicted_tokens_per_sec_per_gpu" not in r for r in records if r is not first)
    assert summary["gpu_kind"] == "cpu"
    # without a kind for this device: a note, no prediction
    summary = train(tiny_config(tiny_data, tmp_path / "run2", "train.steps=2"))
    assert "no layout-planner kind for cpu" in capsys.readouterr().out
    assert "predicted_tokens_per_sec_per_gpu" not in summary
    # a broken kinds file or kind name costs the prediction, never the run
    kinds.write_text("cpu:\n" + "".join(f"  {k}: {[1, 2] if k == 'memory_gb' else v}\n" for k, v in fields.items()))
    summary = train(tiny_config(tiny_data, tmp_path / "run3", "train.steps=2", f"metrics.gpu_kinds={kinds}"))
    said = capsys.readouterr().out
    assert "layout planner: no predicted throughput (ConfigError" in said and "cpu.memory_gb" in said
    assert summary["step"] == 2 and "predicted_tokens_per_sec_per_gpu" not in summary


def test_calibration_writes_a_kind_the_planner_and_the_trainer_use(tmp_path, monkeypatch, capsys):
    from pretrain import calibrate

    # one process, small shapes, short timings: what the command does, in seconds (the bench runs it whole)
    monkeypatch.setattr(calibrate, "GEMM_SHAPES", [(64, 64, 64), (256, 256, 256), (512, 256, 128)])
    monkeypatch.setattr(calibrate, "MEMORY_SHAPES", [(64, 64, 256), (256, 64, 256)])
    monkeypatch.setattr(calibrate, "COLD_BYTES", 2**20)
    monkeypatch.setattr(calibrate, "TIMING_SECONDS", 0.02)
    out = tmp_path / "kinds.yaml"
    said = calibrate.calibrate(out, threads=1, processes=(1,))
    assert f"wrote {out}" in said
    cpu = load_kinds(str(out))["cpu"]
    assert cpu.dtype_bytes == 4 and cpu.overlap == 0.0
    for rate in (cpu.matmul_flops, cpu.memory_bandwidth, cpu.attention_flops):
        assert 1e8 < rate < 1e14  # a CPU's: between 0.1 G and 100 T per second
    assert 0 < cpu.op_overhead_s < 1e-3 and cpu.step_overhead_s >= 0
    capsys.readouterr()
    main(["layout", "configs/experiments/debug.yaml", "--gpus", "1", "--gpu", "cpu", "--kinds", str(out)])
    assert "best: train.strategy=single" in capsys.readouterr().out


def test_fit_line_and_cold_operands():
    import torch

    from pretrain.calibrate import cold, fit_line, rotate

    slope, intercept = fit_line([1.0, 2.0, 4.0], [3.0, 5.0, 9.0])
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(1.0)
    assert fit_line([1.0, 2.0], [1.0, 1.5])[1] >= 0
    sets = cold(lambda: (torch.zeros(1024),))  # 4 KB each: 128 MB of them
    assert len(sets) == 128 * 2**20 // 4096
    seen = []
    call = rotate(lambda t: seen.append(id(t)), sets[:3])
    for _ in range(6):
        call()
    assert len(set(seen)) == 3
