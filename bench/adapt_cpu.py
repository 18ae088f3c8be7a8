"""LoRA on CPU: the quickstart's debug model adapted to new text, against a full-parameter finetune.

For each base: the debug model trained as `bash scripts/quickstart.sh` does (configs/experiments/debug.yaml
on the bundled sample corpus, tokenized by `python -m data_pipeline prepare configs/pipeline/sample.yaml`),
or a checkpoint given with `--base`. The new data is the real StackExchange excerpt bundled for the tests
(tests/data/raw/stackexchange/cstheory.meta/Posts.xml), cleaned by the recipe (`python -m data_pipeline
recipe`, that one source) and tokenized with the base's own tokenizer (`prepare` with `tokenizer.path` set
to it, so it only tokenizes), with `--val-fraction` of its documents held out.

The sample corpus's `stackexchange.jsonl` is the whole cstheory.meta site, so it holds the excerpt's
questions too: a base trained on it has seen (some of) this "new" data. So by default two bases are
trained: the quickstart as it is, and the same run without the sample corpus's stackexchange source
(`data.sources=` the other four), for which the excerpt is new text.

Then, from each base and for the same steps, batch and schedule: a LoRA run (`peft.method=lora`, the base
frozen) and a full-parameter finetune (every weight trained: what a user would do without adapters), each
`python -m pretrain train ... train.init_from=BASE`. Every model is scored by `python -m pretrain evaluate`
on all the held-out windows of the new data, and on the sample corpus's held-out shards (what the base
knew). Reported: held-out losses, trainable parameters, checkpoint sizes on disk (and the adapter as
`export-peft` writes it), CPU seconds of each run (user + system), the load average.

    python bench/adapt_cpu.py --out bench/results/2026-12-07-adapt-cpu.md
    python bench/adapt_cpu.py --base runs/debug/checkpoints/step-00000120     # reuse a base
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.report import provenance, publish  # noqa: E402
from pretrain.adapters import apply_adapters  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.consolidate import checkpoint_config  # noqa: E402
from pretrain.model import build_model  # noqa: E402

CONFIG = "configs/experiments/debug.yaml"
COMMON = ["wandb.mode=disabled", "train.device=cpu"]
SAMPLE_STACKEXCHANGE = "data_pipeline/sample_corpus/stackexchange.jsonl"
RAW = "tests/data/raw/stackexchange/*/Posts.xml"
BASES = {  # name: overrides of the quickstart's run
    "quickstart": [],
    "quickstart without stackexchange": ["data.sources=[python_docs,gutenberg,wikipedia,tex_articles]"],
}


def cpu_run(command: list[str], log: Path) -> float:
    """Run `command` from the repository root (its output to `log`); the CPU seconds it took, children included."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{log.read_text()[-4000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def size(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def last_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step-*"))[-1]


def evaluate(checkpoint: Path, overrides: list[str], out: Path, log: Path) -> dict:
    """`python -m pretrain evaluate` of `checkpoint` on all held-out windows (up to 1,000 micro-batches)."""
    cpu_run(python("pretrain", "evaluate", str(checkpoint), *overrides, "--batches", "1000", "--json", str(out)), log)
    return json.loads(out.read_text())


def new_data(tokenizer: str, work: Path, val_fraction: float) -> tuple[Path, dict]:
    """The excerpt through the recipe, tokenized with `tokenizer`: (token root, prepare's figures)."""
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    clean = work / "clean"
    recipe.write_text(
        f"output: {clean}\nworkers: 1\nsources:\n  - {{name: stackexchange, kind: stackexchange, inputs: ['{RAW}']}}\n"
    )
    cpu_run(python("data_pipeline", "recipe", str(recipe)), work / "recipe.log")
    tokens = work / "tokens"
    vocab = load_config(CONFIG).model.vocab_size
    overrides = [f"tokenizer.path={tokenizer}", f"tokenizer.vocab_size={vocab}", f"tokenize.output={tokens}"]
    overrides.append(f"tokenize.val_fraction={val_fraction}")
    cpu_run(python("data_pipeline", "prepare", str(clean / "pipeline.yaml"), *overrides), work / "prepare.log")
    parts = [json.loads(p.read_text()) for p in (tokens / "stackexchange").glob("part-*.json")]
    report = json.loads((clean / "stackexchange" / "report.json").read_text())
    ids = set()
    for path in (clean / "stackexchange").glob("*.jsonl.gz"):
        with gzip.open(path, "rt") as f:
            ids |= {json.loads(line)["id"] for line in f}
    with open(ROOT / SAMPLE_STACKEXCHANGE) as f:
        seen = {json.loads(line)["id"] for line in f}
    return tokens, {"parts": parts, "report": report, "documents": len(ids), "in_sample": len(ids & seen)}


def trainable(overrides: list[str]) -> tuple[int, int]:
    """(trainable, all) parameters of the debug model under `overrides` (LoRA added when peft.method=lora)."""
    cfg = load_config(CONFIG, overrides)
    model = build_model(cfg.model)
    if cfg.peft.method != "none":
        apply_adapters(model, cfg.peft)
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="a checkpoint to adapt (default: train the bases of BASES)")
    parser.add_argument("--bases", nargs="*", default=list(BASES), help="which bases to train (without --base)")
    parser.add_argument("--base-steps", type=int, default=120, help="the quickstart's 120")
    parser.add_argument("--steps", type=int, default=30, help="steps of each adaptation (4,096 tokens a step)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="wq,wv", help="LoRA's targets (the LoRA paper's wq,wv)")
    parser.add_argument("--lora-lr", type=float, default=1e-2)
    parser.add_argument("--full-lr", type=float, default=1e-3)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--work", type=Path, help="keep runs and data here (default: a temporary folder)")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    load_before = os.getloadavg()
    loads: list[float] = []
    work = opts.work or Path(tempfile.mkdtemp(prefix="adapt-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    schedule = [f"train.steps={opts.steps}", f"train.eval_every={opts.steps}", f"train.save_every={opts.steps}"]
    schedule += [f"optim.warmup_steps={max(1, opts.steps // 10)}", "train.log_every=5"]
    lora = ["peft.method=lora", f"peft.rank={opts.rank}", f"peft.alpha={2 * opts.rank}"]
    lora += [f"peft.targets=[{opts.targets}]", f"optim.lr={opts.lora_lr}"]
    full = [f"optim.lr={opts.full_lr}"]

    bases: dict[str, tuple[Path, float]] = {}  # name: (checkpoint, CPU s to train it)
    if opts.base:
        bases[str(opts.base)] = (opts.base, 0.0)
    else:
        prepared = cpu_run(python("data_pipeline", "prepare", "configs/pipeline/sample.yaml"), work / "sample.log")
        print(f"sample corpus tokenized ({prepared:.0f} CPU s; skipped when already done)", flush=True)
        for name in opts.bases:
            run_dir = work / "base" / name.replace(" ", "-")
            loads.append(os.getloadavg()[0])
            base_overrides = [*COMMON, *BASES[name], f"train.steps={opts.base_steps}", f"train.run_dir={run_dir}"]
            cpu = cpu_run(python("pretrain", "train", CONFIG, *base_overrides), work / f"base-{run_dir.name}.log")
            bases[name] = (last_checkpoint(run_dir), cpu)
            print(f"base {name}: {bases[name][0]} ({cpu:.0f} CPU s)", flush=True)

    rows, sizes, data_lines = [], [], []
    prepared_for: dict[str, tuple[Path, dict]] = {}
    counts = {"LoRA": trainable([*lora]), "full finetune": trainable([])}
    for name, (base, base_cpu) in bases.items():
        saved = checkpoint_config(base)["data"]
        tokenizer = saved["tokenizer"]
        if tokenizer not in prepared_for:
            prepared_for[tokenizer] = new_data(tokenizer, work / f"new-data-{len(prepared_for)}", opts.val_fraction)
        tokens, figures = prepared_for[tokenizer]
        on_new = [f"data.root={tokens}", f"data.tokenizer={tokenizer}", "data.sources=[stackexchange]"]
        on_new.append("data.weights={}")
        own = f"data.sources=[{','.join(saved['sources'])}]"  # the base's own sources ([]: every one under root)
        on_old = [f"data.root={saved['root']}", own, "data.weights={}", "train.eval_batches=8"]
        tag = name.replace(" ", "-").replace("/", "_")
        results = {"base": (base, base_cpu)}
        for method, extra in (("LoRA", lora), ("full finetune", full)):
            run_dir = work / "adapt" / tag / method.replace(" ", "-")
            shutil.rmtree(run_dir, ignore_errors=True)
            loads.append(os.getloadavg()[0])
            overrides = [*COMMON, *on_new, *schedule, *extra, f"train.init_from={base}", f"train.run_dir={run_dir}"]
            cpu = cpu_run(python("pretrain", "train", CONFIG, *overrides), work / f"{tag}-{run_dir.name}.log")
            results[method] = (last_checkpoint(run_dir), cpu)
            print(f"{name}: {method} done ({cpu:.0f} CPU s)", flush=True)
        for method, (checkpoint, cpu) in results.items():
            key = f"{tag}-{method.replace(' ', '-')}"
            new = evaluate(checkpoint, on_new, work / f"{key}-new.json", work / f"{key}-new.log")
            old = evaluate(checkpoint, on_old, work / f"{key}-old.json", work / f"{key}-old.log")
            n, of = counts.get(method, (0, 1))
            share = f"{n:,} ({100 * n / of:.2f}%)" if n else "none (the base)"
            cpu_text = f"{cpu:.0f}" if cpu else "(given)"
            rows.append(
                f"| {name} | {method} | {share} | {new['val_loss']:.3f} | {new['val_ppl']:.1f} | "
                f"{old['val_loss']:.3f} | {cpu_text} |"
            )
        adapter = work / "export" / tag / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        cpu_run(python("pretrain", "export-peft", str(results["LoRA"][0]), str(adapter)), work / f"{tag}-export.log")
        sizes.append(
            f"| {name} | {mb(size(results['full finetune'][0]))} | {mb(size(results['LoRA'][0]))} | "
            f"{mb(size(adapter))} ({', '.join(sorted(p.name for p in adapter.iterdir()))}) |"
        )
        if not data_lines:
            report, written = figures["report"], {"train": [0, 0], "val": [0, 0]}
            for part in figures["parts"]:
                for split in written:
                    written[split][0] += part["stats"]["documents_written"].get(split, 0)
                    written[split][1] += part["stats"]["tokens_written"].get(split, 0)
            data_lines = [
                f"new data: {RAW} ({report['input_bytes']:,} bytes) through the recipe: {report['docs_in']} posts "
                f"grouped -> {report['docs_out']} question documents ({report['bytes_out']:,} bytes), dropped "
                f"{report['dropped']}; tokenized with the base's tokenizer ({tokenizer}), val_fraction "
                f"{opts.val_fraction}: training split {written['train'][0]} documents, {written['train'][1]:,} tokens; "
                f"held out {written['val'][0]} documents, {written['val'][1]:,} tokens",
                f"overlap: {figures['in_sample']} of these {figures['documents']} document ids are also in "
                f"{SAMPLE_STACKEXCHANGE} (the whole cstheory.meta site, with later answers), which the quickstart "
                "trains on",
            ]

    lora_n, total = counts["LoRA"]
    lines = [
        "# LoRA vs full finetune on CPU: the debug model adapted to a StackExchange excerpt",
        "",
        *provenance(torch.device("cpu"), "fp32"),
        f"load average: before {load_before[0]:.2f}, at the start of each run {min(loads, default=0):.2f}-"
        f"{max(loads, default=0):.2f}; {time.time() - started:.0f} s wall in all",
        *data_lines,
        f"bases: {CONFIG}, {opts.base_steps} steps of 4,096 tokens (the quickstart's run) unless --base; "
        "'without stackexchange' trains on the sample corpus's other four sources",
        f"adaptation: {opts.steps} steps of 4,096 tokens (2 x 8 x 256), warmup {max(1, opts.steps // 10)}, cosine "
        f"to 0.1x; LoRA rank {opts.rank}, alpha {2 * opts.rank}, targets {opts.targets}, lr {opts.lora_lr:g}; "
        f"full finetune lr {opts.full_lr:g}; AdamW as pretraining (weight decay 0.1, clip 1.0)",
        f"trainable: LoRA {lora_n:,} of {total:,} parameters ({100 * lora_n / total:.3f}%); full finetune all "
        f"{counts['full finetune'][0]:,}",
        "",
        "Held-out loss: every held-out window of the new data (`python -m pretrain evaluate ... --batches 1000`); "
        "'base's data' is the blended held-out loss on the base's own pretraining sources (8 batches each), "
        "i.e. what adapting costs the base. CPU s: the training run (user + system, all threads).",
        "",
        "| base | model | trainable | held-out loss, new data | ppl | held-out loss, base's data | CPU s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Checkpoint sizes on disk (the final checkpoint folder, optimizer state included). A LoRA run's checkpoint "
        "still holds the frozen base weights as well as the adapter; the adapter alone is what "
        "`python -m pretrain export-peft` writes:",
        "",
        "| base | full finetune checkpoint | LoRA checkpoint | LoRA adapter (export-peft) |",
        "|---|---|---|---|",
        *sizes,
        "",
        f"runs and logs: {work}",
    ]
    publish(lines, opts.out)


if __name__ == "__main__":
    main()
