"""The one interface every parallelism strategy implements; the trainer only talks to this."""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from pretrain import optim
from pretrain.adapters import adapter_initial_values, all_param_shapes, apply_adapters, is_adapter_name
from pretrain.checkpoint_layout import DCP_DIR, dcp_without_process_group
from pretrain.config import ConfigError, ExperimentConfig, Precision
from pretrain.model import ModelArgs, Transformer, initial_value, param_shapes, rope_cos_sin
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing


class Strategy:
    """How the model is placed, run and saved: one device, FSDP2 or DeepSpeed ZeRO.

    The defaults are those of one device; a strategy changes only the steps that differ for it.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    tensor_parallel: int = 1  # ranks that split each layer; they read the same data
    _checkpoint_group = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs and shared files."""
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which slice of each batch this rank reads: the ranks of one tensor-parallel group read the same."""
        return self.rank // self.tensor_parallel

    @property
    def data_world_size(self) -> int:
        """Into how many slices each batch is split (the data-parallel ranks)."""
        return self.world_size // self.tensor_parallel

    def setup(self, cfg: ExperimentConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The model (`build_model`) and its optimizer (`build_optimizer`). The module returned is the
        one the trainer calls."""
        model = self.build_model(cfg)
        return model, self.build_optimizer(model, cfg)

    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        """The model, built in the same order under every strategy, so that no rank ever holds all of it:

        1. the modules without values (`new_model`: on `meta`, or partitioned as they are built), with the
           adapter of `peft.method` (`add_adapter`, `pretrain.adapters`): the base frozen, the strategy
           handling frozen parameters as its own (no gradients, no optimizer state);
        2. tensor-parallel plans (`parallelize`: each layer split over `train.tensor_parallel` ranks);
        3. activation checkpointing (and `torch.compile` of each block) applied to the blocks;
        4. the strategy's wrapping or sharding (`shard`);
        5. memory for this rank's part (`materialise`), then the initial values, one full parameter at
           a time, each rank keeping its part (`write_initial_value`): `train.init_from`'s weights or
           the seeded ones (the adapter's: `pretrain.adapters.adapter_initial_values`), the same whatever
           the strategy and the number of ranks;
        6. the loss computed `train.loss_chunk_tokens` tokens at a time;
        7. with an adapter, the frozen base in the storage the strategy keeps it in (`store_base`).
        """
        model = self.new_model(cfg.model)
        if cfg.peft.method != "none":
            self.add_adapter(model, cfg)
        self.parallelize(model, cfg)
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.compile)
        self.shard(model, cfg)
        self.materialise(model)
        values, args = initial_values(cfg), cfg.model
        with torch.no_grad():
            model.rope_cos_sin.copy_(rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta))
            for name, param in model.named_parameters():
                self.write_initial_value(param, values(name))
        model.loss_chunk_tokens = cfg.train.loss_chunk_tokens
        if cfg.peft.method != "none":
            self.store_base(model, cfg)
        return model

    def new_model(self, args: ModelArgs) -> Transformer:
        """The modules, on `meta`: shapes without memory."""
        with torch.device("meta"):
            return Transformer(args)

    def add_adapter(self, model: Transformer, cfg: ExperimentConfig) -> None:
        """Add the adapter's modules to the model being built (no values yet) and freeze the base."""
        apply_adapters(model, cfg.peft, initialise=False)

    def store_base(self, model: nn.Module, cfg: ExperimentConfig) -> None:
        """Keep an adapter run's frozen base in this strategy's storage (as built by default)."""

    def parallelize(self, model: Transformer, cfg: ExperimentConfig) -> None:
        """Split each layer over the tensor-parallel ranks, in place (nothing without tensor parallelism)."""

    def shard(self, model: Transformer, cfg: ExperimentConfig) -> None:
        """Wrap or shard the model in place (nothing on one device)."""

    def materialise(self, model: nn.Module) -> None:
        """Memory for this rank's part of every parameter and buffer, values not yet written."""
        model.to_empty(device=self.device)

    def write_initial_value(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Write this rank's part of `value` (the whole parameter, on the CPU) into `param`."""
        param.copy_(value)

    def build_optimizer(self, model: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
        """AdamW over the model's trainable parameters (the adapter's only with `peft.method`), the fused kernel
        on a GPU."""
        return optim.build_optimizer(model, cfg.optim, all_param_shapes(cfg), fused=self.device.type == "cuda")

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the forward pass (none by default)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss` (one micro-batch, already divided by their number)."""
        loss.backward()

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, loss: torch.Tensor
    ) -> tuple[torch.Tensor, bool]:
        """Clip the gradients to `max_norm` by their global norm and apply them, unless the (global)
        loss or the norm is not finite; clear them either way. Returns (norm, applied), the same on
        every rank."""
        norm = self.clip_grad_norm(model, max_norm)
        applied = bool(torch.isfinite(loss) & torch.isfinite(norm))
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global gradient norm across all ranks, clipped to `max_norm` when it is > 0."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a metric over ranks (identity on one process)."""
        return value

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (the same answer everywhere)."""
        return flag

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""

    def gather(self, value: Any) -> list[Any]:
        """`value` (any picklable object) of every rank, in rank order, on every rank."""
        return [value]

    reads_through_files = True  # `save`/`load` write and read through a DCP file system (`files`)

    def save(
        self,
        folder: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        asynchronous: bool = False,
        files: Optional[FileSystem] = None,
    ) -> Future | None:
        """Write model and optimizer state into `folder` in this strategy's form.

        By default torch.distributed.checkpoint, keyed by parameter name: any number of ranks can
        read it back, sharded or not, so `single` and `fsdp` resume each other's checkpoints. Frozen
        parameters (an adapter's base) are not written: the checkpoint names its base instead. With
        `asynchronous`, the state is copied to CPU memory now and written by a background thread:
        the returned future completes when the files are written. DCP writes through `files` when given
        (`pretrain.digests.HashingFileSystem`: checksums taken as it writes).
        """
        model_state, optim_state = get_state_dict(model, optimizer, options=state_dict_options(model))
        state, writer = {"model": model_state, "optimizer": optim_state}, FileSystemWriter(folder / DCP_DIR)
        if files is not None:
            writer.fs = files
        if asynchronous:
            if not dist.is_initialized():
                return dcp.async_save(state, storage_writer=writer, no_dist=True)
            if self._checkpoint_group is None:  # a gloo group, so the background save never races the trainer's NCCL
                self._checkpoint_group = dist.new_group(backend="gloo")
            return dcp.async_save(state, storage_writer=writer, process_group=self._checkpoint_group)
        with dcp_without_process_group():
            dcp.save(state, storage_writer=writer)
        return None

    def load(
        self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, files: Optional[FileSystem] = None
    ) -> None:
        """Read model and optimizer state written by `save` (through `files` when given, as for `save`)."""
        options = state_dict_options(model)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        state, reader = {"model": model_state, "optimizer": optim_state}, FileSystemReader(folder / DCP_DIR)
        if files is not None:
            reader.fs = files
        with dcp_without_process_group():
            dcp.load(state, storage_reader=reader)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
        )

    def peak_memory_gb(self) -> float:
        """Peak memory of this process: allocated on the GPU, resident set on the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class DataParallelStrategy(Strategy):
    """A strategy over a torch.distributed process group: metrics and decisions are agreed by all ranks."""

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def any(self, flag: bool) -> bool:
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def state_dict_options(model: nn.Module) -> StateDictOptions:
    """What a checkpoint of `model` holds: every parameter, or with frozen ones (an adapter run) the trainable
    ones only, loaded back into a model whose frozen part came from the base (`strict` off for those)."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def launched_device(cfg: ExperimentConfig, how_to_launch: str) -> torch.device:
    """This rank's device under a launcher (GPU `LOCAL_RANK`, or the CPU); a clear error without one."""
    if "RANK" not in os.environ:
        raise ConfigError(f"train.strategy={cfg.train.strategy} needs a launcher: {how_to_launch}")
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def resolve_precision(cfg: ExperimentConfig, device: torch.device) -> Precision:
    """`auto` is bf16 on GPU and fp32 on CPU."""
    if cfg.train.precision == Precision.auto:
        return Precision.bf16 if device.type == "cuda" else Precision.fp32
    return cfg.train.precision


def initial_values(cfg: ExperimentConfig) -> Callable[[str], torch.Tensor]:
    """Parameter name -> its initial value, a full tensor: `train.init_from`'s weights, else the seeded
    initialisation (`pretrain.model.initial_value`); an adapter's from `pretrain.adapters`."""
    reader, shapes = init_from_weights(cfg), param_shapes(cfg.model)

    def base(name: str) -> torch.Tensor:
        return reader(name) if reader is not None else initial_value(cfg.model, name, shapes[name], cfg.train.seed)

    if cfg.peft.method == "none":
        return base
    adapter = adapter_initial_values(cfg, base)
    trained = set(reader.shapes) if reader is not None else set()  # an adapter checkpoint's own adapter

    def value(name: str) -> torch.Tensor:
        return adapter(name) if is_adapter_name(name) and name not in trained else base(name)

    return value


def init_from_weights(cfg: ExperimentConfig):
    """`train.init_from` as a `WeightReader` (name -> full tensor), checked against the model's names
    and shapes before anything is built; None when the run starts from the seeded initialisation."""
    if not cfg.train.init_from:
        return None
    from pretrain.consolidate import WeightReader

    try:
        reader = WeightReader(cfg.train.init_from)
        shapes = param_shapes(cfg.model)  # an adapter checkpoint of this run's adapter may carry it too
        adapter = all_param_shapes(cfg) if cfg.peft.method != "none" else {}
        shapes.update({name: adapter[name] for name in reader.shapes if name in adapter and is_adapter_name(name)})
        reader.check(shapes)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"train.init_from: {e}") from None
    return reader
