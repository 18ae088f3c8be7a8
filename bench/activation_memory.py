"""Activation memory and recomputation of one transformer block per activation-checkpointing mode.

For a model config's block (default llama1-7b at sequence 2048), on CPU or GPU, measures for each mode
(`none`, `full`, `selective`, `llama`):

- bytes kept for the backward pass per token per layer: every tensor autograd saves, seen through
  `torch.autograd.graph.saved_tensors_hooks` (parameters excluded, each storage counted once), plus,
  for `selective`, the outputs that its policy keeps inside `torch.utils.checkpoint` (which the outer
  hooks cannot see), recorded as they are produced;
- FLOPs recomputed in the backward pass: the FLOPs the backward runs beyond the `none` backward, with
  matmuls and attention counted by `torch.utils.flop_counter.FlopCounterMode` and every other op at one
  FLOP per output element; shown against the FLOPs of a training step (forward + backward of `none`).

    python bench/activation_memory.py                                  # llama1-7b block, T=2048, CPU
    python bench/activation_memory.py --config debug --seq 256 --out bench/results/x.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import provenance, publish  # noqa: E402
from pretrain.config import Checkpointing, load_config  # noqa: E402
from pretrain.model import Transformer, rope_cos_sin  # noqa: E402
from pretrain.parallel.activation_checkpoint import SAVED_OPS, apply_activation_checkpointing  # noqa: E402

MODES = ["none", "full", "selective", "llama"]
MATMUL_LIKE = {"mm", "addmm", "bmm", "matmul"}


class OpCounter(TorchDispatchMode):
    """Elementwise FLOPs (one per output element of ops that FlopCounterMode does not count) and the
    bytes of outputs of the ops `selective` keeps."""

    def __init__(self):
        super().__init__()
        self.elementwise = 0
        self.kept_bytes = 0
        self.kept: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        outs = out if isinstance(out, (tuple, list)) else (out,)
        tensors = [t for t in outs if isinstance(t, torch.Tensor)]
        if func in SAVED_OPS:
            for t in tensors:
                if t.untyped_storage().data_ptr() not in self.kept:
                    self.kept.add(t.untyped_storage().data_ptr())
                    self.kept_bytes += t.untyped_storage().nbytes()
        elif name not in MATMUL_LIKE and "scaled_dot_product" not in name and func._schema.is_mutable is False:
            if not name.startswith(("view", "_unsafe_view", "t", "transpose", "detach", "expand", "select", "slice")):
                self.elementwise += sum(t.numel() for t in tensors if t.is_floating_point())
        return out


def measure(cfg, mode: str, batch: int, seq: int, device: torch.device, dtype: torch.dtype | None) -> dict:
    """Saved bytes and backward FLOPs of one block in `mode` (fresh block, same seed each time)."""
    torch.manual_seed(0)
    args = cfg.model
    with torch.device("meta"):
        model = Transformer(args)
    block = model.layers[0]
    block.to_empty(device=device)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if dtype is not None:  # bf16 weights as FSDP and DeepSpeed hold them (autocast's weight copies would count)
        block.to(dtype)
    model.layers = torch.nn.ModuleList([block])
    apply_activation_checkpointing(model, Checkpointing(mode))
    cos_sin = rope_cos_sin(args.head_dim, seq, args.rope_theta, device=device)
    x = torch.randn(batch, seq, args.dim, device=device, dtype=dtype, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() != cos_sin.untyped_storage().data_ptr():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    counter = OpCounter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter:
        with FlopCounterMode(display=False) as forward_flops:
            y = block(x, cos_sin)
    kept = sum(saved.values()) + (counter.kept_bytes if mode == "selective" else 0)
    backward_counter = OpCounter()
    with backward_counter, FlopCounterMode(display=False) as backward_flops:
        y.backward(torch.ones_like(y))
    tokens = batch * seq
    return {
        "mode": mode,
        "saved_bytes_per_token": kept / tokens,
        "forward_flops": forward_flops.get_total_flops() + counter.elementwise,
        "backward_flops": backward_flops.get_total_flops() + backward_counter.elementwise,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama1-7b", help="a model preset or experiment YAML")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and activations (default on GPU)")
    parser.add_argument("--out", type=Path, help="also write the table as Markdown here")
    args = parser.parse_args()
    cfg = load_config(args.config)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 or device.type == "cuda" else None
    rows = [measure(cfg, mode, args.batch, args.seq, device, dtype) for mode in MODES]
    base = rows[0]
    step_flops = base["forward_flops"] + base["backward_flops"]
    m = cfg.model
    lines = [
        f"# Activation memory per transformer block: {args.config} (dim {m.dim}, {m.n_heads} heads, "
        f"{m.kv_heads} kv heads, ffn {m.hidden_dim}), sequence {args.seq}, batch {args.batch}",
        "",
        *provenance(device, "bf16" if dtype else "fp32"),
        "",
        "| mode | saved bytes / token / layer | vs none | recomputed FLOPs / token / layer | share of a step's FLOPs |",
        "|---|---|---|---|---|",
    ]
    tokens = args.batch * args.seq
    for row in rows:
        recomputed = max(row["backward_flops"] - base["backward_flops"], 0)
        lines.append(
            f"| {row['mode']} | {row['saved_bytes_per_token']:,.0f} | "
            f"{row['saved_bytes_per_token'] / base['saved_bytes_per_token']:.2f}x | "
            f"{recomputed / tokens:,.0f} | {100 * recomputed / step_flops:.1f}% |"
        )
    lines += [
        "",
        f"A training step of `none` is {step_flops / tokens:,.0f} FLOPs per token per layer here (forward "
        "and backward; matmuls and attention as FlopCounterMode counts them, other ops one FLOP per element).",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
