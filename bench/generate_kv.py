"""Generation speed with and without the key/value cache (`pretrain.generate.sample`).

For each model (randomly initialised: speed does not depend on the weights) it samples greedily
`--new-tokens` tokens after a `--prompt-len`-token prompt with the cache and with the full recompute
of every step, `--repeats` times each, keeps the best time of each, and checks that both give the
same tokens. The load average before and after each run is recorded, since other processes may share
the cores. Writes a Markdown table to bench/results/<date>-generate-kv.md (or `--out`).

    python bench/generate_kv.py [--new-tokens 256] [--prompt-len 16] [--repeats 3] [--models debug 1024x8]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.generate import sample  # noqa: E402
from pretrain.model import ModelArgs, build_model, count_params  # noqa: E402

MODELS = {  # the debug experiment's model (configs/model/debug.yaml), and a bigger one with LLaMA's vocabulary
    "debug": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=4096, multiple_of=64),
    "1024x8": ModelArgs(dim=1024, n_layers=8, n_heads=16, n_kv_heads=8, vocab_size=32000, multiple_of=256),
}


def cpu_model() -> str:
    """The CPU's model name, as `lscpu` says it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def timed(model, prompt: list[int], new_tokens: int, use_cache: bool) -> tuple[float, list[int], str]:
    """Seconds for one greedy sample, its tokens, and the 1-minute load average before/after."""
    before = os.getloadavg()[0]
    t0 = time.perf_counter()
    tokens = sample(model, prompt, new_tokens, use_cache=use_cache)
    seconds = time.perf_counter() - t0
    return seconds, tokens, f"{before:.1f}/{os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="default: bench/results/<date>-generate-kv.md")
    opts = parser.parse_args()
    date = datetime.date.today().isoformat()
    out = opts.out or ROOT / "bench" / "results" / f"{date}-generate-kv.md"
    rows, loads = [], []
    for name in opts.models:
        args = MODELS[name]
        model = build_model(args).eval()
        prompt = torch.randint(0, args.vocab_size, (opts.prompt_len,), generator=torch.Generator().manual_seed(0))
        prompt = prompt.tolist()
        sample(model, prompt, 4)  # warm-up
        best, tokens = {}, {}
        for use_cache in (True, False):
            for _ in range(opts.repeats):
                seconds, got, load = timed(model, prompt, opts.new_tokens, use_cache)
                loads.append(load)
                best[use_cache] = min(best.get(use_cache, seconds), seconds)
                tokens[use_cache] = got
                print(f"{name} cache={use_cache}: {opts.new_tokens / seconds:.1f} tokens/s (load {load})", flush=True)
        same = "yes" if tokens[True] == tokens[False] else "NO"
        params = count_params(args)[0] / 1e6
        shape = f"dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.kv_heads} heads, vocab {args.vocab_size}"
        with_cache, without = opts.new_tokens / best[True], opts.new_tokens / best[False]
        speedup = with_cache / without
        rows.append(
            f"| {name} | {shape} | {params:.1f}M | {with_cache:.1f} | {without:.1f} | {speedup:.1f}x | {same} |"
        )
    command = "python bench/generate_kv.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            "# Generation with and without the key/value cache",
            "",
            f"- device: {cpu_model()}, {os.cpu_count()} cores, {platform.machine()}, {torch.get_num_threads()} torch"
            f" threads, torch {torch.__version__}, fp32, date {date}",
            f"- command: {command.strip()}",
            f"- greedy `pretrain.generate.sample`, batch 1, a {opts.prompt_len}-token prompt, {opts.new_tokens} new"
            f" tokens, random weights; best of {opts.repeats} runs each; tokens/s = new tokens / wall time",
            f"- 1-minute load average before/after each run (other processes share the cores): {', '.join(loads)}",
            "",
            "| model | shape | parameters | tokens/s with cache | tokens/s without | speed-up | same tokens |",
            "|---|---|---:|---:|---:|---:|---|",
            *rows,
            "",
        ]
    )
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
