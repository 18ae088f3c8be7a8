"""The layout planner: predicted step time, tokens/sec/GPU, MFU and GPU-hours of a config on a GPU cluster.

    step time = compute + recomputation + the communication not hidden behind compute + optimizer step

Compute is counted, not estimated: one forward and backward of the model (one and two layers, on the
`meta` device, under the layout's activation-checkpointing mode and micro-batch) runs under a dispatch
mode that lists every GEMM with its shape, every attention kernel and the bytes every other kernel
reads and writes. The GPU kind (`configs/gpus.yaml`, constants cited there) turns them into seconds:

    GEMM              2mnk / matmul_flops + matmul_overhead_s      (per GEMM; 1/T of it per tensor-parallel rank)
    attention         causal FLOPs / attention_flops + matmul_overhead_s
    memory-bound op   bytes / memory_bandwidth + op_overhead_s

Recomputation is what the mode's GEMMs and attention cost beyond `none`'s (the `full` mode's second
forward); its memory-bound work is in compute. Communication: what FSDP, ZeRO and tensor parallelism
issue per layer and micro-batch (sizes as `pretrain.parallel.comm_model` counts them), each collective
timed by NCCL's own latency + bandwidth model on the level it crosses (NVLink inside a node, one NIC per
GPU between nodes; ring, or the faster of ring and tree for all-reduce). FSDP and ZeRO-3 prefetch: a
layer's all-gathers hide behind the previous layer's compute and its reduce-scatter behind the next
one's, so per layer only max(0, communication - compute) shows; tensor-parallel collectives show whole
except the ones the `llama` backward overlaps with its weight-gradient matmuls. Memory comes from
`pretrain.memory.plan_memory`; a layout that does not fit in 90% of the GPU is listed as not fitting.

Limits: no pipeline parallelism, no stragglers or failures (the published runs include restarts),
perfect load balance, bandwidth of a level shared by nothing else, and kernel rates that do not depend
on the rest of the step. `bench/layout_cpu.py` checks the same model against runs on this machine.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Optional
from unittest import mock

from pretrain.config import Checkpointing, ConfigError, ExperimentConfig, Precision, tensor_parallel_degrees
from pretrain.memory import fits, plan_memory, strategy_name, with_train
from pretrain.model import ModelArgs, count_params, flops_per_token, tensor_parallel_params

KINDS_FILE = Path(__file__).resolve().parent.parent / "configs" / "gpus.yaml"

# NCCL's latency model (src/graph/tuning.cc of NCCL 2.7-2.8, Simple protocol: baseLat ring 8.4 us; hwLat ring
# NVLink 5.7, network 6.6; tree NVLink 28, network 50 us). Later versions use other figures (ring NVLink
# 3.4 us, network 9.6-14 us): a per-step latency of this order, not an exact one.
RING_BASE_LATENCY_S = 8.4e-6
NVLINK_STEP_LATENCY_S = 5.7e-6
NET_STEP_LATENCY_S = 6.6e-6
TREE_NVLINK_LATENCY_S = 28e-6
TREE_NET_LATENCY_S = 50e-6
ADAMW_BYTES_PER_PARAM = 28  # fp32 AdamW: read parameter, gradient, two moments; write parameter, two moments
HEADROOM = 0.9  # the share of GPU memory a plan may use (memory.fits)


@dataclass(frozen=True)
class GpuKind:
    """What the cost model needs of one GPU kind; every rate per GPU (per process for `cpu`)."""

    name: str
    memory_gb: float
    peak_flops: float  # MFU is reported against this
    matmul_flops: float  # achieved rate of a large GEMM
    matmul_overhead_s: float  # fixed time per GEMM (and attention kernel) on top of flops / rate
    attention_flops: float  # causal attention forward + backward
    memory_bandwidth: float  # bytes/s achieved by memory-bound kernels
    op_overhead_s: float  # fixed time per memory-bound kernel
    gpus_per_node: int
    intra_node_bw: float  # bytes/s, bus bandwidth of a collective inside a node
    inter_node_bw: float  # bytes/s, per GPU, between nodes
    intra_node_latency_s: float = NVLINK_STEP_LATENCY_S
    inter_node_latency_s: float = NET_STEP_LATENCY_S
    collective_base_latency_s: float = RING_BASE_LATENCY_S
    overlap: float = 1.0  # share of overlappable communication that hides behind compute (a CPU: none)
    comm_compute_share: float = 0.0  # share of the GPU a running collective's kernels take from compute
    dtype_bytes: int = 2  # bytes of the activations and gathered parameters (bf16); 4 on a CPU (fp32)
    # Framework time on the host that a GPU hides behind its kernels, but a CPU pays in full (calibrated):
    step_overhead_s: float = 0.0  # per optimizer step (optimizer bookkeeping, clipping, the loss's .item())
    fsdp_collective_overhead_s: float = 0.0  # per FSDP all-gather or reduce-scatter (hooks, copy-in and out)
    tp_op_overhead_s: float = 0.0  # per kernel under tensor parallelism (DTensor's dispatch)


def load_kinds(extra: Optional[str] = None) -> dict[str, GpuKind]:
    """The GPU kinds of `configs/gpus.yaml`, then those of `extra` (a YAML of the same layout) on top."""
    from omegaconf import OmegaConf

    kinds: dict[str, GpuKind] = {}
    names = {f.name for f in fields(GpuKind)} - {"name"}
    for path in [KINDS_FILE] + ([Path(extra)] if extra else []):
        if not path.is_file():
            raise ConfigError(f"{path}: no such file of GPU kinds")
        try:
            data = OmegaConf.to_container(OmegaConf.load(path))
        except Exception as e:  # yaml's errors
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of GPU kinds")
        for name, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: {name}: expected a mapping of figures")
            unknown = set(values) - names
            if unknown:
                raise ConfigError(f"{path}: {name}: unknown key(s) {', '.join(sorted(unknown))}")
            merged = {**(asdict(kinds[name]) if name in kinds else {}), **values, "name": name}
            required = {f.name for f in fields(GpuKind) if f.default is MISSING}
            if required - set(merged):
                raise ConfigError(f"{path}: {name}: missing key(s) {', '.join(sorted(required - set(merged)))}")
            for key, value in merged.items():
                if key != "name" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                    raise ConfigError(f"{path}: {name}.{key}: expected a number >= 0, got {value!r}")
            for key in ("memory_gb", "peak_flops", "matmul_flops", "attention_flops", "memory_bandwidth",
                        "gpus_per_node", "intra_node_bw", "inter_node_bw"):  # fmt: skip
                if not merged[key] > 0:
                    raise ConfigError(f"{path}: {name}.{key} must be > 0, got {merged[key]}")
            if merged.get("dtype_bytes", 2) not in (2, 4):
                raise ConfigError(f"{path}: {name}.dtype_bytes must be 2 (bf16) or 4 (fp32)")
            kinds[name] = GpuKind(**merged)
    return kinds


def get_kind(name: str, extra: Optional[str] = None) -> GpuKind:
    kinds = load_kinds(extra)
    if name not in kinds:
        raise ConfigError(f"--gpu {name}: one of {', '.join(kinds)} (or add it to a YAML given with --kinds)")
    return kinds[name]


# --- compute, counted -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """What one forward + backward of one micro-batch runs (see `count_step`)."""

    gemms: tuple[tuple[float, int], ...]  # (FLOPs of one GEMM, how many)
    attention_flops: float  # causal FLOPs of attention kernels, forward + backward
    attention_kernels: int
    memory_bytes: float  # bytes read + written by every other kernel
    memory_ops: int

    def __sub__(self, other: "Counts") -> "Counts":
        gemms = dict(self.gemms)
        for flops, n in other.gemms:
            gemms[flops] = gemms.get(flops, 0) - n
        return Counts(
            tuple(sorted(gemms.items())),
            self.attention_flops - other.attention_flops,
            self.attention_kernels - other.attention_kernels,
            self.memory_bytes - other.memory_bytes,
            self.memory_ops - other.memory_ops,
        )

    def scaled(self, factor: float, plus: "Counts") -> "Counts":
        """`plus` + factor x self (the blocks of L layers from one block's counts)."""
        gemms = dict(plus.gemms)
        for flops, n in self.gemms:
            gemms[flops] = gemms.get(flops, 0) + n * factor
        return Counts(
            tuple(sorted(gemms.items())),
            plus.attention_flops + factor * self.attention_flops,
            plus.attention_kernels + round(factor * self.attention_kernels),
            plus.memory_bytes + factor * self.memory_bytes,
            plus.memory_ops + round(factor * self.memory_ops),
        )

    @property
    def gemm_flops(self) -> float:
        return sum(f * n for f, n in self.gemms)


FREE_OPS = {  # views and metadata: no kernel runs
    "view", "_unsafe_view", "t", "transpose", "expand", "as_strided", "detach", "alias", "unsqueeze", "squeeze",
    "select", "slice", "unbind", "permute", "split", "split_with_sizes", "promote_types", "lift_fresh", "reshape",
    "is_same_size", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "size", "stride",
    "_to_copy_noop",
}  # fmt: skip
GEMM_OPS = {"mm", "addmm", "bmm"}
ATTENTION_OPS = {
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
}


class _Tally:
    """What ran under `counting()`, turned into `Counts` by `result()`."""

    def __init__(self):
        self.gemms: dict[float, int] = {}
        self.attention_flops, self.attention_kernels, self.bytes, self.ops = 0.0, 0, 0.0, 0

    def result(self) -> Counts:
        return Counts(
            tuple(sorted(self.gemms.items())), self.attention_flops, self.attention_kernels, self.bytes, self.ops
        )


@contextmanager
def counting():
    """Count every kernel that runs inside (forward and backward): GEMMs by FLOPs, attention (as the one
    fused kernel it is on a GPU: on `meta` or the CPU `scaled_dot_product_attention` is swapped for the
    flash kernel's op), and the bytes and number of all other kernels. Yields a `_Tally`."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    tally = _Tally()

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in FREE_OPS:
                return out
            if name in GEMM_OPS:
                a, b = args[-2], args[-1]
                batch = a.shape[0] if a.dim() == 3 else 1
                flops = 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
                tally.gemms[flops] = tally.gemms.get(flops, 0) + 1
            elif name in ATTENTION_OPS:
                q = args[1] if "backward" in name else args[0]
                # the backward runs 5 GEMMs to the forward's 2
                tally.attention_flops += attention_flops(*q.shape) * (2.5 if "backward" in name else 1.0)
                tally.attention_kernels += 1
            else:
                tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
                tally.bytes += sum(t.numel() * t.element_size() for t in tensors)
                tally.ops += 1
            return out

    def flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if attn_mask is not None:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)
        if q.device.type == "cpu":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal)[0]
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal)[0]

    sdpa = F.scaled_dot_product_attention
    with mock.patch.object(F, "scaled_dot_product_attention", flash_attention), Counter():
        yield tally


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """FLOPs of causal attention's forward: QK^T and PV, half of each square."""
    return 4.0 * batch * heads * seq * seq * head_dim / 2


def _count_model(
    args: ModelArgs, seq: int, micro_batch: int, mode: Checkpointing, dtype_bytes: int, loss_chunk: int = 0
) -> Counts:
    """Run one forward + backward of `args` (on `meta`) and count what it runs."""
    import torch

    from pretrain import llama_backward
    from pretrain.model import Transformer
    from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing

    dtype = torch.bfloat16 if dtype_bytes == 2 else torch.float32
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    apply_activation_checkpointing(model, mode)
    model.loss_chunk_tokens = loss_chunk  # chunked: the output projection runs again in the backward
    tokens = torch.zeros(micro_batch, seq, dtype=torch.long, device="meta")
    on_cpu = (lambda t: True) if dtype_bytes == 4 else llama_backward.on_cpu  # fp32: a CPU run's kernels
    with counting() as tally, mock.patch.object(llama_backward, "on_cpu", on_cpu):
        model(tokens, tokens).backward()
    return tally.result()


def count_step(
    args: ModelArgs, seq: int, micro_batch: int, mode: Checkpointing, dtype_bytes: int, loss_chunk: int = 0
) -> Counts:
    """One micro-batch's forward + backward of the whole model: the counts of one and two layers, the
    second's difference (one block) times the remaining layers."""
    return _count_step(tuple(sorted(asdict(args).items())), seq, micro_batch, mode, dtype_bytes, loss_chunk)


@lru_cache(maxsize=256)
def _count_step(key: tuple, seq: int, micro_batch: int, mode: Checkpointing, dtype_bytes: int, chunk: int) -> Counts:
    args = ModelArgs(**dict(key))
    one = _count_model(replace(args, n_layers=1), seq, micro_batch, mode, dtype_bytes, chunk)
    two = _count_model(replace(args, n_layers=2), seq, micro_batch, mode, dtype_bytes, chunk)
    return (two - one).scaled(args.n_layers - 1, one)


def compute_seconds(c: Counts, kind: GpuKind, tensor_parallel: int = 1) -> float:
    """Seconds of `c` on one GPU of `kind`, each kernel split over `tensor_parallel` GPUs."""
    t = tensor_parallel
    gemm = sum(n * (f / t / kind.matmul_flops + kind.matmul_overhead_s) for f, n in c.gemms)
    attention = c.attention_flops / t / kind.attention_flops + c.attention_kernels * kind.matmul_overhead_s
    memory = c.memory_bytes / t / kind.memory_bandwidth + c.memory_ops * kind.op_overhead_s
    return gemm + attention + memory


def matmul_seconds(c: Counts, kind: GpuKind, tensor_parallel: int = 1) -> float:
    """The GEMM and attention part of `compute_seconds`."""
    t = tensor_parallel
    gemm = sum(n * (f / t / kind.matmul_flops + kind.matmul_overhead_s) for f, n in c.gemms)
    return gemm + c.attention_flops / t / kind.attention_flops + c.attention_kernels * kind.matmul_overhead_s


# --- communication ------------------------------------------------------------------------------------


def collective_seconds(kind: GpuKind, op: str, nbytes: float, ranks: int, nodes: int) -> float:
    """One NCCL collective of `nbytes` (the whole gathered or reduced tensor) over `ranks` GPUs on `nodes`
    nodes: latency per step by the link it crosses, bandwidth of the slowest link (a NIC once it spans
    nodes). All-reduce: the faster of ring and tree (NCCL picks by size)."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    bw = kind.inter_node_bw if nodes > 1 else kind.intra_node_bw
    steps = ranks - 1
    inter = nodes - 1 if nodes > 1 else 0
    step_latency = inter * kind.inter_node_latency_s + (steps - inter) * kind.intra_node_latency_s
    if op in ("all_gather", "reduce_scatter"):
        return kind.collective_base_latency_s + step_latency + steps / ranks * nbytes / bw
    ring = kind.collective_base_latency_s + 2 * step_latency + 2 * steps / ranks * nbytes / bw
    local = ranks // max(nodes, 1)
    tree_latency = 2 * (
        (local - 1) * TREE_NVLINK_LATENCY_S / 8 + math.ceil(math.log2(nodes)) * TREE_NET_LATENCY_S if nodes > 1 else 0
    )
    tree = tree_latency + 2 * nbytes / bw if nodes > 1 else math.inf
    return min(ring, tree)


# --- layouts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    strategy: str  # fsdp | deepspeed | single
    zero_stage: Optional[int]
    fsdp_shard_size: int  # 0: all data-parallel ranks
    tensor_parallel: int
    activation_checkpointing: str
    micro_batch_size: int

    def overrides(self) -> list[str]:
        """The `train.*` overrides that select this layout."""
        out = [f"train.strategy={self.strategy}"]
        if self.strategy == "deepspeed":
            out += [
                f"train.zero_stage={self.zero_stage}",
                "train.offload_optimizer=false",
                "train.offload_params=false",
            ]
        out.append(f"train.fsdp_shard_size={self.fsdp_shard_size}")
        out.append(f"train.tensor_parallel={self.tensor_parallel}")
        out.append(f"train.activation_checkpointing={self.activation_checkpointing}")
        out.append(f"train.micro_batch_size={self.micro_batch_size}")
        return out

    def apply(self, cfg: ExperimentConfig) -> ExperimentConfig:
        return with_train(
            cfg,
            strategy=self.strategy,
            zero_stage=self.zero_stage if self.zero_stage is not None else cfg.train.zero_stage,
            fsdp_shard_size=self.fsdp_shard_size,
            tensor_parallel=self.tensor_parallel,
            activation_checkpointing=Checkpointing(self.activation_checkpointing),
            micro_batch_size=self.micro_batch_size,
            offload_optimizer=False,  # the planner leaves offload out (it times GPU memory, not PCIe)
            offload_params=False,
        )

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> "Layout":
        t = cfg.train
        return cls(
            t.strategy,
            t.zero_stage if t.strategy == "deepspeed" else None,
            t.fsdp_shard_size if t.strategy == "fsdp" else 0,
            t.tensor_parallel if t.strategy == "fsdp" else 1,
            t.activation_checkpointing.value,
            t.micro_batch_size,
        )


@dataclass
class Prediction:
    """The predicted cost of one layout (seconds per optimizer step unless named otherwise)."""

    layout: Layout
    memory_gb: float
    fits: bool
    step_time_s: float
    compute_s: float
    recompute_s: float
    comm_exposed_s: float
    comm_total_s: float
    optimizer_s: float
    overhead_s: float
    tokens_per_sec_per_gpu: float
    mfu: float
    days: float
    gpu_hours: float
    name: str = ""

    def as_json(self) -> dict:
        lay = self.layout
        return {
            "strategy": lay.strategy,
            "zero_stage": lay.zero_stage,
            "fsdp_shard_size": lay.fsdp_shard_size,
            "tensor_parallel": lay.tensor_parallel,
            "activation_checkpointing": lay.activation_checkpointing,
            "micro_batch_size": lay.micro_batch_size,
            "memory_gb": round(self.memory_gb, 2),
            "fits": self.fits,
            "step_time_s": self.step_time_s,
            "compute_s": self.compute_s,
            "recompute_s": self.recompute_s,
            "comm_exposed_s": self.comm_exposed_s,
            "comm_total_s": self.comm_total_s,
            "optimizer_s": self.optimizer_s,
            "overhead_s": self.overhead_s,
            "tokens_per_sec_per_gpu": self.tokens_per_sec_per_gpu,
            "mfu": self.mfu,
            "days": self.days,
            "gpu_hours": self.gpu_hours,
            "overrides": lay.overrides(),
        }


def _nodes(ranks: int, stride: int, per_node: int) -> int:
    """Nodes a group of `ranks` GPUs spans when its members are `stride` apart (tensor parallel innermost)."""
    return max(1, math.ceil(ranks * stride / per_node))


def predict(cfg: ExperimentConfig, world_size: int, kind: GpuKind) -> Prediction:
    """The predicted step of `cfg` (its train.* layout) on `world_size` GPUs of `kind`."""
    args, t, seq = cfg.model, cfg.train, cfg.data.seq_len
    layout = Layout.of(cfg)
    T = layout.tensor_parallel
    n = 1 if t.strategy == "single" else world_size
    data = n // T
    b = t.micro_batch_size
    m = t.global_batch_tokens // (b * seq * data)  # micro-batches per rank per step
    mode = Checkpointing(layout.activation_checkpointing)
    p = kind.dtype_bytes
    L = args.n_layers
    chunk = t.loss_chunk_tokens
    counts = count_step(args, seq, b, mode, p, chunk)
    plain = count_step(args, seq, b, Checkpointing.none, p, chunk) if mode != Checkpointing.none else counts
    micro = compute_seconds(counts, kind, T)
    recompute = max(0.0, matmul_seconds(counts, kind, T) - matmul_seconds(plain, kind, T))
    per = kind.gpus_per_node

    # tensor parallel: the activation collectives of one micro-batch (sizes and counts as comm_model)
    tp_hidden = tp_total = 0.0
    if T > 1:
        A = b * seq * args.dim * p
        nodes = _nodes(T, 1, per)
        ag = collective_seconds(kind, "all_gather", A, T, nodes)
        rs = collective_seconds(kind, "reduce_scatter", A, T, nodes)
        norms = (2 * L + 1) * args.dim
        if mode == Checkpointing.llama:
            # per block: forward 2 gathers + 2 reduce-scatters; backward 4 gathers and 2 reduce-scatters in fp32,
            # of which the 2 re-gathered normed inputs and the 2 reduce-scatters run behind weight-gradient GEMMs
            rs32 = collective_seconds(kind, "reduce_scatter", A * 4 / p, T, nodes)
            tp_total = (6 * L + 2) * ag + (2 * L + 1) * rs + 2 * L * rs32
            norm_grads = L * 2 * collective_seconds(kind, "all_reduce", args.dim * 4, T, nodes)
            weight_grads = matmul_seconds(counts, kind, T) / 3  # a third of the GEMM FLOPs: weight gradients
            tp_hidden = min((2 * ag + 2 * rs32) * L, kind.overlap * weight_grads)
        else:  # DTensor's plans; selective and full run the forward's collectives again (but w2's)
            r = L if mode in (Checkpointing.selective, Checkpointing.full) else 0
            tp_total = (4 * L + 2 + 2 * r) * ag + (4 * L + 1 + r) * rs
            norm_grads = collective_seconds(kind, "all_reduce", norms * p, T, nodes)
        # the final norm's output gradient, the norms' gradients, the vocabulary-parallel loss's 3 numbers a token
        tp_total += collective_seconds(kind, "all_reduce", A + 3 * b * seq * 4, T, nodes) + norm_grads

    # data parallel: parameters and gradients
    P = count_params(args)[0]
    P_T = tensor_parallel_params(args, T)
    root = 2 * args.vocab_size * args.dim / T  # embedding and output
    layer_params = (P_T - root) / L
    shards = layout.fsdp_shard_size or data
    replicas = data // shards if t.strategy == "fsdp" else 1
    # per micro-batch and layer (hidden behind that layer's compute); the root's and the first block's gather
    # (nothing before them to hide behind); per step during the last backward; after it
    dp_layer = dp_root = dp_once = dp_after = 0.0
    local_params = P_T
    if t.strategy == "fsdp":
        nodes = _nodes(shards, T, per)
        if shards > 1:
            gathers = 2 if t.reshard_after_forward else 1
            dp_layer = gathers * collective_seconds(kind, "all_gather", layer_params * p, shards, nodes)
            dp_layer += collective_seconds(kind, "reduce_scatter", layer_params * 4, shards, nodes)
            # the root is gathered once (FSDP2 does not reshard it after the forward)
            dp_root = collective_seconds(kind, "all_gather", root * p, shards, nodes)
            dp_root += collective_seconds(kind, "reduce_scatter", root * 4, shards, nodes)
        if replicas > 1:  # HSDP: each shard's gradient all-reduced over the replicas
            groups = _nodes(replicas, T * shards, per)
            dp_layer += collective_seconds(kind, "all_reduce", layer_params * 4 / shards, replicas, groups)
            dp_root += collective_seconds(kind, "all_reduce", root * 4 / shards, replicas, groups)
        local_params = P_T / shards
    elif t.strategy == "deepspeed" and data > 1:
        # gradients travel in fp32 (deepspeed.py sets communication_data_type) under stages 1-3
        grad_bytes = 4 if t.zero_stage >= 1 else p
        nodes = _nodes(data, 1, per)
        if t.zero_stage == 3:  # parameters gathered for forward and backward, gradients reduced, per micro-batch
            dp_layer = 2 * collective_seconds(kind, "all_gather", layer_params * p, data, nodes)
            dp_layer += collective_seconds(kind, "reduce_scatter", layer_params * grad_bytes, data, nodes)
            dp_root = collective_seconds(kind, "all_gather", root * p, data, nodes)
            dp_root += collective_seconds(kind, "reduce_scatter", root * grad_bytes, data, nodes)
        elif t.zero_stage == 2:  # gradients reduce-scattered during every backward (bucketed)
            dp_layer = collective_seconds(kind, "reduce_scatter", layer_params * grad_bytes, data, nodes)
            dp_root = collective_seconds(kind, "reduce_scatter", root * grad_bytes, data, nodes)
        else:  # gradients reduced once a step, during the last backward: to their owners (1), to all (0)
            op = "reduce_scatter" if t.zero_stage == 1 else "all_reduce"
            dp_once = collective_seconds(kind, op, P * grad_bytes, data, nodes)
        if t.zero_stage in (1, 2):  # the updated parameters gathered after the step
            dp_after = collective_seconds(kind, "all_gather", P * p, data, nodes)
        local_params = P / (1 if t.zero_stage == 0 else data)
    # Overlap: per micro-batch and layer, data-parallel traffic hides behind that layer's compute (FSDP and
    # ZeRO prefetch and bucketing); ZeRO-0/1 reduce during the last backward (2/3 of a micro-batch). Hidden
    # traffic is not free: while a collective runs its kernels hold `comm_compute_share` of the GPU.
    layer_compute = micro / L
    dp_hidden_layer = min(dp_layer, kind.overlap * layer_compute)
    first_layer = min(dp_layer / 2, dp_hidden_layer)  # the first block's gather: hidden behind nothing
    once_hidden = min(dp_once, kind.overlap * 2 / 3 * micro)
    hidden = m * (L * dp_hidden_layer - first_layer + tp_hidden) + once_hidden
    comm_exposed = (
        m * (tp_total - tp_hidden + L * (dp_layer - dp_hidden_layer) + first_layer + dp_root)
        + dp_once
        - once_hidden
        + dp_after
        + kind.comm_compute_share * hidden
    )
    comm_total = m * (tp_total + L * dp_layer + dp_root) + dp_once + dp_after
    optimizer = local_params * ADAMW_BYTES_PER_PARAM / kind.memory_bandwidth
    overhead = kind.step_overhead_s
    if t.strategy == "fsdp" and shards > 1 or t.strategy == "deepspeed" and t.zero_stage == 3 and data > 1:
        overhead += m * (L + 1) * (3 if t.reshard_after_forward else 2) * kind.fsdp_collective_overhead_s
    if T > 1:
        kernels = sum(n for _, n in counts.gemms) + counts.attention_kernels + counts.memory_ops
        overhead += m * kernels * kind.tp_op_overhead_s
    step = m * micro + comm_exposed + optimizer + overhead
    tokens_per_gpu = t.global_batch_tokens / n / step
    mfu = tokens_per_gpu * flops_per_token(args, seq) / kind.peak_flops
    plan = plan_memory(cfg, n, act_bytes=p)
    total_tokens = t.steps * t.global_batch_tokens
    seconds = total_tokens / (tokens_per_gpu * n)
    return Prediction(
        layout,
        plan.total / 1e9,
        fits(plan, kind.memory_gb, HEADROOM),
        step,
        m * (micro - recompute),
        m * recompute,
        comm_exposed,
        comm_total,
        optimizer,
        overhead,
        tokens_per_gpu,
        mfu,
        seconds / 86400,
        seconds * n / 3600,
        strategy_name(cfg),
    )


def candidate_layouts(cfg: ExperimentConfig, world_size: int, kind: GpuKind) -> list[Layout]:
    """Every layout of `cfg` on `world_size` GPUs that the config's checks accept."""
    seq, batch_tokens = cfg.data.seq_len, cfg.train.global_batch_tokens
    sequences = batch_tokens // seq
    per = kind.gpus_per_node
    modes = [m.value for m in Checkpointing]
    out: list[Layout] = []
    if world_size == 1:
        for mode in modes:
            for b in _micro_batches(sequences):
                out.append(Layout("single", None, 0, 1, mode, b))
    tps = [t for t in tensor_parallel_degrees(cfg, per) if per % t == 0 and world_size % t == 0]
    for T in tps if world_size > 1 else []:
        data = world_size // T
        if sequences % data:
            continue
        shard_sizes = {0}
        if data > per // T > 1 and data % (per // T) == 0:
            shard_sizes.add(per // T)  # HSDP: a copy per node
        for shard in sorted(shard_sizes):
            for mode in modes:
                for b in _micro_batches(sequences // data):
                    out.append(Layout("fsdp", None, shard, T, mode, b))
    if world_size > 1 and sequences % world_size == 0:
        for stage in (1, 2, 3):
            for mode in modes:
                for b in _micro_batches(sequences // world_size):
                    out.append(Layout("deepspeed", stage, 0, 1, mode, b))
    return out


def _micro_batches(per_rank: int, largest: int = 64) -> list[int]:
    return [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= largest and per_rank % b == 0]


def plan_layouts(cfg: ExperimentConfig, world_size: int, kind: GpuKind) -> list[Prediction]:
    """Predictions for every candidate layout that the config's checks accept: fitting ones first, fastest
    first."""
    from pretrain.config import validate

    predictions = []
    for lay in candidate_layouts(cfg, world_size, kind):
        changed = lay.apply(cfg)
        try:
            validate(changed)
        except ConfigError:  # e.g. LoRA dropout under llama, compile under tensor parallelism
            continue
        predictions.append(predict(changed, world_size, kind))
    return sorted(predictions, key=lambda p: (not p.fits, p.step_time_s))


def kind_for_precision(kind: GpuKind, cfg: ExperimentConfig) -> GpuKind:
    """fp32 training moves 4-byte activations and parameters."""
    return replace(kind, dtype_bytes=4) if cfg.train.precision == Precision.fp32 else kind


def format_table(cfg: ExperimentConfig, world_size: int, kind: GpuKind, predictions: list[Prediction], top: int) -> str:
    """The layouts as a table, best first, then the overrides of the best fitting one."""
    lines = [
        f"{cfg.name} on {world_size} x {kind.name} ({kind.gpus_per_node} per node): "
        f"{cfg.train.steps:,} steps of {cfg.train.global_batch_tokens:,} tokens",
        f"{'layout':<44}{'mem GB':>8}{'step s':>9}{'compute':>9}{'recomp':>8}{'comm':>8}"
        f"{'tok/s/GPU':>11}{'MFU':>7}{'days':>8}{'GPU-hours':>12}",
    ]
    shown = predictions[:top]
    for p in shown:
        lay = p.layout
        name = p.name.replace("tensor parallel", "TP") + (
            f" shard {lay.fsdp_shard_size}" if lay.fsdp_shard_size else ""
        )
        name += f", {lay.activation_checkpointing}, mb {lay.micro_batch_size}"
        mem = f"{p.memory_gb:.1f}" + ("" if p.fits else "!")
        lines.append(
            f"{name:<44}{mem:>8}{p.step_time_s:>9.3f}{p.compute_s:>9.3f}{p.recompute_s:>8.3f}{p.comm_exposed_s:>8.3f}"
            f"{p.tokens_per_sec_per_gpu:>11,.0f}{100 * p.mfu:>6.1f}%{p.days:>8.1f}{p.gpu_hours:>12,.0f}"
        )
    if len(predictions) > top:
        lines.append(f"... {len(predictions) - top} more (--top N)")
    fitting = [p for p in predictions if p.fits]
    lines.append("! does not fit in 90% of the GPU's memory")
    if fitting:
        lines.append("\nbest: " + " ".join(fitting[0].layout.overrides()))
    else:
        lines.append("\nno layout fits: more GPUs, or a GPU with more memory")
    return "\n".join(lines)


def run_kind(cfg: ExperimentConfig, device_name: str, processes_per_node: int) -> Optional[GpuKind]:
    """The kind a run's prediction uses: `metrics.gpu_kind`, else the device's (`NVIDIA A100-SXM4-80GB` ->
    a100-80gb; a CPU -> `cpu` for one process, `cpu-2p` for two on the node, ... when `metrics.gpu_kinds`
    holds a calibration); None when there is none: an H100 PCIe or NVL, a GH200, or fp32 on a GPU (the kinds'
    rates are bf16 tensor-core rates). On a GPU the node has the launcher's processes."""
    kinds = load_kinds(cfg.metrics.gpu_kinds)
    if cfg.metrics.gpu_kind:
        if cfg.metrics.gpu_kind not in kinds:
            raise ConfigError(f"metrics.gpu_kind={cfg.metrics.gpu_kind}: one of {', '.join(kinds)}")
        return kind_for_precision(kinds[cfg.metrics.gpu_kind], cfg)
    name, found = device_name.upper(), None
    if name == "CPU":
        found = kinds.get("cpu" if processes_per_node == 1 else f"cpu-{processes_per_node}p")
        return kind_for_precision(found, cfg) if found else None
    if cfg.train.precision == Precision.fp32 or any(word in name for word in ("PCIE", "NVL", "GH200")):
        return None
    if "H200" in name:
        found = kinds.get("h200")
    elif "H100" in name:
        found = kinds.get("h100-80gb")
    elif "A100" in name:
        found = kinds.get("a100-80gb" if "80G" in name else "a100-40gb")
    return replace(found, gpus_per_node=max(processes_per_node, 1)) if found else None
