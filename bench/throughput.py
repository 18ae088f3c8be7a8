"""Training-step throughput: ours per activation-checkpointing mode, and Hugging Face's LlamaForCausalLM,
the same shapes, optimizer and data in the same run.

Each variant runs `--warmup` untimed then `--steps` timed optimizer steps of AdamW on random tokens
(micro-batch `--micro-batch` x sequence `--seq`, one micro-batch a step) on one device. Reported:
tokens/sec, MFU when the device's peak is known (FLOPs per token as in the trainer, DESIGN §6), the
ratio to our `none`, the ratio to Hugging Face, and peak memory (GPU) or step time (CPU).

    python bench/throughput.py --config debug --seq 256 --micro-batch 4           # CPU, seconds
    python bench/throughput.py --config configs/model/llama1-7b.yaml model.n_layers=8 --seq 2048 --bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import provenance, publish  # noqa: E402
from pretrain.config import Checkpointing, load_config  # noqa: E402
from pretrain.metrics import device_peak_flops  # noqa: E402
from pretrain.model import build_model, count_params, flops_per_token  # noqa: E402
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing  # noqa: E402


def ours(args, mode: str, device):
    model = build_model(args, device, seed=0)
    apply_activation_checkpointing(model, Checkpointing(mode))
    return model, lambda tokens: model(tokens)


def hugging_face(args, device):
    from transformers import LlamaForCausalLM

    from pretrain.hf import hf_config

    config = hf_config(args)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device)
    return model, lambda tokens: model(input_ids=tokens, use_cache=False).logits


def run(build, device, dtype, micro_batch: int, seq: int, vocab: int, warmup: int, steps: int) -> dict:
    """Mean seconds per optimizer step over `steps` timed steps, and peak GPU memory."""
    model, forward = build()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (micro_batch, seq + 1), generator=generator) for _ in range(4)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        tokens = batches[i % len(batches)].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = forward(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    del model, optimizer
    times.sort()
    median = times[len(times) // 2]
    return {"step_s": median, "min_s": times[0], "max_s": times[-1], "peak_gb": peak, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="debug", help="a model preset or YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layers=8")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--modes", default="none,selective,llama,full")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face's model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default on GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the table as Markdown here")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    m, device = cfg.model, torch.device(args.device)
    m.max_seq_len = max(m.max_seq_len, args.seq)
    dtype = torch.bfloat16 if args.bf16 or device.type == "cuda" else None
    common = (device, dtype, args.micro_batch, args.seq, m.vocab_size, args.warmup, args.steps)
    rows = {}
    for mode in args.modes.split(","):
        rows[f"ours, {mode}"] = run(lambda mode=mode: ours(m, mode, device), *common)
    if not args.no_hf:
        rows["Hugging Face LlamaForCausalLM (sdpa)"] = run(lambda: hugging_face(m, device), *common)
    tokens = args.micro_batch * args.seq
    fpt, peak = flops_per_token(m, args.seq), device_peak_flops(device)
    base = rows[next(iter(rows))]["step_s"]
    hf = rows.get("Hugging Face LlamaForCausalLM (sdpa)", {}).get("step_s")
    lines = [
        f"# Training-step throughput: {args.config} {' '.join(args.overrides)} ({count_params(m)[0] / 1e6:,.1f}M "
        f"parameters, dim {m.dim}, {m.n_layers} layers), micro-batch {args.micro_batch} x {args.seq} tokens",
        "",
        *provenance(device, "bf16 autocast" if dtype else "fp32"),
        f"each variant: median of {args.steps} timed steps after {args.warmup} untimed",
        "",
        "| variant | step (s), median | min - max | tokens/sec | MFU | vs ours none | vs HF | peak mem (GB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        tps = tokens / r["step_s"]
        mfu = f"{100 * tps * fpt / peak:.1f}%" if peak else "n/a"
        vs_hf = f"{hf / r['step_s']:.2f}x" if hf else "n/a"
        mem = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "n/a"
        spread, ratio = f"{r['min_s']:.3f} - {r['max_s']:.3f}", f"{base / r['step_s']:.2f}x"
        lines.append(f"| {name} | {r['step_s']:.3f} | {spread} | {tps:,.0f} | {mfu} | {ratio} | {vs_hf} | {mem} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
