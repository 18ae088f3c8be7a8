"""`python -m pretrain layout --calibrate`: measure this machine's CPU as GPU kinds for the cost model.

A kind is what one training process gets. For 1, 2 and 4 processes on this node (threads per process as
the trainer sets them: usable CPUs // processes), that many processes run the measurements at the same
time, so they share the cores as training ranks do:

- GEMMs of several shapes: the fit t = 2mnk / matmul_flops + matmul_overhead_s (least relative error);
- LLaMA's memory-bound kernels (RMSNorm, SwiGLU, cross-entropy, RoPE) forward and backward: counted bytes / s;
- a chain of tiny ops run forward and backward under autograd, counted as the cost model counts them
  (`pretrain.layout.counting`): op_overhead_s = seconds / kernels (dispatch, autograd bookkeeping);
- causal attention forward + backward: attention_flops;
- gloo all-gather and reduce-scatter from 4 KB to 4 MB: t = latency x (P - 1) + (P - 1) / P x bytes / bw.

The kinds are written as YAML (`cpu`, `cpu-2p`, `cpu-4p`) for `layout --kinds FILE --gpu cpu-2p`.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

PROCESSES = (1, 2, 4)
GEMM_SHAPES = [(m, n, k) for m in (256, 1024) for n, k in ((256, 256), (768, 768), (2048, 768), (4096, 256))]
MEMORY_SHAPES = [(256, 256, 4096), (1024, 256, 4096), (512, 768, 4096)]  # (tokens, width, vocabulary)
COLLECTIVE_BYTES = [2**p for p in range(12, 24, 2)]


TIMING_SECONDS = 0.5  # each timing: calls enough for this long


def _timed(fn, sync=None, seconds: float | None = None, repeats: int = 5) -> float:
    """Seconds per call of `fn`: the median of `repeats` timings of a fixed number of calls (the median, not
    the best: a training step meets the machine as it usually is). With several processes (`sync`: agrees
    on a count and waits for all), every process makes the same number of calls from one barrier to the
    next, so they share the cores for the whole timing and the slowest sets the time, as in a step."""
    fn()
    start = time.perf_counter()
    fn()
    probe = time.perf_counter() - start
    calls = max(2, int((seconds or TIMING_SECONDS) / max(probe, 1e-7)))
    if sync is not None:
        calls = sync(calls)
    times = []
    for _ in range(repeats):
        if sync is not None:
            sync(0)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync is not None:
            sync(0)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


COLD_BYTES = 128 * 2**20  # operands cycled through, more than a server CPU's last-level cache


def cold(make) -> list[tuple]:
    """Copies of the operands `make()` returns, enough that cycling through them leaves none in cache (as
    in a training step, where every operand was last touched many kernels ago)."""
    import torch

    first = make()
    size = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
    return [first] + [make() for _ in range(max(1, -(-COLD_BYTES // size)) - 1)]


def rotate(fn, sets: list[tuple]):
    """A function of no arguments that calls `fn` on the next operand set each time."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(sets)
        return fn(*sets[state["i"]])

    return call


def fit_line(xs: list[float], ts: list[float]) -> tuple[float, float]:
    """(slope, intercept) of t = slope * x + intercept, least squares in relative error, both >= 0."""
    w = [1.0 / t**2 for t in ts]
    sw = sum(w)
    sx = sum(wi * x for wi, x in zip(w, xs))
    sy = sum(wi * t for wi, t in zip(w, ts))
    sxx = sum(wi * x * x for wi, x in zip(w, xs))
    sxy = sum(wi * x * t for wi, x, t in zip(w, xs, ts))
    slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    intercept = (sy - slope * sx) / sw
    if intercept < 0:  # through the origin
        slope, intercept = sxy / sxx, 0.0
    return slope, intercept


def measure_compute(sync) -> dict:
    """This process's GEMM, memory-bound and per-op rates (every process measures at once)."""
    import torch
    import torch.nn.functional as F

    from pretrain.layout import attention_flops, counting
    from pretrain.model import apply_rope, rms_norm, rope_cos_sin

    out: dict = {}
    xs, ts = [], []
    for m, n, k in GEMM_SHAPES:  # as nn.Linear runs them: forward, input gradient, weight gradient
        sets = cold(lambda m=m, n=n, k=k: (torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)))
        for fn in (
            lambda x, w, dy: torch.mm(x, w.t()),
            lambda x, w, dy: torch.mm(dy, w),
            lambda x, w, dy: torch.mm(dy.t(), x),
        ):
            ts.append(_timed(rotate(fn, sets), sync))
            xs.append(2.0 * m * n * k)
    slope, out["matmul_overhead_s"] = fit_line(xs, ts)
    out["matmul_flops"] = 1.0 / slope

    w = torch.randn(16, requires_grad=True)

    def chain():
        x = w
        for _ in range(20):
            x = torch.sin(x * 1.5 + 0.1)
        x.sum().backward()

    with counting() as tally:
        chain()
    out["op_overhead_s"] = _timed(chain, sync) / tally.ops

    xs, ts = [], []
    for tokens, dim, vocab in MEMORY_SHAPES:  # LLaMA's memory-bound work: RMSNorm, SwiGLU, cross-entropy, RoPE
        sets = cold(
            lambda tokens=tokens, dim=dim, vocab=vocab: (
                torch.randn(tokens, dim, requires_grad=True),
                torch.ones(dim, requires_grad=True),
                torch.randn(tokens, 3 * dim, requires_grad=True),
                torch.randn(tokens, 3 * dim, requires_grad=True),
                torch.randn(tokens, vocab, requires_grad=True),
                torch.randint(0, vocab, (tokens,)),
                torch.randn(1, tokens, dim // 32, 32, requires_grad=True),
            )
        )
        cos_sin = rope_cos_sin(32, tokens, 10000.0)

        def elementwise(x, g, a, b, logits, targets, q, cos_sin=cos_sin):
            y = rms_norm(x, g, 1e-6).sum() + (F.silu(a) * b).sum() + F.cross_entropy(logits, targets)
            (y + apply_rope(q, cos_sin).sum()).backward()

        with counting() as tally:
            elementwise(*sets[0])
        ts.append(_timed(rotate(elementwise, sets), sync) - tally.ops * out["op_overhead_s"])
        xs.append(tally.bytes)
    out["memory_bandwidth"] = 1.0 / (sum(x * t for x, t in zip(xs, ts)) / sum(x * x for x in xs))

    xs, ts = [], []
    for batch, heads, head_dim in (
        (4, 8, 32),
        (2, 12, 64),
    ):  # (batch, seq, heads, dim) seen as heads-first, as the model
        sets = cold(
            lambda b=batch, h=heads, d=head_dim: tuple(
                torch.randn(b, 256, h, d).transpose(1, 2).requires_grad_() for _ in range(3)
            )
        )

        def attention(q, k, v):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        ts.append(_timed(rotate(attention, sets), sync))
        xs.append(3.5 * attention_flops(batch, heads, 256, head_dim))
    out["attention_flops"] = sum(xs) / sum(ts)
    return out


def measure_collectives(world: int) -> dict:
    """Ring constants of gloo on this node: seconds per step and bytes/s, from all-gather and reduce-scatter."""
    import torch
    import torch.distributed as dist

    slopes, intercepts = [], []
    for op in ("all_gather", "reduce_scatter"):
        xs, ts = [], []
        for size in COLLECTIVE_BYTES:
            whole, part = torch.zeros(size // 4), torch.zeros(size // 4 // world)
            if op == "all_gather":
                fn = lambda whole=whole, part=part: dist.all_gather_single(whole, part)  # noqa: E731
            else:
                fn = lambda whole=whole, part=part: dist.reduce_scatter_single(part, whole)  # noqa: E731
            times = []
            for _ in range(5):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(4):
                    fn()
                times.append((time.perf_counter() - start) / 4)
            ts.append(statistics.median(times))
            xs.append(float(size))
        slope, intercept = fit_line(xs, ts)
        slopes.append(slope)
        intercepts.append(intercept)
    slope, intercept = statistics.mean(slopes), statistics.mean(intercepts)
    return {
        "intra_node_bw": (world - 1) / world / slope,
        "intra_node_latency_s": intercept / (world - 1),
    }


PROBE = [  # a 2-layer, 64-wide model: its step is mostly the framework's own time
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=4",
    "model.vocab_size=256",
    "model.multiple_of=32",
    "data.seq_len=64",
    "train.micro_batch_size=2",
    "train.device=cpu",
    "train.precision=fp32",
]


def time_step(overrides: list[str], world: int, steps: int = 6) -> tuple[float, object]:
    """(median seconds of an optimizer step of the probe model under `overrides`, its config)."""
    from pretrain.config import load_config
    from pretrain.parallel.collectives import training_step

    cfg = load_config(
        "configs/experiments/debug.yaml", [*PROBE, f"train.global_batch_tokens={256 * world}", *overrides]
    )
    step, _ = training_step(cfg)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]), cfg


def measure_overheads(result: dict, world: int) -> dict:
    """The framework's time that the compute and collectives above do not explain, from probe-model steps:
    per step (one process), per FSDP collective (FSDP on all processes), per kernel under tensor
    parallelism (2 processes, one data rank). Each is the measured step less the prediction without it."""
    from dataclasses import replace

    from pretrain.layout import GpuKind, count_step, predict

    kind = GpuKind(
        name="probe",
        memory_gb=1e3,
        peak_flops=1.0,
        gpus_per_node=1024,
        inter_node_bw=1e12,
        collective_base_latency_s=0.0,
        overlap=0.0,
        dtype_bytes=4,
        intra_node_bw=result.get("intra_node_bw", 1e12),
        **{
            k: result[k]
            for k in ("matmul_flops", "matmul_overhead_s", "attention_flops", "memory_bandwidth", "op_overhead_s")
        },
        intra_node_latency_s=result.get("intra_node_latency_s", 0.0),
    )
    out = {}
    if world == 1:
        measured, cfg = time_step(["train.strategy=single"], world)
        out["step_overhead_s"] = max(0.0, measured - predict(cfg, 1, kind).step_time_s)
        return out
    measured, cfg = time_step(["train.strategy=fsdp"], world)
    L = cfg.model.n_layers
    m = cfg.train.global_batch_tokens // (cfg.train.micro_batch_size * cfg.data.seq_len * world)
    collectives = m * (L + 1) * 3
    out["fsdp_collective_overhead_s"] = max(0.0, (measured - predict(cfg, world, kind).step_time_s) / collectives)
    if world == 2:
        measured, cfg = time_step(["train.strategy=fsdp", "train.tensor_parallel=2"], world)
        counts = count_step(
            cfg.model, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.activation_checkpointing, 4
        )
        m = cfg.train.global_batch_tokens // (cfg.train.micro_batch_size * cfg.data.seq_len)  # one data rank
        kernels = m * (sum(n for _, n in counts.gemms) + counts.attention_kernels + counts.memory_ops)
        kind = replace(kind, **out)
        out["tp_op_overhead_s"] = max(0.0, (measured - predict(cfg, world, kind).step_time_s) / kernels)
    return out


def _worker(rank: int, world: int, port: int, folder: str, cores: int) -> None:
    import torch
    import torch.distributed as dist

    if world == 1:  # in the calling process
        Path(folder, "0.json").write_text(json.dumps(_measure_one(cores)))
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(max(cores // world, 1))
    sync = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

        def sync(calls: int) -> int:
            """The fewest calls any process asked for (every process then makes as many), after a barrier."""
            agreed = torch.tensor([calls])
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            return int(agreed)

    result = measure_compute(sync)
    if world > 1:
        result.update(measure_collectives(world))
    result.update(measure_overheads(result, world))
    if world > 1:
        dist.destroy_process_group()
    Path(folder, f"{rank}.json").write_text(json.dumps(result))


def _measure_one(cores: int) -> dict:
    """`_worker` for one process, run in the caller (its thread count restored after)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        result = measure_compute(None)
        result.update(measure_overheads(result, 1))
        return result
    finally:
        torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, cores: int) -> dict:
    """The kind of one of `world` processes on this node: the mean of what each measured."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        if world == 1:
            _worker(0, 1, 0, folder, cores)
        else:
            mp.start_processes(_worker, args=(world, _free_port(), folder, cores), nprocs=world, start_method="spawn")
        results = [json.loads(Path(folder, f"{r}.json").read_text()) for r in range(world)]
    return {key: statistics.mean(r[key] for r in results if key in r) for key in results[0]}


def calibrate(output: Path, threads: int | None = None, processes: tuple[int, ...] = PROCESSES) -> str:
    """Measure the kinds `cpu`, `cpu-2p`, `cpu-4p` (one per count in `processes`) and write them to
    `output`; return a summary."""
    from omegaconf import OmegaConf

    from data_pipeline.shards import atomic_write_bytes
    from pretrain.runtime import usable_cpus

    cores = threads or usable_cpus()
    kinds, lines = {}, []
    for world in processes:
        m = measure(world, cores)
        name = "cpu" if world == 1 else f"cpu-{world}p"
        kinds[name] = {
            "memory_gb": 1024.0,
            "peak_flops": m["matmul_flops"],  # MFU on a CPU: against its own GEMM rate
            "matmul_flops": m["matmul_flops"],
            "matmul_overhead_s": m["matmul_overhead_s"],
            "attention_flops": m["attention_flops"],
            "memory_bandwidth": m["memory_bandwidth"],
            "op_overhead_s": m["op_overhead_s"],
            "gpus_per_node": 1024,  # every process on this one node
            "intra_node_bw": m.get("intra_node_bw", 1e12),
            "inter_node_bw": m.get("intra_node_bw", 1e12),
            "intra_node_latency_s": m.get("intra_node_latency_s", 0.0),
            "collective_base_latency_s": 0.0,
            "overlap": 0.0,  # gloo's collectives wait on the CPU cores the compute uses
            "dtype_bytes": 4,
            **{k: m[k] for k in ("step_overhead_s", "fsdp_collective_overhead_s", "tp_op_overhead_s") if k in m},
        }
        lines.append(
            f"{name}: {world} process(es) x {max(cores // world, 1)} thread(s): "
            f"GEMM {m['matmul_flops'] / 1e9:.1f} GFLOP/s "
            f"+ {1e6 * m['matmul_overhead_s']:.1f} us, memory {m['memory_bandwidth'] / 1e9:.1f} GB/s, "
            f"{1e6 * m['op_overhead_s']:.1f} us/op, attention {m['attention_flops'] / 1e9:.1f} GFLOP/s"
            + (
                f", gloo {m['intra_node_bw'] / 1e9:.2f} GB/s + {1e6 * m['intra_node_latency_s']:.0f} us/step"
                if world > 1
                else ""
            )
        )
    load = os.getloadavg()[0]
    header = (
        f"# measured by `python -m pretrain layout --calibrate` on {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{cores} usable CPUs, load average {load:.2f}\n"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, (header + OmegaConf.to_yaml(OmegaConf.create(kinds))).encode())
    return "\n".join(lines + [f"wrote {output}: use it with --kinds {output} --gpu cpu | cpu-2p | cpu-4p"])
