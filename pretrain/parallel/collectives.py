"""Counting what the ranks send each other: bytes per collective kind and per device-mesh dimension.

`CollectiveCounter` wraps torch.distributed's collectives while it is active: the c10d calls
(`dist.all_gather_single`, `dist.reduce_scatter_single`, `dist.all_reduce`, ...) that FSDP2, the
hand-written tensor-parallel block and the trainer's metric reductions issue, and the functional
collectives (`torch.distributed._functional_collectives`) behind DTensor's redistributions. A call
made inside another counted call is not counted again.

The size of a collective is the whole tensor the group assembles or reduces, on each rank:
all-gather, its output (the input times the group size); reduce-scatter, its input; all-reduce and
broadcast, the tensor. A ring moves (n - 1) / n of that size in and out of each of the n ranks; a
group of one moves nothing and is not counted. `pretrain.parallel.comm_model` predicts these sizes.
"""

from __future__ import annotations

import inspect
import threading
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# (module, function, kind, the argument holding the input)
WRAPPED = [
    (dist, "all_gather_single", "all_gather", "input_tensor"),
    (dist, "all_gather_into_tensor", "all_gather", "input_tensor"),
    (dist, "all_gather", "all_gather", "tensor"),
    (dist, "reduce_scatter_single", "reduce_scatter", "input"),
    (dist, "reduce_scatter_tensor", "reduce_scatter", "input"),
    (dist, "reduce_scatter", "reduce_scatter", "input_list"),
    (dist, "all_reduce", "all_reduce", "tensor"),
    (dist, "broadcast", "broadcast", "tensor"),
    (dist, "all_to_all_single", "all_to_all", "input"),
    (funcol, "all_gather_single", "all_gather", "self"),
    (funcol, "all_gather_tensor", "all_gather", "self"),
    (funcol, "all_gather_tensor_autograd", "all_gather", "self"),
    (funcol, "all_gather_into_tensor_coalesced", "all_gather", "self"),
    (funcol, "reduce_scatter_single", "reduce_scatter", "self"),
    (funcol, "reduce_scatter_tensor", "reduce_scatter", "self"),
    (funcol, "reduce_scatter_tensor_autograd", "reduce_scatter", "self"),
    (funcol, "reduce_scatter_tensor_coalesced", "reduce_scatter", "inputs"),
    (funcol, "all_reduce", "all_reduce", "self"),
    (funcol, "all_reduce_coalesced", "all_reduce", "self"),
    (funcol, "broadcast", "broadcast", "self"),
    (funcol, "all_to_all_single", "all_to_all", "self"),
]


def _bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


def _process_group(module, group: Any) -> dist.ProcessGroup:
    """The ProcessGroup behind any way a collective names its group (None: every rank)."""
    if module is dist:
        return group if group is not None else dist.group.WORLD
    return dist.distributed_c10d._resolve_process_group(funcol._resolve_group_name(group))


def _ranks(group: dist.ProcessGroup) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group))


class CollectiveCounter:
    """Bytes and calls of every collective issued while active (by every thread of this process):
    `bytes[(dimension, kind)]`, `calls[(dimension, kind)]`.

    `dimensions` names process groups ({"tp": group, ...}, see `mesh_dimensions`); any other group is
    "world" when it spans every rank, else "other".
    """

    def __init__(self, dimensions: Optional[dict[str, Any]] = None):
        self.names = {_ranks(group): name for name, group in (dimensions or {}).items()}  # by their ranks
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self._inside = threading.local()
        self._real: list[tuple[Any, str, Callable]] = []

    def _wrap(self, module, name: str, kind: str, argument: str) -> Callable:
        real = getattr(module, name)
        signature = inspect.signature(real)

        def counted(*args, **kwargs):
            if getattr(self._inside, "depth", 0):
                return real(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            group = _process_group(module, bound.arguments.get("group"))
            size = group.size()
            if size > 1:
                amount = _bytes(bound.arguments[argument]) * (size if kind == "all_gather" else 1)
                label = self.names.get(_ranks(group))
                if label is None:
                    label = "world" if size == dist.get_world_size() else "other"
                self.bytes[(label, kind)] += amount
                self.calls[(label, kind)] += 1
            self._inside.depth = 1
            try:
                return real(*args, **kwargs)
            finally:
                self._inside.depth = 0

        return counted

    def __enter__(self) -> CollectiveCounter:
        for module, name, kind, argument in WRAPPED:
            if hasattr(module, name):
                self._real.append((module, name, getattr(module, name)))
                setattr(module, name, self._wrap(module, name, kind, argument))
        return self

    def __exit__(self, *exc) -> None:
        for module, name, real in reversed(self._real):
            setattr(module, name, real)
        self._real.clear()

    def reset(self) -> None:
        """Forget what was counted."""
        self.bytes.clear()
        self.calls.clear()

    def table(self) -> dict[str, dict[str, int]]:
        """{dimension: {kind: bytes}}."""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for (label, kind), size in sorted(self.bytes.items()):
            out[label][kind] = size
        return dict(out)


def mesh_dimensions(mesh) -> dict[str, Any]:
    """{dimension name: process group} of a DeviceMesh."""
    return {name: mesh.get_group(name) for name in mesh.mesh_dim_names}


def training_step(cfg) -> tuple[Callable[[], None], Any]:
    """(a function that runs one optimizer step of `cfg` on random tokens, its strategy), on this launch's
    ranks; every rank must call it and then the function."""
    from pretrain.optim import build_scheduler
    from pretrain.parallel import build_strategy
    from pretrain.trainer import train_step

    strategy = build_strategy(cfg)
    model, optimizer = strategy.setup(cfg)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    t, seq = cfg.train, cfg.data.seq_len
    micro = t.global_batch_tokens // (t.micro_batch_size * seq * strategy.data_world_size)
    generator = torch.Generator().manual_seed(strategy.data_rank)

    def step() -> None:
        tokens = torch.randint(0, cfg.model.vocab_size, (micro, t.micro_batch_size, seq + 1), generator=generator)
        batches = [(row[:, :-1], row[:, 1:]) for row in tokens]
        train_step(model, batches, optimizer, scheduler, strategy, cfg.optim.grad_clip)

    return step, strategy


def count_training_step(cfg, warmup: int = 1) -> dict[tuple[str, str], int]:
    """Bytes by (mesh dimension, kind) of one optimizer step of `cfg` on this launch's ranks, after `warmup`
    steps, on random tokens (what is sent does not depend on the values). Every rank must call it."""
    step, strategy = training_step(cfg)
    for _ in range(warmup):
        step()
    with CollectiveCounter(mesh_dimensions(strategy.mesh) if hasattr(strategy, "mesh") else {}) as counter:
        step()
    return dict(counter.bytes)
