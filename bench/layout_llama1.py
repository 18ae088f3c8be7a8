"""The layout planner against LLaMA-1's published training costs (paper, Table 15; A100-80GB).

For each LLaMA-1 experiment config (1.0T tokens for 7B and 13B, 1.4T for 33B and 65B; 4M-token batches
of 2048-token sequences), the best fitting layout that `python -m pretrain layout` predicts on 2048
A100-80GB GPUs, with its GPU-hours beside the paper's. The paper gives the GPU count (2048) and the
throughput (380 tokens/sec/GPU, 21 days) for 65B only. A prediction, no timing: the table is the same on
any machine for a given commit.

    python bench/layout_llama1.py --out bench/results/2026-12-07-layout-llama1.md
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.checkpoint import code_version  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.layout import get_kind, plan_layouts  # noqa: E402

PUBLISHED = {  # GPU-hours, LLaMA-1 paper Table 15
    "llama1-7b": 82_432,
    "llama1-13b": 135_168,
    "llama1-33b": 530_432,
    "llama1-65b": 1_022_362,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2048)
    parser.add_argument("--gpu", default="a100-80gb")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    kind = get_kind(opts.gpu)
    rows = []
    for preset, published in PUBLISHED.items():
        cfg = load_config(f"configs/experiments/{preset}.yaml")
        best = next(p for p in plan_layouts(cfg, opts.gpus, kind) if p.fits)
        # the same model with overlapped communication free (no SMs taken by NCCL's kernels)
        free = next(p for p in plan_layouts(cfg, opts.gpus, replace(kind, comm_compute_share=0.0)) if p.fits)
        lay = best.layout
        shard = f" (HSDP: sharded over {lay.fsdp_shard_size})" if lay.fsdp_shard_size else ""
        layout = f"{best.name}{shard}, {lay.activation_checkpointing}, micro-batch {lay.micro_batch_size}"
        rows.append(
            f"| {preset} | {cfg.train.steps * cfg.train.global_batch_tokens / 1e12:.1f}T | {published:,} | "
            f"{best.gpu_hours:,.0f} | {best.gpu_hours / published:.2f} | {free.gpu_hours / published:.2f} | "
            f"{best.tokens_per_sec_per_gpu:,.0f} | "
            f"{100 * best.mfu:.1f}% | {best.days:.1f} | {layout} |"
        )
    lines = [
        f"# Layout planner vs LLaMA-1 Table 15 ({opts.gpus} x {opts.gpu})",
        "",
        f"commit {code_version()}; command: python {' '.join(sys.argv)}",
        "",
        "| preset | tokens | published GPU-hours | predicted | ratio | ratio, overlap free | tokens/sec/GPU | MFU "
        "| days | best layout |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Published for 65B: 380 tokens/sec/GPU on 2048 A100-80GB, about 21 days.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if opts.out:
        opts.out.write_text(text)


if __name__ == "__main__":
    main()
