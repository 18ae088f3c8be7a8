"""Full tensors with Meta's parameter names from any checkpoint, whatever wrote it.

`WeightReader` reads one tensor at a time from a checkpoint folder of any strategy (`single` and `fsdp`
write torch.distributed.checkpoint folders, read here without a process group; DeepSpeed's are read
with its own `zero_to_fp32` at ZeRO 1-3, or from the replicated module state at stage 0), from a
folder written by `import`, or from one `.pth` / `.safetensors` file of Meta-named tensors (what
`consolidate` writes). It serves `consolidate`, `export-hf`, `generate` and `train.init_from`.

A folder with a checksums.json is checked first: the commands verify every file (sizes and sha256,
`pretrain.checkpoint.verify_checkpoint`) before they read; `WeightReader` itself compares sizes only
(a `stat` per file), so `train.init_from` and an adapter's base (whose sha256 `open_base` checks) refuse a
truncated or half-deleted folder by name without hashing it on every rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from data_pipeline.shards import atomic_open
from pretrain.checkpoint import TRAINER, load_torch, verify_checkpoint
from pretrain.checkpoint_layout import DCP_DIR, DEEPSPEED_LAYOUT, DEEPSPEED_TAG, dcp_without_process_group

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class WeightReader:
    """The model tensors of `path` by Meta's names, as full fp32 CPU tensors, one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = path = Path(path)
        verify_checkpoint(path, hashes=False)
        self._state: dict[str, torch.Tensor] | None = None
        if (path / DCP_DIR).is_dir():
            from torch.distributed.checkpoint import FileSystemReader
            from torch.distributed.checkpoint.metadata import TensorStorageMetadata

            metadata = FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
            self._meta = {
                key.removeprefix("model."): meta
                for key, meta in metadata.items()
                if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
            }
            self.shapes = {name: tuple(meta.size) for name, meta in self._meta.items()}
            self._get: Callable[[str], torch.Tensor] = self._read_dcp
        elif (path / DEEPSPEED_TAG / DEEPSPEED_LAYOUT).is_file():
            if json.loads((path / DEEPSPEED_TAG / DEEPSPEED_LAYOUT).read_text())["zero_stage"] == 0:
                module = torch.load(
                    path / DEEPSPEED_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
                )
                self._state = dict(module["module"])
            else:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                self._state = dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG))
        elif path.is_file() and path.suffix == ".safetensors":
            from safetensors import safe_open

            self._file = safe_open(str(path), framework="pt")
            self.shapes = {name: tuple(self._file.get_slice(name).get_shape()) for name in self._file.keys()}
            self._get = self._file.get_tensor
        elif path.is_file():
            try:
                self._state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise ValueError(f"{path}: not a PyTorch file of tensors ({e})") from None
            if not isinstance(self._state, Mapping) or not all(
                isinstance(v, torch.Tensor) for v in self._state.values()
            ):
                raise ValueError(f"{path}: expected a dict of tensors by parameter name")
        else:
            raise FileNotFoundError(
                f"{path}: not a checkpoint (no {DCP_DIR}/ and no {DEEPSPEED_TAG}/{DEEPSPEED_LAYOUT}) "
                "and not a .pth or .safetensors file"
            )
        if self._state is not None:
            self.shapes = {name: tuple(t.shape) for name, t in self._state.items()}
            self._get = self._state.__getitem__
        if (path / TRAINER).is_file():  # an adapter run's checkpoint holds the adapter; its base is named
            self._add_base(load_torch(path / TRAINER))

    def _add_base(self, trainer: dict) -> None:
        """Serve the base weights of an adapter-only checkpoint (`pretrain.adapters.open_base`) beside its own."""
        from pretrain.adapters import BASE_RECORD, open_base

        if trainer.get(BASE_RECORD) is None:
            return
        shapes, base = open_base(trainer[BASE_RECORD], trainer["config"]["model"], self.path)
        own, own_get = self.shapes, self._get
        self.shapes = {**shapes, **own}
        self._get = lambda name: own_get(name) if name in own else base(name)

    def _read_dcp(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        meta = self._meta[name]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with dcp_without_process_group():  # each rank reads on its own: no collective per tensor
            dcp.load({"model": {name: tensor}}, checkpoint_id=str(self.path / DCP_DIR), no_dist=True)
        return tensor

    def __call__(self, name: str) -> torch.Tensor:
        """Tensor `name` in fp32 (a KeyError names the file when there is none)."""
        if name not in self.shapes:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._get(name).float()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, in the order stored."""
        for name in self.shapes:
            yield name, self(name)

    def check(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse, naming the file and the keys, unless it holds exactly these names with these shapes."""
        missing = [n for n in shapes if n not in self.shapes]
        unexpected = [n for n in self.shapes if n not in shapes]
        wrong = [
            f"{n} {self.shapes[n]} (model: {tuple(s)})" for n, s in shapes.items() if self.shapes.get(n, s) != tuple(s)
        ]
        problems = [
            f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
            if items
        ]
        if problems:
            raise ValueError(f"{self.path} does not fit the model ({'; '.join(problems)}); check the model section")


def checkpoint_config(folder: str | os.PathLike) -> dict:
    """The config saved in checkpoint `folder` (an `import` folder holds its model section only)."""
    path = Path(folder) / TRAINER
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a checkpoint folder (no {TRAINER})")
    return load_torch(path)["config"]


def consolidated_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's full fp32 tensors, by Meta's names, from checkpoint `path` (no optimizer state)."""
    return dict(WeightReader(path).items())


def default_output(folder: str | os.PathLike) -> Path:
    """Where `consolidate` writes by default: beside the checkpoints, never inside one (checkpoint rotation
    deletes whole checkpoint folders): `<run>/consolidated/step-00000120.pth` for
    `<run>/checkpoints/step-00000120`, else `<folder>.consolidated.pth` next to the folder."""
    folder = Path(folder)
    if folder.parent.name == "checkpoints":
        return folder.parent.parent / "consolidated" / f"{folder.name}.pth"
    return folder.parent / f"{folder.name}.consolidated.pth"


def consolidate(folder: str | os.PathLike, output: str | os.PathLike | None = None, dtype: str = "fp32") -> Path:
    """Write the consolidated model of `folder` to `output` (default: `default_output(folder)`)."""
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in WeightReader(folder).items()}
    output = Path(output) if output else default_output(folder)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(output) as f:
        torch.save(state, f)
    return output
