"""Export any checkpoint (single, FSDP, DeepSpeed ZeRO) to a Hugging Face `LlamaForCausalLM` folder.

The folder holds `model.safetensors` (or shards of at most `shard_gb` with `model.safetensors.index.json`),
`config.json`, `generation_config.json` and, given our SentencePiece model, `tokenizer.model` with
`tokenizer_config.json` and `special_tokens_map.json`. Weights go through `consolidate` (full tensors
with Meta's names) and `hf.to_hf_state_dict` (Hugging Face's names, q/k rows permuted to its rotary
layout). Writing needs only `safetensors`; loading it needs `transformers`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pretrain.consolidate import DTYPES, checkpoint_config, consolidated_state_dict
from pretrain.hf import hf_config_dict, to_hf_state_dict
from pretrain.model import ModelArgs


def tokenizer_json(model_file: str | os.PathLike) -> dict:
    """A Hugging Face `tokenizer.json` that tokenizes as our SentencePiece BPE model does, id for id.

    SentencePiece adds "▁" in front of the text and turns every space into "▁" (our models keep
    whitespace as is: no extra-space removal, identity normalisation), then merges adjacent pieces,
    the highest-scoring merged piece first, falling back to byte pieces for unknown characters. The
    same as a `tokenizers` BPE: that normaliser, no pre-tokeniser (transformers 5's LlamaTokenizer
    instead splits with a Metaspace that adds no "▁" before a leading space), one merge for every
    way a piece splits into two pieces, ranked by the piece's score.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(f"{model_file}: a {proto.trainer_spec.model_type} model; only BPE (LLaMA's) is exported")
    normalizer = proto.normalizer_spec
    if normalizer.name != "identity" or normalizer.remove_extra_whitespaces or not normalizer.add_dummy_prefix:
        raise ValueError(
            f"{model_file}: normalisation {normalizer.name!r} (remove_extra_whitespaces="
            f"{normalizer.remove_extra_whitespaces}, add_dummy_prefix={normalizer.add_dummy_prefix}); "
            "only LLaMA's (identity, whitespace kept, dummy prefix) is exported"
        )
    piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    mergeable = {p.piece for p in proto.pieces if p.type in (piece.NORMAL, piece.USER_DEFINED)}
    merges = []
    for p in proto.pieces:
        if p.type != piece.NORMAL:
            continue
        splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))]
        splits = [(a, b) for a, b in splits if a in mergeable and b in mergeable]
        merges += [(-p.score, vocab[a], vocab[b], a, b) for a, b in splits]
    merges.sort()
    special = {piece.CONTROL, piece.UNKNOWN}
    added = [
        {
            "id": i,
            "content": p.piece,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": p.type not in special,
            "special": p.type in special,
        }
        for i, p in enumerate(proto.pieces)
        if p.type in special or p.type == piece.USER_DEFINED
    ]
    bos = proto.pieces[proto.trainer_spec.bos_id].piece
    space = "\u2581"
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": space},
                {"type": "Replace", "pattern": {"String": " "}, "content": space},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": space}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": proto.pieces[proto.trainer_spec.unk_id].piece,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[a, b] for *_, a, b in merges],
        },
    }


def umask_file_mode() -> int:
    """The mode `open` gives a new file under this process's umask (0o644 under 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def export_hf(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "bf16",
    shard_gb: float = 5.0,
    merge: bool = False,
) -> Path:
    """Write checkpoint folder `checkpoint` as a Hugging Face folder `output`; return `output`. The base weights
    of a run with an adapter (`peft.method`), or with `merge` its LoRA folded into them."""
    from safetensors.torch import save_file

    checkpoint, output = Path(checkpoint), Path(output)
    saved = checkpoint_config(checkpoint)
    args = ModelArgs(**saved["model"])
    weights = consolidated_state_dict(checkpoint)
    if merge:
        from pretrain.adapters import merge_lora
        from pretrain.config import PeftConfig

        weights = merge_lora(weights, PeftConfig(**saved.get("peft", {})))
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in to_hf_state_dict(weights, args).items()}
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_gb * 1e9:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / filename, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, filename))
        total = sum(t.numel() * t.element_size() for t in state.values())
        _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    bos_id, eos_id = 1, 2  # SentencePiece's LLaMA ids, unless the tokenizer says otherwise
    if tokenizer is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        bos_id, eos_id = sp.bos_id(), sp.eos_id()
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        special = {
            "bos_token": sp.id_to_piece(bos_id),
            "eos_token": sp.id_to_piece(eos_id),
            "unk_token": sp.id_to_piece(sp.unk_id()),
        }
        _write_json(tmp / "special_tokens_map.json", special)
        _write_json(tmp / "tokenizer.json", tokenizer_json(tokenizer))
        _write_json(
            tmp / "tokenizer_config.json",
            {
                # tokenizer.json as written (LlamaTokenizer would rebuild its own pre-tokeniser)
                "tokenizer_class": "PreTrainedTokenizerFast",
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": args.max_seq_len,
                **special,
            },
        )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **hf_config_dict(args),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(DTYPES[dtype]).removeprefix("torch."),
        "use_cache": True,
    }
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False})
    for path in tmp.iterdir():  # safetensors writes its files 0600 whatever the umask: teammates could not read them
        path.chmod(umask_file_mode())
    shutil.rmtree(output, ignore_errors=True)
    os.replace(tmp, output)
    return output
