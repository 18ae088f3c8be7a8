"""`deepspeed`: DeepSpeed ZeRO stage 0-3 with optional CPU offload, configured from our config.

The DeepSpeed JSON is generated from the experiment config (batch sizes, clipping, precision, ZeRO
stage, offload) and a user JSON (`train.deepspeed_json`) may override any key. Under ZeRO-3 the model
is built inside `deepspeed.zero.Init`, so each module's parameters are partitioned as soon as that
module exists, and each rank then writes its own partition of the initial values a single process
would draw (`pretrain.model.initial_value`): no rank ever holds the whole model. Stages 0-2 replicate
the parameters and are built like `single`.

Gradient accumulation: the strategy marks the last micro-batch of a step as DeepSpeed's accumulation
boundary, where gradients are reduced; `engine.step()` then computes the global norm, clips, and
drops the update when gradients are not finite (a non-finite loss gives non-finite gradients).
Checkpoints are DeepSpeed's own (`save_checkpoint`, one optimizer partition per rank) and resume on
the same number of ranks; `python -m pretrain consolidate` turns them into one file.
"""

from __future__ import annotations

import importlib
import json
import math
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain.adapters import all_param_shapes
from pretrain.checkpoint_layout import DEEPSPEED_LAYOUT as LAYOUT
from pretrain.checkpoint_layout import DEEPSPEED_TAG as TAG
from pretrain.config import Checkpointing, ConfigError, ExperimentConfig, Precision
from pretrain.model import ModelArgs, Transformer, TransformerBlock
from pretrain.optim import build_optimizer
from pretrain.parallel.base import DataParallelStrategy, launched_device, resolve_precision


def deep_update(base: dict, override: dict) -> dict:
    """`base` with `override` merged in, nested mappings key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(cfg: ExperimentConfig, world_size: int, precision: Precision) -> dict[str, Any]:
    """The DeepSpeed JSON for this experiment: generated, then `train.deepspeed_json` on top."""
    t = cfg.train
    global_batch = t.global_batch_tokens // cfg.data.seq_len
    if global_batch % (t.micro_batch_size * world_size):
        raise ConfigError(
            f"train.global_batch_tokens={t.global_batch_tokens} is {global_batch} sequences, not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} x {world_size} ranks"
        )
    zero: dict[str, Any] = {"stage": t.zero_stage}
    # pin_memory: page-locked host buffers for the GPU <-> CPU copies. On the CPU, DeepSpeed's accelerator makes
    # pinning a no-op (CPU_Accelerator.pin_memory returns the tensor), so the same JSON runs there (tests do).
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("train.offload_optimizer needs train.zero_stage >= 1")
    generated = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": global_batch // (t.micro_batch_size * world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": precision == Precision.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, the same optimizer as the other strategies
        "steps_per_print": 2**62,  # we log ourselves
    }
    if precision == Precision.bf16 and t.zero_stage > 0:  # as FSDP: bf16 compute, fp32 gradient reduction
        generated["communication_data_type"] = "fp32"
        generated["data_types"] = {"grad_accum_dtype": "fp32"}
    if t.deepspeed_json is None:
        return generated
    try:
        user = json.loads(Path(t.deepspeed_json).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_json: {t.deepspeed_json}: not valid JSON: {e}") from None
    merged = deep_update(generated, user)
    refused = {  # settings under which the trainer's contract (global norm, skipped steps, init) would not hold
        "zero_optimization.compute_grad_norm": merged["zero_optimization"].get("compute_grad_norm") is False,
        "bf16.check_grad_overflow": merged.get("bf16", {}).get("check_grad_overflow") is False,
        "zero_optimization.zero_hpz_partition_size": merged["zero_optimization"].get("zero_hpz_partition_size", 1) > 1,
    }
    for key, bad in refused.items():
        if bad:
            raise ConfigError(
                f"train.deepspeed_json: {t.deepspeed_json} sets {key}, which this trainer does not support"
            )
    return merged


def torch_save_to_file(state_dict: Any, path: str, zipfile: bool) -> None:
    """`torch.save` through a Python file: a failed write (disk full, file too large) keeps its OSError,
    errno and all, as the error's context, where a path gives only `unexpected pos 704 vs 598`."""
    with open(path, "wb") as f:
        torch.save(state_dict, f, _use_new_zipfile_serialization=zipfile)


class DeepSpeed(DataParallelStrategy):
    """ZeRO: optimizer states (stage 1), gradients (2) and parameters (3) partitioned over ranks."""

    def __init__(self, cfg: ExperimentConfig):
        self.device = launched_device(
            cfg, "deepspeed --num_gpus N --module pretrain train ... (launch/deepspeed.sh), or torchrun"
        )
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("train.strategy=deepspeed needs DeepSpeed: pip install deepspeed") from None
        if self.device.type == "cpu":
            # on the CPU, init_distributed would compile a shared-memory op that training never uses
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo", timeout=timedelta(minutes=30)
        )
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.precision = resolve_precision(cfg, self.device)
        self.config = deepspeed_config(cfg, self.world_size, self.precision)
        self.stage = self.config["zero_optimization"]["stage"]
        self.micro_batches = self.config["gradient_accumulation_steps"]
        self._backwards = 0
        self.engine = None

    def new_model(self, args: ModelArgs) -> Transformer:
        """ZeRO-3: inside `deepspeed.zero.Init`, each module partitioned as soon as it exists; else on `meta`."""
        if self.stage != 3:
            return super().new_model(args)
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=self.config):
            return Transformer(args)

    def add_adapter(self, model: Transformer, cfg: ExperimentConfig) -> None:
        """ZeRO-3: the adapter's parameters partitioned as they are made, as the base's were."""
        if self.stage != 3:
            return super().add_adapter(model, cfg)
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=self.config):
            super().add_adapter(model, cfg)

    def shard(self, model: Transformer, cfg: ExperimentConfig) -> None:
        """The engine wraps the model in `setup`; only ZeRO-3 under `llama` checkpointing needs more here.

        The hand-written block reads its weights directly, not through its Linear modules: ZeRO-3 must
        gather (and release, and reduce) the parameters of a whole block at its boundary.
        """
        if self.stage == 3 and cfg.train.activation_checkpointing == Checkpointing.llama:
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, [TransformerBlock])

    def materialise(self, model: nn.Module) -> None:
        if self.stage != 3:  # ZeRO-3 partitions were allocated as the model was built
            super().materialise(model)

    def write_initial_value(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """ZeRO-3: this rank's slice of the flattened `value` into its partition; else the whole value."""
        if self.stage != 3:
            return super().write_initial_value(param, value)
        part = param.ds_tensor
        start = part.ds_numel * self.rank
        flat = value.flatten()[start : start + part.ds_numel]
        part.zero_()
        part[: flat.numel()].copy_(flat)

    def build_optimizer(self, model: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
        """DeepSpeed's CPU Adam when the optimizer state is offloaded, else the default."""
        if self.config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") == "none":
            return super().build_optimizer(model, cfg)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return build_optimizer(model, cfg.optim, all_param_shapes(cfg), optimizer_class=DeepSpeedCPUAdam)

    def setup(self, cfg: ExperimentConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The model and optimizer inside a DeepSpeed engine, which the trainer calls."""
        import deepspeed

        model, optimizer = super().setup(cfg)
        if self.stage == 0:  # DeepSpeed's clipping at stage 0 keeps no norm: we clip (see `step`)
            self.config["gradient_clipping"] = 0.0
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        if self.engine.checkpoint_engine.is_decoupled():
            raise ConfigError(
                "train.deepspeed_json: a decoupled checkpoint writer finishes files after save returns; "
                "checkpoints here are published atomically only with a synchronous writer"
            )
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        writer = self.engine.checkpoint_engine
        if isinstance(writer, TorchCheckpointEngine):  # the default: torch.save to a path
            writer.save = partial(torch_save_to_file, zipfile=writer.zipfile_serialization)
        return self.engine, optimizer  # the engine's optimizer steps this one: our LR schedule drives it

    def backward(self, loss: torch.Tensor) -> None:
        self._backwards += 1
        self.engine.set_gradient_accumulation_boundary(self._backwards % self.micro_batches == 0)
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer divided by the number of micro-batches

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, loss: torch.Tensor
    ) -> tuple[torch.Tensor, bool]:
        if self._backwards % self.micro_batches:
            raise RuntimeError(f"a step of {self._backwards} micro-batches; DeepSpeed expects {self.micro_batches}")
        self._backwards = 0
        if self.stage == 0:  # plain data parallel: gradients are all-reduced, the base rule applies
            norm = self.clip_grad_norm(self.engine.module, max_norm)
            applied = bool(torch.isfinite(loss) & torch.isfinite(norm))
            if applied:
                self.engine.step()
            self.engine.zero_grad()
            return norm, applied
        self.engine.step()  # ZeRO: global norm, clipping, and no update when gradients are not finite
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(math.nan if norm is None else float(norm))
        return norm, bool(self.engine.was_step_applied() and torch.isfinite(loss) and torch.isfinite(norm))

    reads_through_files = False  # DeepSpeed reads and writes with torch.save/load: checksums are read from disk

    def save(
        self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, asynchronous: bool = False, files=None
    ) -> None:
        """DeepSpeed's own checkpoint (`files` unused: DeepSpeed writes with torch.save; checksums are read back)."""
        frozen = any(not p.requires_grad for p in self.engine.module.parameters())  # an adapter's base: not saved
        self.engine.save_checkpoint(str(folder), tag=TAG, save_latest=False, exclude_frozen_parameters=frozen)
        if self.is_main:
            layout = {"zero_stage": self.stage, "world_size": self.world_size}
            (folder / TAG / LAYOUT).write_text(json.dumps(layout))
        return None

    def load(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, files=None) -> None:
        if not (folder / TAG / LAYOUT).is_file():
            raise ConfigError(
                f"{folder} was not written by train.strategy=deepspeed; resume it with the strategy that wrote it "
                f"(single and fsdp read each other's), or start from its weights after "
                f"`python -m pretrain consolidate {folder}`"
            )
        layout = json.loads((folder / TAG / LAYOUT).read_text())
        if layout["world_size"] != self.world_size or layout["zero_stage"] != self.stage:
            raise ConfigError(
                f"{folder} holds ZeRO-{layout['zero_stage']} state of {layout['world_size']} ranks; this run is "
                f"ZeRO-{self.stage} on {self.world_size}. Resume with the same stage and number of ranks, or "
                f"convert it with `python -m deepspeed.checkpoint.ds_to_universal` and load it with "
                f'{{"checkpoint": {{"load_universal": true}}}} in train.deepspeed_json'
            )
        frozen = any(not p.requires_grad for p in self.engine.module.parameters())
        path, _ = self.engine.load_checkpoint(
            str(folder), tag=TAG, load_lr_scheduler_states=False, load_module_strict=not frozen
        )
        if path is None:
            raise FileNotFoundError(f"{folder / TAG}: DeepSpeed found no checkpoint there")
