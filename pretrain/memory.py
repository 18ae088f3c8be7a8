"""Memory per GPU of a training configuration: parameters, gradients, optimizer states, activations.

A planner, not a measurement: byte counts per parameter follow what each strategy keeps (below), and
activation bytes per token per layer follow what each activation-checkpointing mode saves, the same
tensors that `bench/activation_memory.py` measures (the tests hold the two within a few percent).

Bytes per parameter, bf16 training with fp32 master weights and AdamW (two fp32 moments):

| strategy | parameters | gradients | optimizer (master + moments) |
|---|---|---|---|
| single | 4 (fp32; + 2 for autocast's bf16 copies) | 4 | 8 |
| fsdp | 4 / N (fp32 shards) | 4 / N | 8 / N |
| fsdp x tensor parallel T | 4 / (N_shard T) | 4 / (N_shard T) | 8 / (N_shard T) |
| deepspeed ZeRO-0 | 2 | 2 (+ 4 at the step) | 12 |
| ZeRO-1 | 2 | 6 (bf16 + fp32 accumulation) | 12 / N |
| ZeRO-2 | 2 | 4 / N | 12 / N |
| ZeRO-3 | 2 / N | 4 / N | 12 / N |

plus, for the sharded ones, the gathered bf16 parameters and gradients of about two blocks at a time
(1/T of a block each under tensor parallelism). N_shard: the data-parallel GPUs one copy of the model
is sharded over (`train.fsdp_shard_size`, or all of them).
Optimizer offload (ZeRO-Offload, DeepSpeedCPUAdam) moves the optimizer column to CPU memory, and at ZeRO-1/2
6 / N more there (the fp32 gradient partition and a bf16 copy of it, DeepSpeed's stage_1_and_2.py); parameter
offload (ZeRO-3) the first column.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pretrain.adapters import adapter_parameters
from pretrain.config import Checkpointing, ExperimentConfig, tensor_parallel_degrees
from pretrain.model import ModelArgs, count_params
from pretrain.quantize import nf4_bytes_per_parameter

GPU_MEMORY_GB = {"a100-40gb": 40, "a100-80gb": 80, "h100-80gb": 80, "h200": 141}


def activation_elements_per_token(args: ModelArgs, mode: Checkpointing, tensor_parallel: int = 1) -> float:
    """Elements one transformer block keeps per token for its backward pass, by checkpointing mode, on each
    of `tensor_parallel` ranks (tensor + sequence parallel).

    `llama` keeps x, q, k, v, the attention output, h, a and b (plus a logsumexp per head); `selective`
    also keeps one more model-width tensor; `none` keeps everything autograd saves (about 10 model
    widths and 4 feed-forward widths: norm inputs and outputs, RoPE'd and repeated q k v, attention
    output, residuals, a, b, silu(a) and the SwiGLU product); `full` keeps only the block input.

    Under tensor + sequence parallelism (Korthikanti et al. 2022, whose 34/t is `none` with the
    gathered inputs re-gathered) every kept tensor is split over the T ranks, by heads, feed-forward
    slice or sequence, except what the DTensor plans keep whole: `none` the two gathered normed
    inputs of the column-parallel matmuls (2 model widths), `selective` the outputs of wo and w2
    before they are reduce-scattered. `llama` keeps no whole tensor: it gathers the normed inputs
    again in the backward. (Measured for none, full and llama at T = 1, 2, 4: tests/test_memory.py.)
    """
    d, kv, f, heads = args.dim, args.kv_heads * args.head_dim, args.hidden_dim, args.n_heads
    llama = 4 * d + 2 * kv + 2 * f + heads
    whole, split = {  # (elements every rank keeps whole, elements split over the ranks)
        Checkpointing.llama: (0, llama),
        Checkpointing.selective: (2 * d, llama + d - 2 * d),
        Checkpointing.none: (2 * d, 10 * d + 4 * f + heads - 2 * d),
        Checkpointing.full: (0, d),
    }[mode]
    return whole + split / tensor_parallel


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
    tp = t.tensor_parallel if t.strategy == "fsdp" else 1  # each layer split over tp GPUs
    autocast_copies = t.precision != "fp32" and t.activation_checkpointing != Checkpointing.llama
    peft = cfg.peft.method != "none"
    trained = adapter_parameters(cfg) if peft else total  # what has gradients and optimizer states
    if t.strategy == "single" and peft:  # the frozen base in its storage; gradients and AdamW for the adapter only
        n = 1
        params, grads, optim = frozen_base_bytes(cfg, total, layer) + 4.0 * trained, 4.0 * trained, 8.0 * trained
        transient = 2.0 * layer  # a frozen weight is cast per use (autocast caches only trained leaves)
        if cfg.peft.quantize == "nf4":  # one matrix dequantized at a time: ~22 B a value, measured on the CPU
            transient = 22.0 * args.dim * args.hidden_dim  # (torchao builds int64 indices), peak RSS, 2026-12-07
    elif t.strategy == "single":
        n = 1
        params, grads, optim = 4.0 * total, 4.0 * total, 8.0 * total
        transient = 2.0 * total if autocast_copies else 2.0 * layer  # autocast's bf16 weights, kept for backward
    elif t.strategy == "fsdp":
        shards = (t.fsdp_shard_size or max(n // tp, 1)) * tp  # GPUs one copy of the model is split over
        stored = total + trained if peft else total  # fp32 shards, the frozen base's too
        params, grads, optim = 4 * stored / shards, 4 * trained / shards, 8 * trained / shards
        # two blocks' gathered bf16 weights; one's bf16 + fp32 gradients
        transient = (2 * 2 * layer + 6 * layer * trained / total) / tp
        if not t.reshard_after_forward:
            transient += 2.0 * total / tp  # every block's gathered weights, from forward to backward
    else:
        stage = t.zero_stage
        stored = total + trained if peft else total  # the module in bf16, the frozen base's weights too
        params = 2.0 * stored / (n if stage == 3 else 1)
        # ZeRO-0: bf16 gradients (plus an fp32 copy at the step); ZeRO-1: bf16 + fp32 accumulation buffers
        grads = {0: 2.0 * trained, 1: 6.0 * trained}.get(stage, 4.0 * trained / n)
        optim = 12.0 * trained / (1 if stage == 0 else n)
        transient = 2 * 2 * layer + 4 * layer if stage == 3 else 4 * trained if stage == 0 else 4 * layer
    offloaded = 0.0
    if t.strategy == "deepspeed" and t.offload_optimizer:  # ZeRO-Offload: DeepSpeedCPUAdam on CPU partitions
        # fp32 master + moments, and (ZeRO-1/2) the fp32 gradient partition and a bf16 staging copy of it
        offloaded, optim = offloaded + optim + (6.0 * trained / n if t.zero_stage in (1, 2) else 0.0), 0.0
    if t.strategy == "deepspeed" and t.offload_params:
        offloaded, params = offloaded + params, 0.0
    tokens = t.micro_batch_size * cfg.data.seq_len
    mode = t.activation_checkpointing
    per_layer = activation_elements_per_token(args, mode, tp) * act_bytes * tokens
    activations = args.n_layers * per_layer
    if mode == Checkpointing.full:  # one block's full activations while it is recomputed
        activations += activation_elements_per_token(args, Checkpointing.none, tp) * act_bytes * tokens
    logit_tokens = min(tokens, t.loss_chunk_tokens) if t.loss_chunk_tokens else tokens
    # logits, their fp32 copy and gradient; vocabulary-parallel under tensor parallelism
    activations += logit_tokens * args.vocab_size / tp * (act_bytes + 4 + 4)
    return MemoryPlan(params, grads, optim, activations, transient, offloaded)


def frozen_base_bytes(cfg: ExperimentConfig, total: float, layer: float) -> float:
    """Bytes of an adapter run's frozen base on one GPU: fp32 (4 a parameter) under train.precision=fp32, else
    bf16 (2: nothing trains it, so no fp32 master); with peft.quantize=nf4 the blocks' matrices at NF4's 0.5 bytes
    plus its double-quantized scales (`pretrain.quantize.nf4_bytes_per_parameter`), the rest in bf16."""
    per = 4.0 if cfg.train.precision == "fp32" else 2.0
    if cfg.peft.quantize != "nf4":
        return per * total
    args = cfg.model
    matrices = args.n_layers * (layer - 2 * args.dim)  # each block's seven matrices (its two norms aside)
    return nf4_bytes_per_parameter() * matrices + per * (total - matrices)


def format_plan(cfg: ExperimentConfig, world_size: int, gpu_gb: float) -> str:
    """A table of the memory per GPU and whether it fits `gpu_gb`."""
    p, t = plan_memory(cfg, world_size), cfg.train
    where = strategy_name(cfg)
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
    """`fsdp`, `fsdp x tensor parallel 8`, `deepspeed ZeRO-3`, `single`, ... of a config."""
    t = cfg.train
    tp = f" x tensor parallel {t.tensor_parallel}" if t.tensor_parallel > 1 else ""
    return t.strategy + (f" ZeRO-{t.zero_stage}" if t.strategy == "deepspeed" else "") + tp


def with_train(cfg: ExperimentConfig, **changes) -> ExperimentConfig:
    """A copy of `cfg` with these `train.*` values."""
    return replace(cfg, train=replace(cfg.train, **changes))


def tensor_parallel_options(cfg: ExperimentConfig, step: int = 8) -> list[dict]:
    """`train.*` values of FSDP with the largest tensor-parallel degree (a divisor of a node's `step` GPUs)
    that the model's shapes and the sequence allow, when that is more than 1."""
    allowed = [t for t in tensor_parallel_degrees(cfg, step) if step % t == 0]
    return [{"strategy": "fsdp", "tensor_parallel": allowed[-1]}] if allowed[-1] > 1 else []


def fewest_sharded(cfg: ExperimentConfig, gpu_gb: float, step: int = 8) -> list[tuple[dict, int | None]]:
    """For each sharding strategy other than the config's own (FSDP, ZeRO-3, FSDP x tensor parallel inside
    a node): its `train.*` values and the fewest GPUs (multiples of `step`) it fits on, or None."""
    return [
        (changes, fewest_gpus(with_train(cfg, **changes), gpu_gb, step))
        for changes in (*SHARDING, *tensor_parallel_options(cfg, step))
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
