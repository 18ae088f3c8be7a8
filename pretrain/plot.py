"""Draw loss and throughput from a run's metrics.jsonl into a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, held-out evaluation records) of a metrics.jsonl file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file")
    train, val = [], []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{line_no}: not a JSON object") from None
        if "loss" in record:
            train.append(record)
        elif "val_loss" in record:
            val.append(record)  # events (rollbacks) and benchmark scores are neither
    return train, val


def plot_metrics(metrics: Path, output: Path) -> Path:
    """Loss (train and validation) and tokens/sec/GPU against step, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(metrics)
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_tps.plot([r["step"] for r in train], [r["tokens_per_sec_per_gpu"] for r in train])
    ax_tps.set(xlabel="step", ylabel="tokens/sec/GPU", title="throughput")
    mfu = [r for r in train if r.get("mfu") is not None]
    if mfu:
        twin = ax_tps.twinx()
        twin.plot([r["step"] for r in mfu], [100 * r["mfu"] for r in mfu], color="tab:orange", alpha=0.6)
        twin.set_ylabel("MFU %")
    fig.suptitle(str(metrics.parent.name))
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
