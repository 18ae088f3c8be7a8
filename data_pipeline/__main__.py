"""Command line: `python -m data_pipeline {recipe,prepare,train-tokenizer,tokenize,verify} ...`."""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path
from typing import Iterator

from data_pipeline.config import PipelineConfig, SourceConfig, validate_pipeline
from data_pipeline.configfile import ConfigError, load_structured
from data_pipeline.shards import (
    MANIFEST,
    Manifest,
    ShardError,
    SourceShards,
    atomic_write_bytes,
    source_folders,
    unlisted_files,
)
from data_pipeline.sources import Input, dataset_shards, keep_hub_on
from data_pipeline.tokenize import TokenizeSettings, part_path, source_documents, tokenize_source
from data_pipeline.tokenizer import LLAMA_TRAINER_SPEC, document_lines, file_sha256, train_tokenizer


def source_inputs(source: SourceConfig) -> list[Input]:
    """The units of work of a source: its dataset's shards, or its files with globs expanded in sorted
    order (every pattern must match)."""
    if source.dataset:
        return dataset_shards(source.dataset, source.dataset_config, source.split or "train")
    files: list[Input] = []
    for pattern in source.files:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        missing = [m for m in matches if not Path(m).is_file()]
        if not matches or missing:
            raise ConfigError(f"source '{source.name}': input file not found: {missing[0] if missing else pattern}")
        files += [Path(m) for m in matches]
    return files


def source_spec(source: SourceConfig) -> dict:
    """Where a source's documents come from (and for SFT examples, their template), as recorded beside the
    tokenizer and in manifests."""
    if source.dataset:
        return {"dataset": source.dataset, "dataset_config": source.dataset_config, "split": source.split or "train"}
    if source.format == "sft":
        return {"files": source.files, "format": source.format, "template": source.template}
    return {"files": source.files}


def source_settings(cfg: PipelineConfig, source: SourceConfig) -> TokenizeSettings:
    """How one source's documents become tokens."""
    return TokenizeSettings(
        source=source.name,
        tokenizer_path=cfg.tokenizer.path,
        val_fraction=cfg.tokenize.val_fraction,
        bos=cfg.tokenize.bos,
        eos=cfg.tokenize.eos,
        strict=cfg.tokenize.strict,
        text_field=source.text_field,
        id_field=source.id_field,
        format=source.format,
        template=source.template,
    )


def tokenizer_sample(cfg: PipelineConfig, taken: dict[str, int]) -> Iterator[str]:
    """Text for tokenizer training: each source's share (`weight`) of `tokenizer.sample_bytes`, read
    evenly from its files or dataset shards (each stops contributing at its part of the quota). Bytes
    taken per source are counted into `taken`."""
    total_weight = sum(s.weight for s in cfg.sources)
    for source in cfg.sources:
        inputs = source_inputs(source)
        per_file = cfg.tokenizer.sample_bytes * source.weight / total_weight / len(inputs)
        taken[source.name] = 0
        settings = source_settings(cfg, source)
        for path in inputs:
            used = 0
            for doc in source_documents(path, settings):
                if used >= per_file:
                    break
                if doc.text is not None:
                    used += len(doc.text.encode())
                    yield doc.text
            taken[source.name] += used


def cmd_train_tokenizer(cfg: PipelineConfig) -> None:
    """Train the tokenizer on a weighted sample of every source; record its sha256 and sample beside it."""
    t0 = time.time()
    taken: dict[str, int] = {}
    sha = train_tokenizer(
        document_lines(tokenizer_sample(cfg, taken)),
        cfg.tokenizer.path,
        cfg.tokenizer.vocab_size,
        cfg.tokenizer.max_sentences,
    )
    record = {
        "sha256": sha,
        "vocab_size": cfg.tokenizer.vocab_size,
        "trainer_spec": LLAMA_TRAINER_SPEC,
        "sample_bytes": taken,
        "sources": {s.name: s.files or source_spec(s) for s in cfg.sources},
    }
    atomic_write_bytes(Path(cfg.tokenizer.path).with_suffix(".json"), json.dumps(record, indent=2).encode())
    mb = ", ".join(f"{name} {n / 1e6:.1f} MB" for name, n in taken.items())
    print(
        f"tokenizer: {cfg.tokenizer.path} (vocab {cfg.tokenizer.vocab_size}, sha256 {sha[:12]}...) "
        f"from {mb} in {time.time() - t0:.1f}s"
    )


def cmd_tokenize(cfg: PipelineConfig, force: bool = False, machine: tuple[int, int] = (0, 1)) -> None:
    """Tokenize every source into shards; files already done are skipped, so a rerun resumes."""
    rows = []
    for source in cfg.sources:
        out = Path(cfg.tokenize.output) / source.name
        inputs = source_inputs(source)
        if force:
            for i in range(machine[0], len(inputs), machine[1]):
                part_path(out, i).unlink(missing_ok=True)
            (out / "manifest.json").unlink(missing_ok=True)
        settings = source_settings(cfg, source)
        t0 = time.time()
        stats = tokenize_source(
            inputs,
            out,
            settings,
            cfg.tokenize.workers,
            machine,
            progress=True,
            config={"source": source.name, **source_spec(source), "tokenize": vars(cfg.tokenize)},
        )
        if stats is None:
            print(f"{source.name}: this machine's files are done; other machines' are not yet (no manifest)")
            continue
        rows.append((source.name, stats, time.time() - t0))
        for reason, examples in stats.examples.items():
            print(f"{source.name}: dropped {stats.dropped[reason]} ({reason}), e.g. {', '.join(examples)}")
    print(
        f"\n{'source':<16}{'docs in':>9}{'train docs':>11}{'val docs':>9}{'train tokens':>14}"
        f"{'val tokens':>12}{'MB in':>8}{'dropped':>9}{'s':>7}"
    )
    for name, st, secs in rows:
        docs, tokens = st.documents_written, st.tokens_written
        print(
            f"{name:<16}{st.documents_in:>9}{docs['train']:>11}{docs['val']:>9}{tokens['train']:>14}"
            f"{tokens['val']:>12}{st.bytes_in / 1e6:>8.2f}{sum(st.dropped.values()):>9}{secs:>7.1f}"
        )
    print(f"\ntoken shards: {cfg.tokenize.output}")
    print(
        "train on them: python -m pretrain train configs/experiments/debug.yaml "
        f"data.root={cfg.tokenize.output} data.tokenizer={cfg.tokenizer.path}"
    )


def parse_machine(text: str) -> tuple[int, int]:
    """`k/K` -> (k, K), machine k of K (0-based)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--machine {text}: expected k/K, e.g. 0/4") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--machine {text}: need 0 <= k < K")
    return k, n


def cmd_recipe(args: argparse.Namespace) -> int:
    """The recipe here or on Ray (the report printed), one stage's slice (`--stage`), or a Slurm chain."""
    from data_pipeline.raw import slurm
    from data_pipeline.raw.executors import SlurmSlice
    from data_pipeline.raw.recipe import (
        RecipeConfig,
        absolute_paths,
        format_reports,
        next_steps,
        validate_recipe,
        write_pipeline_config,
    )
    from data_pipeline.raw.runner import run_recipe, run_stage
    from data_pipeline.raw.stages import STAGES

    if args.list_stages:
        print("\n".join(STAGES))
        return 0
    overrides = args.overrides + (["strict=true"] if args.strict else [])
    cfg = absolute_paths(load_structured(RecipeConfig, args.config, overrides))  # tasks may run elsewhere
    validate_recipe(cfg)
    if args.stage:
        executor = SlurmSlice(*args.machine, workers=cfg.workers)
        try:
            run_stage(cfg, args.stage, executor)
        finally:
            executor.close()
        return 0
    if cfg.executor == "slurm":
        jobs = slurm.submit(args.config, overrides, cfg.machines, len(cfg.sources))
        print(f"submitted {len(jobs)} stages as Slurm arrays, each after the one before: jobs {' '.join(jobs)}")
        print(f"when job {jobs[-1]} has ended:")
    else:
        print(format_reports(run_recipe(cfg)), end="")
    print(next_steps(cfg, write_pipeline_config(cfg)), end="")
    return 0


def cmd_verify(root: Path, tokenizer: str | None) -> None:
    """Check every source folder under `root` (or `root` itself, a source folder) against its manifest:
    every listed shard's size and sha256, the tokenizer, no shard file left out of the list. A folder
    of shards without a manifest, or none at all, is refused. Every problem is printed, then counted
    in the error raised."""
    sha = file_sha256(tokenizer) if tokenizer else None
    folders = [root] if (root / MANIFEST).is_file() else source_folders(root)
    problems = []
    for folder in folders:
        try:
            unlisted = unlisted_files(folder, Manifest.load(folder))
            if unlisted:
                raise ShardError(
                    f"{', '.join(map(str, unlisted))}: not listed in {folder / MANIFEST} (an entry removed, or "
                    "left from another run); retokenize the source with --force, or remove the files"
                )
            for split in ("train", "val"):
                shards = SourceShards(folder, split, sha, verify_checksum=True)
                print(f"{folder.name}/{split}: {len(shards.shards)} shards, {shards.n_tokens} tokens OK")
        except ShardError as e:
            print(f"error: {e}", file=sys.stderr)
            problems.append(e)
    if problems:
        raise ShardError(f"{len(problems)} of {len(folders)} source folders under {root} failed verification")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m data_pipeline` and `llama-data`."""
    from data_pipeline.confighelp import config_help

    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    keys = config_help(PipelineConfig)
    for name, text in (
        ("prepare", "train the tokenizer if missing, then tokenize every source"),
        ("train-tokenizer", "train the SentencePiece tokenizer"),
        ("tokenize", "tokenize every source into token shards"),
    ):
        p = sub.add_parser(
            name, help=text, description=text, epilog=keys, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.add_argument("config", help="a pipeline YAML, e.g. configs/pipeline/sample.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides (keys below)")
        p.add_argument("--force", action="store_true", help="redo work that is already done")
        p.add_argument("--strict", action="store_true", help="stop at the first bad record (tokenize.strict=true)")
        p.add_argument(
            "--machine",
            type=parse_machine,
            default=(0, 1),
            metavar="k/K",
            help="tokenize only input files (or dataset shards) i with i %% K == k (machine k of K)",
        )
    p = sub.add_parser("recipe", help="raw dumps (WARC, Wikipedia XML, books, LaTeX, code, Posts.xml) -> clean docs")
    p.add_argument("config", help="a recipe YAML, e.g. configs/recipe/sample.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. workers=8 output=data/clean")
    p.add_argument("--strict", action="store_true", help="stop at the first damaged input (strict=true)")
    p.add_argument("--stage", help="run only this stage (what a Slurm array task does); see --list-stages")
    p.add_argument(
        "--machine", type=parse_machine, default=(0, 1), metavar="k/K", help="with --stage: its tasks i %% K == k"
    )
    p.add_argument("--list-stages", action="store_true", help="print the stages in order and stop")
    p = sub.add_parser("verify", help="check token shards against their manifests")
    p.add_argument("root", type=Path)
    p.add_argument("--tokenizer", help="also check the shards were made with this tokenizer")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            cmd_verify(args.root, args.tokenizer)
            return 0
        if args.command == "recipe":
            return cmd_recipe(args)
        overrides = args.overrides + (["tokenize.strict=true"] if args.strict else [])
        cfg: PipelineConfig = load_structured(PipelineConfig, args.config, overrides)
        validate_pipeline(cfg)
        if any(s.dataset and not Path(s.dataset).exists() for s in cfg.sources):
            keep_hub_on()
        if args.command == "train-tokenizer" or (
            args.command == "prepare" and (args.force or not Path(cfg.tokenizer.path).is_file())
        ):
            cmd_train_tokenizer(cfg)
        elif args.command == "prepare":
            print(f"tokenizer: {cfg.tokenizer.path} exists, kept (--force to retrain)")
        if args.command in ("prepare", "tokenize"):
            cmd_tokenize(cfg, args.force, args.machine)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, ShardError, DataError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
