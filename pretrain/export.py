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

import torch

from pretrain.consolidate import DTYPES, consolidated_state_dict
from pretrain.hf import to_hf_state_dict
from pretrain.model import ModelArgs


def hf_config_dict(args: ModelArgs, dtype: str, bos_id: int, eos_id: int) -> dict:
    """`config.json` of a `LlamaForCausalLM` with our shapes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": args.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(DTYPES[dtype]).removeprefix("torch."),
        "use_cache": True,
    }


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def export_hf(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "bf16",
    shard_gb: float = 5.0,
) -> Path:
    """Write checkpoint folder `checkpoint` as a Hugging Face folder `output`; return `output`."""
    from safetensors.torch import save_file

    checkpoint, output = Path(checkpoint), Path(output)
    trainer_state = torch.load(checkpoint / "trainer.pt", weights_only=False)
    args = ModelArgs(**trainer_state["config"]["model"])
    state = {
        k: v.to(DTYPES[dtype]).contiguous()
        for k, v in to_hf_state_dict(consolidated_state_dict(checkpoint), args).items()
    }
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
        _write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "model_max_length": args.max_seq_len,
                **special,
            },
        )
    _write_json(tmp / "config.json", hf_config_dict(args, dtype, bos_id, eos_id))
    _write_json(tmp / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False})
    shutil.rmtree(output, ignore_errors=True)
    os.replace(tmp, output)
    return output
