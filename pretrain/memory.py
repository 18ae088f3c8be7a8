"""Memory per GPU of a training configuration: parameters, gradients, optimizer states, activations.

A planner, not a measurement: byte counts per parameter follow what each strategy keeps (below), and
activation bytes per token per layer follow what each activation-checkpointing mode saves, the same
tensors that `bench/activation_memory.py` measures (the tests hold the two within a few percent).

Bytes per parameter, bf16 training with fp32 master weights and AdamW (two fp32 moments):

| strategy | parameters | gradients | optimizer (master + moments) |
|---|---|---|---|
| single | 4 (fp32; + 2 for autocast's bf16 copies) | 4 | 8 |
| fsdp | 4 / N (fp32 shards) | 4 / N | 8 / N |
| deepspeed ZeRO-0 | 2 | 2 (+ 4 at the step) | 12 |
| ZeRO-1 | 2 | 6 (bf16 + fp32 accumulation) | 12 / N |
| ZeRO-2 | 2 | 4 / N | 12 / N |
| ZeRO-3 | 2 / N | 4 / N | 12 / N |

plus, for the sharded ones, the gathered bf16 parameters and gradients of about two blocks at a time.
Optimizer offload moves the optimizer column to CPU memory; parameter offload (ZeRO-3) the first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pretrain.config import Checkpointing, ExperimentConfig
from pretrain.model import ModelArgs, count_params

GPU_MEMORY_GB = {"a100-40gb": 40, "a100-80gb": 80, "h100-80gb": 80, "h200": 141}


def activation_elements_per_token(args: ModelArgs, mode: Checkpointing) -> float:
    """Elements one transformer block keeps per token for its backward pass, by checkpointing mode.

    `llama` keeps x, q, k, v, the attention output, h, a and b (plus a logsumexp per head); `selective`
    also keeps one more model-width tensor; `none` keeps everything autograd saves (about 10 model
    widths and 4 feed-forward widths: norm inputs and outputs, RoPE'd and repeated q k v, attention
    output, residuals, a, b, silu(a) and the SwiGLU product); `full` keeps only the block input.
    """
    d, kv, f, heads = args.dim, args.kv_heads * args.head_dim, args.hidden_dim, args.n_heads
    llama = 4 * d + 2 * kv + 2 * f + heads
    return {
        Checkpointing.llama: llama,
        Checkpointing.selective: llama + d,
        Checkpointing.none: 10 * d + 4 * f + heads,
        Checkpointing.full: d,
    }[mode]


@dataclass
class MemoryPlan:
    """Bytes per GPU (and per node's CPU for offloaded state) of one configuration."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    transient: float
    cpu_offloaded: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.transient


def plan_memory(cfg: ExperimentConfig, world_size: int, act_bytes: int = 2) -> MemoryPlan:
    """Memory per GPU of `cfg` on `world_size` GPUs (bf16 activations by default)."""
    args, t = cfg.model, cfg.train
    total, _ = count_params(args)
    layer = (total - 2 * args.vocab_size * args.dim) / args.n_layers
    n = world_size
    autocast_copies = t.precision != "fp32" and t.activation_checkpointing != Checkpointing.llama
    if t.strategy == "single":
        n = 1
        params, grads, optim = 4.0 * total, 4.0 * total, 8.0 * total
        transient = 2.0 * total if autocast_copies else 2.0 * layer  # autocast's bf16 weights, kept for backward
    elif t.strategy == "fsdp":
        params, grads, optim = 4 * total / n, 4 * total / n, 8 * total / n
        transient = 2 * 2 * layer + 6 * layer  # two blocks' gathered bf16 weights; one's bf16 + fp32 gradients
        if not t.reshard_after_forward:
            transient += 2.0 * total  # every block's gathered weights, from forward to backward
    else:
        stage = t.zero_stage
        params = 2.0 * total / (n if stage == 3 else 1)
        # ZeRO-0: bf16 gradients (plus an fp32 copy at the step); ZeRO-1: bf16 + fp32 accumulation buffers
        grads = {0: 2.0 * total, 1: 6.0 * total}.get(stage, 4.0 * total / n)
        optim = 12.0 * total / (1 if stage == 0 else n)
        transient = 2 * 2 * layer + 4 * layer if stage == 3 else 4 * total if stage == 0 else 4 * layer
    offloaded = 0.0
    if t.strategy == "deepspeed" and t.offload_optimizer:
        offloaded, optim = offloaded + optim, 0.0
    if t.strategy == "deepspeed" and t.offload_params:
        offloaded, params = offloaded + params, 0.0
    tokens = t.micro_batch_size * cfg.data.seq_len
    mode = t.activation_checkpointing
    per_layer = activation_elements_per_token(args, mode) * act_bytes * tokens
    activations = args.n_layers * per_layer
    if mode == Checkpointing.full:  # one block's full activations while it is recomputed
        activations += activation_elements_per_token(args, Checkpointing.none) * act_bytes * tokens
    logit_tokens = min(tokens, t.loss_chunk_tokens) if t.loss_chunk_tokens else tokens
    activations += logit_tokens * args.vocab_size * (act_bytes + 4 + 4)  # logits, their fp32 copy and gradient
    return MemoryPlan(params, grads, optim, activations, transient, offloaded)


def format_plan(cfg: ExperimentConfig, world_size: int, gpu_gb: float) -> str:
    """A table of the memory per GPU and whether it fits `gpu_gb`."""
    p, t = plan_memory(cfg, world_size), cfg.train
    where = t.strategy + (f" ZeRO-{t.zero_stage}" if t.strategy == "deepspeed" else "")
    offload = " + optimizer offload" if t.offload_optimizer else ""
    offload += " + parameter offload" if t.offload_params else ""
    gb = 1e9
    rows = [
        ("parameters", p.parameters),
        ("gradients", p.gradients),
        ("optimizer states", p.optimizer),
        (
            f"activations ({t.activation_checkpointing.value}, micro-batch {t.micro_batch_size} x {cfg.data.seq_len})",
            p.activations,
        ),
        ("gathered / working buffers", p.transient),
    ]
    gpus = 1 if t.strategy == "single" else world_size
    lines = [f"{cfg.name}: {gpus} GPU(s), {where}{offload}; memory per GPU"]
    lines += [f"  {name:<58}{value / gb:>10.1f} GB" for name, value in rows]
    lines.append(
        f"  {'total':<58}{p.total / gb:>10.1f} GB  of {gpu_gb:g} GB: {'fits' if fits(p, gpu_gb) else 'does NOT fit'}"
    )
    if p.cpu_offloaded:
        lines.append(f"  {'offloaded to CPU memory (per GPU)':<58}{p.cpu_offloaded / gb:>10.1f} GB")
    return "\n".join(lines)


def fits(plan: MemoryPlan, gpu_gb: float, headroom: float = 0.9) -> bool:
    """Whether the plan fits in `headroom` of the GPU (the rest: CUDA context, fragmentation)."""
    return plan.total <= headroom * gpu_gb * 1e9


def fewest_gpus(cfg: ExperimentConfig, gpu_gb: float, step: int = 8, limit: int = 65536) -> int | None:
    """The smallest multiple of `step` GPUs on which `cfg` fits, or None up to `limit`."""
    if not fits(plan_memory(cfg, limit), gpu_gb):  # memory per GPU only falls as GPUs are added
        return None
    n = step
    while n <= limit:
        if fits(plan_memory(cfg, n), gpu_gb):
            return n
        n += step
    return None


# The strategies that shard parameters, gradients and optimizer states over the GPUs: train.* overrides.
SHARDING = ({"strategy": "fsdp"}, {"strategy": "deepspeed", "zero_stage": 3})


def strategy_name(cfg: ExperimentConfig) -> str:
    """`fsdp`, `deepspeed ZeRO-3`, `single`, ... of a config."""
    t = cfg.train
    return t.strategy + (f" ZeRO-{t.zero_stage}" if t.strategy == "deepspeed" else "")


def with_train(cfg: ExperimentConfig, **changes) -> ExperimentConfig:
    """A copy of `cfg` with these `train.*` values."""
    return replace(cfg, train=replace(cfg.train, **changes))


def fewest_sharded(cfg: ExperimentConfig, gpu_gb: float, step: int = 8) -> list[tuple[dict, int | None]]:
    """For each sharding strategy other than the config's own: its `train.*` values and the fewest GPUs
    (multiples of `step`) it fits on, or None."""
    return [
        (changes, fewest_gpus(with_train(cfg, **changes), gpu_gb, step))
        for changes in SHARDING
        if any(getattr(cfg.train, key) != value for key, value in changes.items())
    ]


def why_not(cfg: ExperimentConfig, gpu_gb: float, limit: int = 65536) -> str:
    """Why `cfg` fits on no number of GPUs: what each GPU keeps whatever their number."""
    p, gb = plan_memory(cfg, limit), 1e9
    parts = [
        (name, value)
        for name, value in (
            ("parameters", p.parameters),
            ("gradients", p.gradients),
            ("optimizer states", p.optimizer),
            ("activations", p.activations),
            ("working buffers", p.transient),
        )
        if value >= 0.01 * gpu_gb * gb
    ]
    kept = ", ".join(f"{name} {value / gb:,.1f} GB" for name, value in parts)
    usable = f"{p.total / gb:,.1f} GB in all, of {0.9 * gpu_gb:g} GB usable"
    if cfg.train.strategy == "single":
        return f"train.strategy=single shards nothing, one GPU holds it all: {kept} ({usable})"
    return f"under {strategy_name(cfg)} each GPU keeps at least {kept} ({usable}) however many there are"
