"""Command line: `python -m data_pipeline {prepare,train-tokenizer,tokenize,verify} ...`."""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

from data_pipeline.config import PipelineConfig, SourceConfig, validate_pipeline
from data_pipeline.shards import Manifest, SourceShards
from data_pipeline.tokenize import read_jsonl, tokenize_source
from data_pipeline.tokenizer import Tokenizer, document_lines, file_sha256, train_tokenizer
from pretrain.config import ConfigError, load_structured


def source_files(source: SourceConfig) -> list[Path]:
    """The input files of a source, globs expanded in sorted order; every pattern must match."""
    files: list[Path] = []
    for pattern in source.files:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        missing = [m for m in matches if not Path(m).is_file()]
        if not matches or missing:
            raise ConfigError(f"source '{source.name}': input file not found: {missing[0] if missing else pattern}")
        files += [Path(m) for m in matches]
    return files


def cmd_train_tokenizer(cfg: PipelineConfig) -> None:
    """Train the tokenizer on the lines of every source's documents."""

    def texts():
        for source in cfg.sources:
            for path in source_files(source):
                for doc in read_jsonl(path, source.text_field):
                    if doc.text is not None:
                        yield doc.text

    t0 = time.time()
    sha = train_tokenizer(
        document_lines(texts()), cfg.tokenizer.path, cfg.tokenizer.vocab_size, cfg.tokenizer.max_sentences
    )
    print(
        f"tokenizer: {cfg.tokenizer.path} (vocab {cfg.tokenizer.vocab_size}, sha256 {sha[:12]}...) "
        f"in {time.time() - t0:.1f}s"
    )


def cmd_tokenize(cfg: PipelineConfig, force: bool = False) -> None:
    """Tokenize every source into shards; a source whose manifest matches the tokenizer is skipped."""
    tokenizer = Tokenizer(cfg.tokenizer.path)
    rows = []
    for source in cfg.sources:
        out = Path(cfg.tokenize.output) / source.name
        inputs = source_files(source)
        if not force and (out / "manifest.json").is_file():
            manifest = Manifest.load(out)
            done_inputs = [i for s in manifest.shards for i in s.inputs]
            if manifest.tokenizer_sha256 == tokenizer.sha256 and set(done_inputs) == set(map(str, inputs)):
                print(f"{source.name}: already tokenized in {out}, skipped (--force to redo)")
                st = manifest.stats
                rows.append(
                    (
                        source.name,
                        st["documents_in"],
                        st["documents_written"],
                        st["tokens_written"],
                        st["bytes_in"],
                        st["dropped"],
                        0.0,
                    )
                )
                continue
        t0 = time.time()
        stats = tokenize_source(
            source.name,
            inputs,
            out,
            tokenizer,
            cfg.tokenize.val_fraction,
            cfg.tokenize.bos,
            cfg.tokenize.eos,
            cfg.tokenize.strict,
            source.text_field,
            config={"source": source.name, "files": source.files, "tokenize": vars(cfg.tokenize)},
        )
        rows.append(
            (
                source.name,
                stats.documents_in,
                stats.documents_written,
                stats.tokens_written,
                stats.bytes_in,
                dict(stats.dropped),
                time.time() - t0,
            )
        )
        for reason, examples in stats.examples.items():
            print(f"{source.name}: dropped {stats.dropped[reason]} ({reason}), e.g. {', '.join(examples)}")
    print(
        f"\n{'source':<16}{'docs in':>9}{'train docs':>11}{'val docs':>9}{'train tokens':>14}"
        f"{'val tokens':>12}{'MB in':>8}{'dropped':>9}{'s':>6}"
    )
    for name, n_in, docs, tokens, nbytes, dropped, secs in rows:
        print(
            f"{name:<16}{n_in:>9}{docs['train']:>11}{docs['val']:>9}{tokens['train']:>14}{tokens['val']:>12}"
            f"{nbytes / 1e6:>8.2f}{sum(dropped.values()):>9}{secs:>6.1f}"
        )
    print(f"\ntoken shards: {cfg.tokenize.output}")


def cmd_verify(root: Path, tokenizer: str | None) -> None:
    """Check every shard under `root` against its manifest (sizes and sha256) and the tokenizer."""
    sha = file_sha256(tokenizer) if tokenizer else None
    for folder in sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()):
        for split in ("train", "val"):
            shards = SourceShards(folder, split, sha, verify_checksum=True)
            print(f"{folder.name}/{split}: {len(shards.shards)} shards, {shards.n_tokens} tokens OK")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m data_pipeline` and `llama-data`."""
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("prepare", "train the tokenizer if missing, then tokenize every source"),
        ("train-tokenizer", "train the SentencePiece tokenizer"),
        ("tokenize", "tokenize every source into token shards"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="a pipeline YAML, e.g. configs/pipeline/sample.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides")
        p.add_argument("--force", action="store_true", help="redo work that is already done")
    p = sub.add_parser("verify", help="check token shards against their manifests")
    p.add_argument("root", type=Path)
    p.add_argument("--tokenizer", help="also check the shards were made with this tokenizer")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            cmd_verify(args.root, args.tokenizer)
            return 0
        cfg: PipelineConfig = load_structured(PipelineConfig, args.config, args.overrides)
        validate_pipeline(cfg)
        if args.command == "train-tokenizer" or (
            args.command == "prepare" and (args.force or not Path(cfg.tokenizer.path).is_file())
        ):
            cmd_train_tokenizer(cfg)
        elif args.command == "prepare":
            print(f"tokenizer: {cfg.tokenizer.path} exists, kept (--force to retrain)")
        if args.command in ("prepare", "tokenize"):
            cmd_tokenize(cfg, args.force)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, ShardError, DataError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
