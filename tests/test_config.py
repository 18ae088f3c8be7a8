"""Configs: every YAML loads and validates; mistakes get one line naming the key."""

from pathlib import Path

import pytest

from data_pipeline.config import PipelineConfig, validate_pipeline
from pretrain.config import CONFIGS_DIR, ConfigError, load_config, load_structured

ALL_YAML = sorted(CONFIGS_DIR.rglob("*.yaml"))


def test_there_are_configs():
    assert len(ALL_YAML) >= 15


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS_DIR)))
def test_every_yaml_loads_and_validates(path: Path):
    if path.parent.name == "pipeline":
        validate_pipeline(load_structured(PipelineConfig, path))
    elif path.parent.name == "recipe":
        from data_pipeline.raw.recipe import RecipeConfig, validate_recipe

        validate_recipe(load_structured(RecipeConfig, path))
    elif path.name == "gpus.yaml":  # the layout planner's GPU kinds
        from pretrain.layout import load_kinds

        assert {"a100-80gb", "h100-80gb", "h200"} <= set(load_kinds())
    else:
        load_config(path)


def test_experiment_composes_model_data_and_train():
    cfg = load_config("configs/experiments/debug.yaml")
    assert (cfg.model.dim, cfg.model.n_kv_heads) == (256, 4)  # model/debug
    assert cfg.data.root == "data/tokens/sample"  # data/sample
    assert cfg.train.steps == 120 and cfg.data.seq_len == 256  # train/debug
    assert cfg.train.run_dir == "runs/debug"  # ${name} interpolated


def test_llama1_defaults_and_size_specific_rate():
    cfg = load_config("configs/experiments/llama1-65b.yaml")
    o = cfg.optim
    got = (o.beta1, o.beta2, o.weight_decay, o.grad_clip, o.warmup_steps, o.min_lr_ratio)
    assert got == (0.9, 0.95, 0.1, 1.0, 2000, 0.1)
    assert o.lr == 1.5e-4 and load_config("configs/experiments/llama1-7b.yaml").optim.lr == 3e-4
    assert cfg.train.global_batch_tokens == 4 * 1024 * 1024 and cfg.data.seq_len == 2048
    assert load_config("configs/experiments/llama2-7b.yaml").data.seq_len == 4096


def test_overrides_win_and_are_typed():
    cfg = load_config("configs/experiments/debug.yaml", ["train.steps=7", "model.n_layers=2", "name=x"])
    assert cfg.train.steps == 7 and cfg.model.n_layers == 2 and cfg.train.run_dir == "runs/x"
    with pytest.raises(ConfigError, match="train.steps"):
        load_config("configs/experiments/debug.yaml", ["train.steps=many"])


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'"):
        load_config("configs/experiments/debug.yaml", ["train.stepz=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  - model/debug\nmodel:\n  hidden: 3\n")
    with pytest.raises(ConfigError, match=rf"{bad}: unknown config key 'model.hidden'"):
        load_config(bad)


def test_dim_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"model.dim=250 is not divisible by model.n_heads=8"):
        load_config("configs/experiments/debug.yaml", ["model.dim=250"])


def test_other_validation_errors():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_config("debug", ["model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match="global_batch_tokens"):
        load_config("configs/experiments/debug.yaml", ["train.global_batch_tokens=1000"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no-such-config")
    with pytest.raises(ConfigError, match="key=value"):
        load_config("debug", ["train.steps"])


def test_strategy_settings_that_do_not_combine_are_refused():
    experiment = "configs/experiments/debug.yaml"
    cases = [
        (["train.strategy=deepspeed", "train.zero_stage=4"], "zero_stage must be 0, 1, 2 or 3"),
        (["train.strategy=deepspeed", "train.zero_stage=2", "train.offload_params=true"], "needs train.zero_stage=3"),
        (["train.strategy=deepspeed", "train.async_save=true"], "async_save is for single and fsdp"),
        (["train.strategy=megatron"], "choose from: single, fsdp, deepspeed"),
        (["train.deepspeed_json=missing.json"], "missing.json not found"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(experiment, overrides)
