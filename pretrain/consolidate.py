"""One file of full tensors with Meta's parameter names from any checkpoint folder, whatever wrote it.

`single` and `fsdp` checkpoints are torch.distributed.checkpoint folders, read here without a process
group; DeepSpeed's are read with its own `zero_to_fp32` (ZeRO 1-3, fp32 master weights) or, at stage
0, from the replicated module state. The output is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pretrain.parallel.base import DCP_DIR
from pretrain.parallel.deepspeed import LAYOUT, TAG

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def consolidated_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's full tensors, by Meta's names, from checkpoint `folder` (no optimizer state)."""
    folder = Path(folder)
    if (folder / DCP_DIR).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from pretrain.parallel.base import dcp_without_process_group

        metadata = dcp.FileSystemReader(str(folder / DCP_DIR)).read_metadata().state_dict_metadata
        model = {
            key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
        }
        with dcp_without_process_group():
            dcp.load({"model": model}, checkpoint_id=str(folder / DCP_DIR))
        return model
    if (folder / TAG / LAYOUT).is_file():
        import json

        if json.loads((folder / TAG / LAYOUT).read_text())["zero_stage"] == 0:
            state = torch.load(folder / TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
            return {k: v.float() for k, v in state["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG))
    raise FileNotFoundError(f"{folder}: not a checkpoint folder (no {DCP_DIR}/ and no {TAG}/{LAYOUT})")


def consolidate(folder: str | os.PathLike, output: str | os.PathLike | None = None, dtype: str = "fp32") -> Path:
    """Write the consolidated model of `folder` to `output` (default `<folder>/consolidated.pth`)."""
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in consolidated_state_dict(folder).items()}
    output = Path(output) if output else Path(folder) / "consolidated.pth"
    tmp = output.with_name(output.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, output)
    return output
