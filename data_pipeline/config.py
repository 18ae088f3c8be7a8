"""Typed schema of a data-preparation config (`configs/pipeline/*.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from data_pipeline.configfile import ConfigError
from data_pipeline.sft import TEMPLATES


@dataclass
class SourceConfig:
    """One source: a name and either its files (globs allowed: .jsonl[.gz|.zst], .parquet or .txt, one
    book) or a Hugging Face dataset (a hub name, or a local folder `datasets.load_dataset` reads)."""

    name: str = MISSING
    files: List[str] = field(default_factory=list)
    dataset: Optional[str] = None  # e.g. wikimedia/wikipedia, streamed; its data files are the units of work
    dataset_config: Optional[str] = None  # load_dataset's `name`, e.g. 20231101.en
    split: Optional[str] = None  # of the dataset (default train)
    text_field: str = "text"
    id_field: str = "id"  # records without it are named by file:line (or dataset shard:row)
    weight: float = 1.0  # share of the tokenizer's training sample
    format: str = "text"  # text | sft: {prompt, response} or {messages} JSONL records, loss on the responses only
    template: Optional[str] = None  # format=sft: the chat template, llama2 | alpaca


@dataclass
class TokenizerTrainConfig:
    """Where the SentencePiece model goes and how big it is (the rest is LLaMA's spec)."""

    path: str = "data/tokenizer/tokenizer.model"
    vocab_size: int = 32000
    sample_bytes: int = 1_000_000_000  # text read for training, split across sources by `weight`
    max_sentences: int = 10_000_000  # lines sampled by the trainer


@dataclass
class TokenizeConfig:
    """Where token shards go and how documents are written."""

    output: str = "data/tokens/default"  # one sub-folder per source
    val_fraction: float = 0.01  # documents held out for validation, by a hash of their id
    bos: bool = True
    eos: bool = True
    strict: bool = False  # stop at the first bad record instead of counting it
    workers: int = 1  # processes, each tokenizing whole input files


@dataclass
class PipelineConfig:
    """Sources -> tokenizer -> token shards."""

    sources: List[SourceConfig] = field(default_factory=list)
    tokenizer: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)


def check_source_names(sources: list) -> None:
    """At least one source, and no two with the same `name` (their output folders)."""
    if not sources:
        raise ConfigError("sources: at least one source is needed")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"sources: duplicate source names in {names}")


def check_format(cfg: PipelineConfig, i: int) -> None:
    """`sources[i].format` and `template`: a known format; SFT examples from files, with a known template,
    framed by BOS and EOS."""
    s = cfg.sources[i]
    if s.format not in ("text", "sft"):
        raise ConfigError(f"sources[{i}].format: '{s.format}' is not one of text, sft")
    if s.format == "text":
        if s.template is not None:
            raise ConfigError(f"sources[{i}].template: only for format=sft, and '{s.name}' is format=text")
        return
    if s.template not in TEMPLATES:
        raise ConfigError(f"sources[{i}].template: format=sft needs one of {' | '.join(TEMPLATES)}, got {s.template}")
    if s.dataset:
        raise ConfigError(f"sources[{i}].dataset: format=sft reads JSONL files; give '{s.name}' files instead")
    if not (cfg.tokenize.bos and cfg.tokenize.eos):
        raise ConfigError(f"tokenize.bos/eos: source '{s.name}' is format=sft, its examples BOS ... EOS; keep both")


def validate_pipeline(cfg: PipelineConfig) -> None:
    """Check values the types cannot; raise ConfigError naming the key."""
    check_source_names(cfg.sources)
    for i, s in enumerate(cfg.sources):
        if s.files and s.dataset:
            raise ConfigError(f"sources[{i}].dataset: source '{s.name}' has files too; give one of files or dataset")
        if not s.files and not s.dataset:
            raise ConfigError(f"sources[{i}].files: no input files (nor a dataset) for source '{s.name}'")
        for key in ("dataset_config", "split"):
            if s.files and getattr(s, key) is not None:
                raise ConfigError(f"sources[{i}].{key}: only for a dataset source, and '{s.name}' has files")
        check_format(cfg, i)
    if cfg.tokenizer.vocab_size < 259 + 3:  # 256 byte-fallback pieces + unk/bos/eos
        raise ConfigError(f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} is too small (byte fallback needs 259+)")
    bad = [s.name for s in cfg.sources if not s.weight > 0]
    if bad:
        raise ConfigError(f"sources: weight must be positive for {bad}")
    if cfg.tokenize.workers < 1:
        raise ConfigError(f"tokenize.workers must be >= 1, got {cfg.tokenize.workers}")
    if not 0.0 <= cfg.tokenize.val_fraction < 1.0:
        raise ConfigError(f"tokenize.val_fraction must be in [0, 1), got {cfg.tokenize.val_fraction}")
