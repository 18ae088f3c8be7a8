"""Typed experiment configuration: dataclasses as the OmegaConf schema, YAML on top, then overrides.

An experiment YAML may list `defaults:` (other YAML files, relative to `configs/`, merged first in
order); its own keys come next, then `key=value` overrides from the command line. Every YAML in
`configs/` is a partial `ExperimentConfig`, so a model preset alone is a valid config too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from omegaconf import OmegaConf

from data_pipeline.configfile import CONFIGS_DIR, ConfigError, load_structured, resolve_config_path  # noqa: F401
from pretrain.model_args import ModelArgs


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on GPU, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class Checkpointing(str, Enum):
    none = "none"
    full = "full"  # recompute each transformer block in the backward pass
    selective = "selective"  # keep the outputs of matmuls and attention, recompute norms and activations
    llama = "llama"  # LLaMA-1's hand-written block backward: keep linear outputs, recompute norms, RoPE, SwiGLU


@dataclass
class DataConfig:
    """Where the token shards are and how they are packed into samples."""

    root: str = "data/tokens/sample"  # a folder with one sub-folder of token shards per source
    sources: List[str] = field(default_factory=list)  # empty: the keys of `weights`, else every folder under root
    weights: Dict[str, float] = field(default_factory=dict)  # sampling proportions; empty: by size
    tokenizer: str = "data/tokenizer/sample.model"  # must be the one the shards were made with
    seq_len: int = 2048
    seed: int = 1234  # the sample order is a pure function of (seed, sample index)
    document_attention: bool = False  # attend within documents only, positions reset at document starts


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (LLaMA-1 defaults)."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    warmup_steps: int = 2000
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5  # LLaMA-2 paper
    weight_decay: float = 0.1  # on matrices only; not on norms
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class TrainConfig:
    """The training loop: how long, how big a batch, where it runs and what it writes."""

    steps: int = 250_000  # optimizer steps (1.05T tokens at 4M tokens a step); train.tokens, when set, decides it
    tokens: Optional[float] = None  # token budget, e.g. 1.4e12: steps = ceil(tokens / global_batch_tokens)
    global_batch_tokens: int = 4_194_304  # tokens per optimizer step, all micro-batches and ranks
    micro_batch_size: int = 1  # sequences per forward pass per device
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto
    strategy: str = "single"  # single | fsdp | deepspeed (the last two under a launcher, see launch/)
    fsdp_shard_size: int = 0  # fsdp: data-parallel ranks a model is sharded over (0: all; per node for HSDP)
    tensor_parallel: int = 1  # fsdp: ranks that split each layer (Megatron tensor + sequence parallel), inside a node
    reshard_after_forward: bool = True  # fsdp: free gathered parameters after forward (less memory)
    zero_stage: int = 3  # deepspeed: 0 (data parallel), 1 (optimizer), 2 (+gradients), 3 (+parameters)
    offload_optimizer: bool = False  # deepspeed: optimizer states and update on the CPU (DeepSpeedCPUAdam)
    offload_params: bool = False  # deepspeed ZeRO-3: parameters on the CPU between uses
    deepspeed_json: Optional[str] = None  # deepspeed: a DeepSpeed JSON whose keys override the generated ones
    activation_checkpointing: Checkpointing = Checkpointing.none
    compile: bool = False  # torch.compile each transformer block (after checkpointing is applied)
    loss_chunk_tokens: int = 0  # > 0: output projection + cross-entropy this many tokens at a time (no full logits)
    seed: int = 0  # model initialisation
    run_dir: str = "runs/${name}"
    log_every: int = 10
    eval_every: int = 1000  # 0: never
    eval_batches: int = 20  # micro-batches per source in all, shared out between the ranks: any world size, same set
    save_every: int = 1000  # 0: only at the end
    async_save: bool = False  # single/fsdp: periodic saves copy to CPU memory, then write in the background
    keep_last: int = 3  # checkpoints kept; older ones are deleted
    keep_every: int = 0  # > 0: checkpoints of steps divisible by this are never deleted (old points to go back to)
    verify_checkpoints: bool = True  # checksum of every checkpoint file, taken as written and checked as read
    on_nan: str = "stop"  # a NaN/Inf loss or gradient norm: stop | skip the update | rollback (as for a spike)
    max_consecutive_skips: int = 5  # skipped updates or spike rollbacks in a row before the run stops; 0: no limit
    skip_batches: int = 0  # with train.resume=<checkpoint>: move the data this many batches on (a manual spike fix)
    stop_at: Optional[int] = None  # end this job after this step (checkpointed); the schedule still spans `steps`
    resume: str = "auto"  # auto (latest checkpoint of run_dir if any) | never | a checkpoint folder
    resume_changes: List[str] = field(default_factory=list)  # keys (or sections) whose new values a resumed run applies
    init_from: Optional[str] = None  # a new run starts from these weights: a checkpoint, an `import` folder, a .pth
    profile_steps: List[int] = field(default_factory=list)  # [first, last]: a torch.profiler trace of these steps
    hang_timeout_s: float = 0.0  # > 0: a rank whose step, evaluation or save takes longer dumps stacks and exits


@dataclass
class WandbConfig:
    """Weights & Biases: online with WANDB_API_KEY, offline without, unless `mode` says otherwise."""

    mode: str = "auto"  # auto | online | offline | disabled
    project: str = "llama-pretrain"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    group: Optional[str] = None  # runs shown together (e.g. one per ablation); None: none
    job_type: str = "train"  # train | eval | ...: a filter in the project's run table
    notes: Optional[str] = None  # a description shown on the run's page
    # on resume or rollback: auto (online: fork, as W&B recommends; offline: keep the run id) | rewind (online:
    # rewind the run where W&B enabled that preview, else fork) | fork (always a new run)
    history: str = "auto"


@dataclass
class MetricsConfig:
    """How throughput and MFU are computed, and where else metrics go."""

    peak_flops: Optional[float] = None  # per device; None: from the device table (none on CPU)
    skip_steps: int = 3  # first steps left out of throughput averages (warm-up)
    tensorboard: bool = False  # also write TensorBoard event files to <run>/tensorboard
    gpu_kind: Optional[str] = None  # the layout planner's kind for the prediction logged; None: from the device
    gpu_kinds: Optional[str] = None  # a YAML of more kinds (e.g. `layout --calibrate`'s, for CPU runs)


@dataclass
class SpikeConfig:
    """Loss-spike recovery: on a spike, go back to the last checkpoint before it and skip the batches after it."""

    factor: float = 0.0  # a spike: loss > factor x the running statistic of the last `window` losses; 0: off
    grad_norm_factor: float = 0.0  # a spike too: grad norm > this x the statistic of the last grad norms; 0: off
    window: int = 100  # losses in the running statistic (fewer than this: no check yet)
    stat: str = "median"  # median | mean
    after_step: Optional[int] = None  # no check before this step; None: after optim.warmup_steps
    skip_batches: int = 200  # batches of data skipped after the checkpoint the run goes back to


@dataclass
class LmEvalConfig:
    """Benchmarks through lm-evaluation-harness (`pip install -e '.[lm-eval]'`) during training."""

    every: int = 0  # steps between benchmark runs; 0: never
    tasks: List[str] = field(default_factory=list)  # lm-eval task names, e.g. [hellaswag, arc_easy]
    include_path: Optional[str] = None  # a folder of extra task YAMLs (e.g. the bundled local tasks)
    limit: Optional[int] = None  # examples per task (None: all)
    num_fewshot: Optional[int] = None  # None: each task's default
    batch_size: int = 8


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the linear layers of a block, by Meta's names
PEFT_METHODS = ("none", "lora", "prompt_tuning", "prefix_tuning")


@dataclass
class PeftConfig:
    """Parameter-efficient adaptation applied from outside the model (`pretrain.adapters`): the base frozen,
    only the adapter trained. Hugging Face PEFT's numerics and adapter format are the reference."""

    method: str = "none"  # none | lora | prompt_tuning | prefix_tuning
    rank: int = 8  # lora: rank r of each update B @ A
    alpha: float = 16.0  # lora: the update is scaled by alpha / rank
    dropout: float = 0.0  # lora: dropout on the input of A while training
    targets: List[str] = field(default_factory=lambda: ["wq", "wv"])  # lora: any of wq wk wv wo w1 w2 w3
    virtual_tokens: int = 20  # prompt_tuning: trainable embeddings in front of every sequence; prefix_tuning: keys
    # and values of every layer in front of every sequence
    init_text: Optional[str] = None  # prompt_tuning: start from the embeddings of this text's tokens; None: random
    init_from: Optional[str] = None  # a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    quantize: str = "none"  # none | nf4: the frozen base's block matrices in 4-bit NormalFloat (QLoRA; torchao)


@dataclass
class ExperimentConfig:
    """One training run: model + data + optimizer + loop + logging."""

    name: str = "default"
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)


class CommandLineError(ConfigError):
    """A config or override that cannot run, found from the command line and config files alone, before any
    rank does work of its own: the same on every rank of a launch, so `python -m pretrain` reports it once."""


REPO_ROOT = CONFIGS_DIR.parent  # the default paths of the configs (data/..., runs/...) are relative to it


def config_source(name: str | os.PathLike) -> Path:
    """The YAML file of `name` (`resolve_config_path`); one error line naming the experiments when none is."""
    try:
        return resolve_config_path(name)
    except ConfigError:
        pass
    if "=" in str(name):
        raise ConfigError(f"'{name}' stands where the config goes: give the config first, then key=value overrides")
    experiments = ", ".join(sorted(path.stem for path in (CONFIGS_DIR / "experiments").glob("*.yaml")))
    raise ConfigError(
        f"config file not found: '{name}' is no file relative to {Path.cwd()} or to {CONFIGS_DIR}; a bare name is "
        f"one of the experiments: {experiments}"
    )


def path_not_found(what: str, path: str | os.PathLike, hint: str = "") -> str:
    """`WHAT: not found; HINT`, with the folder a relative path was taken relative to (the working directory)."""
    where = "" if Path(path).is_absolute() else f" (relative to {Path.cwd()})"
    return f"{what}: not found{where}" + (f"; {hint}" if hint else "")


def away_from_root(instead: str = "give an absolute path") -> str:
    """The remedy for a relative path of a config not found away from the repository root, where the configs'
    paths are relative to (`data/...`): run from there, or `instead`; "" at the root."""
    if Path.cwd().resolve() == REPO_ROOT.resolve():
        return ""
    return f"run from the repository root ({REPO_ROOT}) or {instead}"


def check_paths(cfg: ExperimentConfig, keys: Sequence[str]) -> None:
    """Refuse the first relative path among `keys` (e.g. data.tokenizer) that is not there, in one line naming
    the key, the path and what it was taken relative to (absolute ones are left to the code that reads them)."""
    values, sample = flat_config(to_dict(cfg)), flat_config(to_dict(ExperimentConfig()))  # the sample data's
    for key in keys:
        value = values[key]
        if value is not None and not Path(value).is_absolute() and not Path(value).exists():
            prepare = "run `python -m data_pipeline prepare` first (the sample data)" if value == sample[key] else ""
            raise ConfigError(path_not_found(f"{key}={value}", value, away_from_root() or prepare))


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Schema defaults <- YAML (with its defaults) <- `key=value` overrides, then validated. A mistake is a
    `CommandLineError`: it depends on the command line and the config files only."""
    try:
        return _load_config(path, overrides)
    except ConfigError as e:
        raise CommandLineError(str(e)) from None


def _load_config(path: str | os.PathLike | None, overrides: Sequence[str]) -> ExperimentConfig:
    """`load_config` before its errors become `CommandLineError`s."""
    config: ExperimentConfig = load_structured(
        ExperimentConfig, None if path is None else config_source(path), overrides
    )
    t = config.train
    last = {key: n for n, o in enumerate(overrides) for key in ("train.steps=", "train.tokens=") if o.startswith(key)}
    if t.tokens is not None and last.get("train.steps=", -1) > last.get("train.tokens=", -1):
        t.tokens = None  # a step count on the command line (after any token budget there) replaces the budget
    if t.tokens is not None and math.isfinite(t.tokens) and t.tokens > 0 and t.global_batch_tokens > 0:
        steps = math.ceil(t.tokens / t.global_batch_tokens)
        tokens_last = last.get("train.tokens=", -1) > last.get("train.steps=", -1)  # on the command line: it wins
        if not tokens_last and t.steps not in (TrainConfig.steps, steps):  # a saved config holds both, equal
            raise ConfigError(
                f"train.steps={t.steps} and train.tokens={t.tokens:g} (= {steps} steps) are both set; give one "
                "(train.tokens: null in the YAML, or train.steps=N on the command line, which replaces the budget)"
            )
        t.steps = steps
    validate(config)
    return config


def _numbers(value: Any, key: str = "") -> Iterator[tuple[str, float]]:
    """(key, value) of every float in a config (the values of mappings such as data.weights included)."""
    if is_dataclass(value):
        for f in fields(value):
            yield from _numbers(getattr(value, f.name), f"{key}.{f.name}".lstrip("."))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{key}.{k}")
    elif isinstance(value, float):
        yield key, value


def validate(cfg: ExperimentConfig) -> None:
    """Check the values that the schema's types cannot; raise ConfigError naming the key."""
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    for key, value in _numbers(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    positive = {
        "model.dim": m.dim,
        "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads,
        "model.vocab_size": m.vocab_size,
        "model.multiple_of": m.multiple_of,
        "model.max_seq_len": m.max_seq_len,
        "data.seq_len": d.seq_len,
        "train.steps": t.steps,
        "train.global_batch_tokens": t.global_batch_tokens,
        "train.micro_batch_size": t.micro_batch_size,
        "train.log_every": t.log_every,
        "train.keep_last": t.keep_last,
        "optim.lr": o.lr,
        "optim.eps": o.eps,
    }
    if t.stop_at is not None:
        positive["train.stop_at"] = t.stop_at
    if t.tokens is not None:
        positive["train.tokens"] = t.tokens
    if t.eval_every:
        positive["train.eval_batches"] = t.eval_batches  # batches of each evaluation (train.eval_every=0: none)
    if cfg.metrics.peak_flops is not None:
        positive["metrics.peak_flops"] = cfg.metrics.peak_flops
    if t.profile_steps and (len(t.profile_steps) != 2 or not 0 < t.profile_steps[0] <= t.profile_steps[1]):
        raise ConfigError(f"train.profile_steps={list(t.profile_steps)}: give [first, last], 0 < first <= last")
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    if m.head_dim % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.head_dim} must be even for RoPE")
    if m.n_kv_heads is not None and (m.n_kv_heads <= 0 or m.n_heads % m.n_kv_heads):
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    per_pass = t.micro_batch_size * d.seq_len
    if t.global_batch_tokens % per_pass:
        raise ConfigError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
            f"train.micro_batch_size * data.seq_len = {per_pass}"
        )
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    for key, value in {"optim.beta1": o.beta1, "optim.beta2": o.beta2}.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    for key, value in {
        "optim.warmup_steps": o.warmup_steps,
        "optim.weight_decay": o.weight_decay,
        "metrics.skip_steps": cfg.metrics.skip_steps,
        "train.eval_every": t.eval_every,
        "train.save_every": t.save_every,
        "train.loss_chunk_tokens": t.loss_chunk_tokens,
        "optim.grad_clip": o.grad_clip,
        "train.max_consecutive_skips": t.max_consecutive_skips,
        "train.skip_batches": t.skip_batches,
        "spike.factor": cfg.spike.factor,
        "spike.grad_norm_factor": cfg.spike.grad_norm_factor,
        "spike.skip_batches": cfg.spike.skip_batches,
        "train.keep_every": t.keep_every,
        "train.hang_timeout_s": t.hang_timeout_s,
        "lm_eval.every": cfg.lm_eval.every,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    bad = {k: v for k, v in d.weights.items() if not v > 0}
    if bad:
        raise ConfigError(f"data.weights must be positive, got {bad}")
    if d.sources and d.weights and sorted(d.sources) != sorted(d.weights):
        raise ConfigError(f"data.sources {list(d.sources)} and the keys of data.weights {list(d.weights)} differ")
    if t.strategy not in ("single", "fsdp", "deepspeed"):
        raise ConfigError(f"train.strategy='{t.strategy}' is not available; choose from: single, fsdp, deepspeed")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {t.zero_stage}")
    if t.async_save and t.strategy == "deepspeed":
        raise ConfigError(
            "train.async_save is for single and fsdp; under deepspeed checkpoints are written synchronously"
        )
    if t.compile and t.strategy == "deepspeed" and t.zero_stage == 3:
        raise ConfigError("train.compile is not supported under ZeRO-3 (its per-module hooks); use fsdp or stage 0-2")
    if t.offload_params and t.zero_stage != 3:
        raise ConfigError(f"train.offload_params needs train.zero_stage=3, got {t.zero_stage}")
    if t.deepspeed_json is not None and not Path(t.deepspeed_json).is_file():
        raise ConfigError(f"train.deepspeed_json: {t.deepspeed_json} not found")
    check_tensor_parallel(cfg)
    check_peft(cfg)
    if t.fsdp_shard_size < 0:
        raise ConfigError(f"train.fsdp_shard_size must be >= 0, got {t.fsdp_shard_size}")
    if t.on_nan not in ("stop", "skip", "rollback"):
        raise ConfigError(f"train.on_nan='{t.on_nan}' must be stop, skip or rollback")
    if t.skip_batches and t.resume in ("auto", "never"):
        raise ConfigError(
            f"train.skip_batches={t.skip_batches} needs train.resume=<checkpoint folder>: it moves the data on "
            "once, from that checkpoint"
        )
    if cfg.spike.factor and cfg.spike.factor <= 1:
        raise ConfigError(f"spike.factor must be > 1 (or 0: off), got {cfg.spike.factor}")
    if cfg.spike.grad_norm_factor and cfg.spike.grad_norm_factor <= 1:
        raise ConfigError(f"spike.grad_norm_factor must be > 1 (or 0: off), got {cfg.spike.grad_norm_factor}")
    if cfg.spike.stat not in ("median", "mean"):
        raise ConfigError(f"spike.stat='{cfg.spike.stat}' must be median or mean")
    if cfg.spike.window < 1:
        raise ConfigError(f"spike.window must be positive, got {cfg.spike.window}")
    if cfg.lm_eval.every and not cfg.lm_eval.tasks:
        raise ConfigError(f"lm_eval.every={cfg.lm_eval.every} but lm_eval.tasks is empty; name the tasks to run")
    if cfg.wandb.history not in ("auto", "rewind", "fork"):
        raise ConfigError(f"wandb.history='{cfg.wandb.history}' must be auto, rewind or fork")
    if cfg.wandb.mode not in ("auto", "online", "offline", "disabled"):
        raise ConfigError(f"wandb.mode='{cfg.wandb.mode}' must be auto, online, offline or disabled")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device='{t.device}' must be auto, cpu, cuda or cuda:N")
    keys = flat_config(to_dict(cfg))
    for entry in t.resume_changes:
        if not any(_covers(entry, key) for key in keys):
            raise ConfigError(f"train.resume_changes: unknown config key '{entry}'")
        if any(_covers(fixed, entry) for fixed in FIXED_ON_RESUME):
            raise ConfigError(
                f"train.resume_changes: {entry} cannot change in a run; start a new run from its weights "
                "(train.init_from=<checkpoint>, another train.run_dir)"
            )


def check_peft(cfg: ExperimentConfig) -> None:
    """The `peft` section against itself and against what this slice of adaptation supports."""
    p, t = cfg.peft, cfg.train
    if p.method not in PEFT_METHODS:
        raise ConfigError(f"peft.method='{p.method}' must be one of {', '.join(PEFT_METHODS)}")
    if p.quantize not in ("none", "nf4"):
        raise ConfigError(f"peft.quantize='{p.quantize}' must be none or nf4")
    if p.quantize == "nf4" and p.method == "none":
        raise ConfigError("peft.quantize=nf4 stores a frozen base in 4 bits: set peft.method (QLoRA: lora)")
    if p.quantize == "nf4" and t.strategy != "single":
        raise ConfigError(
            f"peft.quantize=nf4 runs under train.strategy=single (QLoRA on one GPU), got {t.strategy}; "
            "sharded adapter runs keep the base in its precision"
        )
    if p.method == "none":
        if p.init_from is not None:
            raise ConfigError("peft.init_from is set but peft.method=none; set peft.method=lora or prompt_tuning")
        return
    if p.method == "lora":
        if p.init_text is not None:
            raise ConfigError("peft.init_text starts prompt tuning's virtual tokens; peft.method=lora has none")
        if p.rank < 1:
            raise ConfigError(f"peft.rank must be positive, got {p.rank}")
        if not p.alpha > 0:
            raise ConfigError(f"peft.alpha must be positive, got {p.alpha}")
        if not 0.0 <= p.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {p.dropout}")
        unknown = [name for name in p.targets if name not in LORA_TARGETS]
        if unknown or not p.targets or len(set(p.targets)) != len(p.targets):
            raise ConfigError(
                f"peft.targets={list(p.targets)}: give each of {', '.join(LORA_TARGETS)} at most once, at least one"
            )
        if t.activation_checkpointing == Checkpointing.llama and p.dropout > 0:
            raise ConfigError(
                f"peft.dropout={p.dropout} is not supported with train.activation_checkpointing=llama (its "
                "hand-written backward computes no LoRA dropout); set peft.dropout=0, or use selective or full"
            )
    else:
        if p.virtual_tokens < 1:
            raise ConfigError(f"peft.virtual_tokens must be positive, got {p.virtual_tokens}")
        if cfg.data.seq_len + p.virtual_tokens > cfg.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={cfg.data.seq_len} + peft.virtual_tokens={p.virtual_tokens} exceeds "
                f"model.max_seq_len={cfg.model.max_seq_len}; shorten one of them"
            )
        if cfg.data.document_attention:
            raise ConfigError(f"peft.method={p.method} is not supported with data.document_attention yet")
        if p.method == "prefix_tuning" and p.init_text is not None:
            raise ConfigError("peft.init_text starts prompt tuning's virtual tokens; prefix_tuning's start random")
        if p.method == "prefix_tuning" and t.activation_checkpointing == Checkpointing.llama:
            raise ConfigError(
                "peft.method=prefix_tuning is not supported with train.activation_checkpointing=llama (its "
                "hand-written attention has no prefix); use selective or full"
            )
    if t.tensor_parallel > 1:
        raise ConfigError(
            f"peft.method={p.method} is not supported with train.tensor_parallel={t.tensor_parallel} (the adapter's "
            "layers have no tensor-parallel plan); shard with train.strategy=fsdp or deepspeed and tensor_parallel=1"
        )


def tensor_parallel_shapes(cfg: ExperimentConfig) -> dict[str, int]:
    """What tensor parallelism splits, by config key: heads, kv heads, feed-forward width, vocabulary, sequence."""
    m = cfg.model
    return {
        "model.n_heads": m.n_heads,
        "model.n_kv_heads": m.kv_heads,
        "model.ffn_hidden_dim": m.hidden_dim,
        "model.vocab_size": m.vocab_size,
        "model.max_seq_len": m.max_seq_len,
        "data.seq_len": cfg.data.seq_len,
    }


def divisors(n: int) -> list[int]:
    """The numbers that divide `n`, in order (the choices offered when a split does not divide)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def tensor_parallel_degrees(cfg: ExperimentConfig, limit: int = 64) -> list[int]:
    """The tensor-parallel degrees up to `limit` that divide everything tensor parallelism splits."""
    shapes = tensor_parallel_shapes(cfg).values()
    return [t for t in range(1, limit + 1) if all(value % t == 0 for value in shapes)]


def check_launch(cfg: ExperimentConfig) -> None:
    """The global batch against the data-parallel ranks of this launch (WORLD_SIZE), before any rank starts: a
    batch that does not split is one `CommandLineError`, the same on every rank."""
    t, seq = cfg.train, cfg.data.seq_len
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if t.strategy == "single" or world % t.tensor_parallel:  # one process each; a bad split: the strategy says so
        return
    ranks, micro_batches = world // t.tensor_parallel, t.global_batch_tokens // (t.micro_batch_size * seq)
    if micro_batches % ranks:
        *fewer, most = [str(n * t.tensor_parallel) for n in divisors(micro_batches)]
        fits = f"{', '.join(fewer)} or {most}" if fewer else most
        raise CommandLineError(
            f"train.global_batch_tokens={t.global_batch_tokens} is {micro_batches} micro-batches of "
            f"train.micro_batch_size={t.micro_batch_size} x data.seq_len={seq}, which do not split over the {ranks} "
            f"data-parallel ranks of this launch (WORLD_SIZE={world}); launch {fits} processes, or make "
            f"train.global_batch_tokens a multiple of {t.micro_batch_size * seq * ranks}"
        )


def check_tensor_parallel(cfg: ExperimentConfig) -> None:
    """`train.tensor_parallel` against the strategy and the shapes it splits; one line naming the fix."""
    t, tp = cfg.train, cfg.train.tensor_parallel
    if tp < 1:
        raise ConfigError(f"train.tensor_parallel must be >= 1, got {tp}")
    if tp == 1:
        return
    if t.strategy != "fsdp":
        fix = "use train.strategy=fsdp (FSDP2 over the data-parallel ranks, tensor parallel inside a node)"
        raise ConfigError(f"train.tensor_parallel={tp} needs train.strategy=fsdp, got {t.strategy}: {fix}")
    for key, value in tensor_parallel_shapes(cfg).items():
        if value % tp:
            allowed = tensor_parallel_degrees(cfg)
            raise ConfigError(f"train.tensor_parallel={tp} does not divide {key}={value}; choose one of {allowed}")
    if t.compile:
        raise ConfigError(
            f"train.compile with train.tensor_parallel={tp} is not supported yet; set train.compile=false"
        )


# What a resumed run cannot change: the model, and what the data position of its checkpoint means.
# The adapter's shape and scaling are part of the model.
FIXED_ON_RESUME = (
    "model",
    *(f"peft.{key}" for key in ("method", "rank", "alpha", "targets", "virtual_tokens", "quantize")),
    *("data.seq_len", "data.seed", "data.sources", "data.weights", "train.global_batch_tokens"),
)
# What it may change freely: names, logging and saving, and where and how the same steps are computed.
FREE_ON_RESUME = (
    "name",
    "wandb",
    "metrics",
    "spike",
    "lm_eval",
    "data.root",
    "data.tokenizer",
    "peft.init_text",  # how a new adapter starts; a resumed one comes from its checkpoint
    "peft.init_from",
    *(
        f"train.{key}"
        for key in (
            "micro_batch_size device precision strategy fsdp_shard_size tensor_parallel reshard_after_forward "
            "zero_stage offload_optimizer offload_params deepspeed_json activation_checkpointing compile "
            "loss_chunk_tokens seed run_dir log_every eval_every eval_batches save_every async_save keep_last "
            "keep_every on_nan "
            "stop_at resume init_from resume_changes verify_checkpoints max_consecutive_skips skip_batches "
            "profile_steps hang_timeout_s"
        ).split()
    ),
)
# Any other key (optim.*, train.steps, data.document_attention, and keys added later) changes what the rest
# of the run trains: a resumed run applies its new value only when train.resume_changes names it.


def _covers(entry: str, key: str) -> bool:
    """Whether `entry` (a key or a section) is `key` or a section holding it."""
    return key == entry or key.startswith(entry + ".")


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """`section.key` -> value of a config as `to_dict` gives it (a mapping such as data.weights stays one value)."""
    flat = {}
    for name, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{key}": v for key, v in value.items()})
        else:
            flat[name] = value
    return flat


def resume_changes(
    saved: dict[str, Any], cfg: ExperimentConfig, checkpoint: str | os.PathLike
) -> tuple[list[str], list[str]]:
    """The changes from `saved` (the config in `checkpoint`) as "key: old -> new": (those to what is
    trained, which `train.resume_changes` names; those to how it runs, which need no naming). Any other
    change to what is trained is refused with one ConfigError naming every such key, its two values and
    what to do instead."""
    if "train" not in saved:  # weights only (`import`): nothing to resume, as CheckpointManager.load says
        return [], []
    old, new = flat_config(saved), flat_config(to_dict(cfg))
    # train.tokens only decides train.steps, which is compared: a budget given as steps instead is no change
    differ = [key for key in old if key in new and old[key] != new[key] and key != "train.tokens"]
    free = [key for key in differ if any(_covers(entry, key) for entry in FREE_ON_RESUME)]
    changed = [key for key in differ if key not in free]
    fixed = [key for key in changed if any(_covers(entry, key) for entry in FIXED_ON_RESUME)]
    unnamed = [
        key for key in changed if key not in fixed and not any(_covers(e, key) for e in cfg.train.resume_changes)
    ]

    def described(keys: list[str]) -> list[str]:
        return [f"{key}: {old[key]} -> {new[key]}" for key in keys]

    def values(keys: list[str]) -> str:
        return ", ".join(described(keys))

    problems = []
    if fixed:
        problems.append(
            f"{values(fixed)} cannot change in a run; set them back, or start a new run from its weights: "
            f"train.init_from={checkpoint} with another train.run_dir"
        )
    if unnamed:
        problems.append(
            f"{values(unnamed)} would change the rest of the run; set them back, or apply them on purpose with "
            f"train.resume_changes=[{','.join(unnamed)}] (README: extending a run)"
        )
    if problems:
        raise ConfigError(f"resuming {checkpoint} with a changed config: {'; '.join(problems)}")
    return described(changed), described(free)


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as plain Python containers (for logging and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
