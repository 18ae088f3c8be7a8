"""Where a checkpoint folder keeps model and optimizer state, by the strategy that wrote it.

The strategies (`parallel/`) write these files and `consolidate` reads any of them, so the names live
here, below both: neither imports the other for them.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

DCP_DIR = "dcp"  # `single` and `fsdp` (and `import`): torch.distributed.checkpoint, keyed by parameter name
DEEPSPEED_TAG = "deepspeed"  # the sub-folder DeepSpeed's engine writes (its checkpoint tag)
DEEPSPEED_LAYOUT = "layout.json"  # in that sub-folder: ZeRO stage and world size of the saved state


@contextlib.contextmanager
def dcp_without_process_group() -> Iterator[None]:
    """torch.distributed.checkpoint warns when used without a process group, which `single` is by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
