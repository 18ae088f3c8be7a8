"""Bytes each rank sends per training step, FSDP alone against FSDP x tensor parallel at the same global batch.

On 4 local CPU processes (gloo), for each layout: the bytes of one optimizer step's collectives by
mesh dimension and kind, counted by `pretrain.parallel.collectives.CollectiveCounter`, next to the
README's formula (`pretrain.parallel.comm_model.step_bytes`), and the CPU seconds of a step (all
ranks, user + system), the layouts interleaved over `--rounds`, with the load average recorded. CPU
seconds over gloo say nothing of NVLink; the bytes are what carries over to GPUs (in bf16, halve the
parameter and activation terms as the formula says).

    python bench/collectives.py                                  # debug model, seq 256
    python bench/collectives.py --seq 512 --out bench/results/x.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import provenance, publish  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.parallel.comm_model import step_bytes  # noqa: E402

LAYOUTS = {
    "FSDP 4": [],
    "FSDP 2 x TP 2, none": ["train.tensor_parallel=2"],
    "FSDP 2 x TP 2, selective": ["train.tensor_parallel=2", "train.activation_checkpointing=selective"],
    "FSDP 2 x TP 2, llama": ["train.tensor_parallel=2", "train.activation_checkpointing=llama"],
    "TP 4, llama": ["train.tensor_parallel=4", "train.activation_checkpointing=llama"],
}


def _worker(rank: int, world: int, port: int, overrides: list, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    import torch.distributed as dist

    from pretrain.parallel.collectives import count_training_step

    cfg = load_config("debug", overrides)
    before = resource.getrusage(resource.RUSAGE_SELF)
    counted = count_training_step(cfg, warmup=1)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    totals = [None] * world
    dist.all_gather_object(totals, cpu)
    if rank == 0:
        record = {"bytes": {f"{d}/{k}": v for (d, k), v in counted.items()}, "cpu_s_two_steps": sum(totals)}
        Path(out).write_text(json.dumps(record))
    dist.destroy_process_group()


def measure(overrides: list, world: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "result.json")
        mp.spawn(_worker, args=(world, port, overrides, out), nprocs=world)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    world = 4
    base = [
        "train.strategy=fsdp",
        "train.device=cpu",
        f"data.seq_len={args.seq}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_tokens={args.seq * args.micro_batch * 4}",  # 4 sequences a rank under FSDP 4
        "wandb.mode=disabled",
    ]
    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    loads = []
    for _ in range(args.rounds):  # interleaved: each round measures every layout once
        for name, overrides in LAYOUTS.items():
            loads.append(os.getloadavg()[0])
            results[name].append(measure([*base, *overrides], world))
    cfg = load_config("debug", base)
    m = cfg.model
    lines = [
        f"# Collectives per training step: debug model (dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads, "
        f"{m.kv_heads} kv heads), sequence {args.seq}, micro-batch {args.micro_batch}, "
        f"{cfg.train.global_batch_tokens:,} tokens a step, {world} CPU ranks (gloo)",
        "",
        *provenance(torch.device("cpu"), "fp32"),
        f"load average (1 min) at each measurement: {', '.join(f'{v:.1f}' for v in loads)}",
        "",
        "| layout | dimension / kind | counted bytes per rank | formula | counted / formula |",
        "|---|---|---|---|---|",
    ]
    for name, overrides in LAYOUTS.items():
        counted = results[name][0]["bytes"]
        assert all(r["bytes"] == counted for r in results[name]), f"{name}: bytes differ between rounds"
        expected = step_bytes(load_config("debug", [*base, *overrides]), world)
        for key in sorted(set(counted) | {f"{d}/{k}" for d, k in expected}):
            want = expected.get(tuple(key.split("/")), 0)
            have = counted.get(key, 0)
            ratio = f"{have / want:.4f}" if want else "-"
            lines.append(f"| {name} | {key} | {have:,} | {want:,.0f} | {ratio} |")
    lines += ["", "| layout | CPU seconds of 2 steps, all ranks (per round) |", "|---|---|"]
    for name in LAYOUTS:
        seconds = ", ".join(f"{r['cpu_s_two_steps']:.2f}" for r in results[name])
        lines.append(f"| {name} | {seconds} |")
    lines += [
        "",
        "Under FSDP alone each rank gathers every weight for each of its micro-batches; under FSDP 2 x TP 2 it",
        "gathers half of each (its tensor-parallel shard) for twice the micro-batches (the same global batch",
        "over half the data-parallel ranks), and adds the tensor-parallel activations' collectives, which a",
        "node's NVLink carries. CPU seconds include process start-up and model build (2 steps counted), gloo",
        "on a shared 2-core machine: they show the overhead of the plans on CPU, not GPU speed.",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
