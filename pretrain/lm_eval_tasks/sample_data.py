"""The bundled tasks' data, read from beside this file (a `dataset_path: json` task would read its
`data_files` relative to the working directory)."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_continuations(**_) -> dict:
    """sample_continuation.jsonl as a test split (lm-eval passes the task's metadata, unused here)."""
    import datasets

    with open(HERE / "sample_continuation.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
