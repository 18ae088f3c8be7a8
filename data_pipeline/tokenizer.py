"""SentencePiece BPE tokenizer trained with LLaMA's trainer spec, and its identity (sha256)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

# LLaMA's tokenizer.model trainer_spec (read from Meta's released model), vocab_size aside.
LLAMA_TRAINER_SPEC = dict(
    model_type="bpe",
    character_coverage=0.99995,
    split_digits=True,
    byte_fallback=True,
    split_by_unicode_script=True,
    split_by_number=True,
    split_by_whitespace=True,
    max_sentencepiece_length=16,
    allow_whitespace_only_pieces=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train_tokenizer(
    lines: Iterable[str],
    output: str | os.PathLike,
    vocab_size: int,
    max_sentences: int = 10_000_000,
    seed_sentencepiece_size: int = 1_000_000,
    num_threads: int = os.cpu_count() or 1,
    seed: int = 0,
) -> str:
    """Train a BPE model on `lines` with LLaMA's spec; write `<output>` (.model) and `.vocab`.

    Returns the sha256 of the written model. Lines are sentences as SentencePiece sees them
    (split documents on newlines); at most `max_sentences` are sampled by the trainer.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    prefix = output.with_suffix("")
    tmp_prefix = prefix.with_name(prefix.name + ".tmp")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(tmp_prefix),
            vocab_size=vocab_size,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size,
            max_sentence_length=1 << 16,
            num_threads=num_threads,
            minloglevel=2,
            **LLAMA_TRAINER_SPEC,
        )
    except RuntimeError as e:  # SentencePiece reports bad settings this way; keep its one-line reason
        raise ValueError(f"tokenizer training for {output} failed: {str(e).splitlines()[0]}") from None
    os.replace(f"{tmp_prefix}.vocab", prefix.with_suffix(".vocab"))
    os.replace(f"{tmp_prefix}.model", prefix.with_suffix(".model"))
    return file_sha256(prefix.with_suffix(".model"))


class Tokenizer:
    """A loaded SentencePiece model: encode/decode with LLaMA's special ids (unk 0, bos 1, eos 2)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self.sha256 = file_sha256(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of one text, optionally framed by BOS/EOS."""
        return ([self.bos_id] if bos else []) + self.sp.encode(text) + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of many texts (SentencePiece's own threads)."""
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""
        return self.sp.decode(ids)


def document_lines(texts: Iterable[str]) -> Iterator[str]:
    """The non-empty lines of each text: the sentences SentencePiece trains on."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line
