"""`import`: a Hugging Face LLaMA folder, or Meta's `consolidated.*.pth` + `params.json`, -> our weights.

The output is a checkpoint folder of ours holding the model only: `dcp/` (torch.distributed.checkpoint,
so any strategy and number of ranks can read it), `trainer.pt` (the model section and where it came
from), `model.yaml` (that model section, to put in an experiment's `defaults:`) and the source's
`tokenizer.model` when it has one. A new run starts from it with `train.init_from=<folder>`;
`export-hf`, `consolidate` and `generate` read it like any checkpoint.

Hugging Face's q/k rows are permuted back to Meta's rotary layout (`hf.from_hf_state_dict`). Meta's
model-parallel files (13B: 2, 33B: 4, 65B/70B: 8) are joined along the dimension each was split on,
found by comparing the file's shape with the full one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from pretrain.checkpoint_layout import DCP_DIR, dcp_without_process_group
from pretrain.consolidate import DTYPES
from pretrain.hf import ConversionError, from_hf_state_dict, hf_model_args
from pretrain.model import ModelArgs, param_shapes


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: {e}") from None


def read_hf(folder: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Model section and Meta-named tensors of a Hugging Face LLaMA folder (safetensors or .bin)."""
    args = hf_model_args(_read_json(folder / "config.json"), folder / "config.json")
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            part = load_file(str(file))
        else:
            part = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        state.update(part)
    state.pop("model.rotary_emb.inv_freq", None)  # older exports kept this buffer
    for i in range(args.n_layers):
        state.pop(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", None)
    try:
        return args, from_hf_state_dict(state, args)
    except KeyError as e:
        raise ConversionError(f"{folder}: no tensor {e.args[0]} in {', '.join(f.name for f in files)}") from None


def meta_model_args(params: dict, path: Path, vocab_size: int, max_seq_len: int) -> ModelArgs:
    """Our model section from Meta's `params.json` (vocab_size -1 there: taken from the embedding)."""
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier"}
    known |= {"norm_eps", "rope_theta", "max_batch_size", "max_seq_len", "use_scaled_rope"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConversionError(f"{path}: unknown keys {unknown}")
    if params.get("use_scaled_rope"):
        raise ConversionError(f"{path}: use_scaled_rope (LLaMA-3.1's RoPE scaling) is not supported")
    try:
        return ModelArgs(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=params["vocab_size"] if params.get("vocab_size", -1) > 0 else vocab_size,
            multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=params.get("norm_eps", 1e-6),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            max_seq_len=max_seq_len,
        )
    except KeyError as e:
        raise ConversionError(f"{path}: no {e.args[0]!r}") from None


def read_meta(folder: Path, max_seq_len: int) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Model section and tensors of Meta's release layout, its model-parallel files joined."""
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise ConversionError(f"{folder}: no consolidated.*.pth")
    parts = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
    for part in parts:
        part.pop("rope.freqs", None)  # LLaMA-1 saved its RoPE table; we compute ours
    if "tok_embeddings.weight" not in parts[0]:
        raise ConversionError(f"{files[0]}: no tok_embeddings.weight")
    vocab = parts[0]["tok_embeddings.weight"].shape[0]
    args = meta_model_args(_read_json(folder / "params.json"), folder / "params.json", vocab, max_seq_len)
    shapes = param_shapes(args)
    for file, part in zip(files, parts):
        if set(part) != set(shapes):
            extra, missing = sorted(set(part) - set(shapes)), sorted(set(shapes) - set(part))
            raise ConversionError(f"{file}: unexpected {extra[:5]}, missing {missing[:5]} for params.json's model")
    state = {}
    for name, shape in shapes.items():
        pieces = [part[name] for part in parts]
        split = [d for d, n in enumerate(pieces[0].shape) if n != shape[d]]
        if not split:  # replicated (the norms): every file holds all of it
            state[name] = pieces[0]
        elif len(split) == 1 and sum(p.shape[split[0]] for p in pieces) == shape[split[0]]:
            state[name] = torch.cat(pieces, dim=split[0])
        else:
            raise ConversionError(
                f"{folder}: {name} is {tuple(pieces[0].shape)} in {files[0].name}, which does not join "
                f"({len(files)} files) into {shape} of params.json's model"
            )
    return args, state


def import_weights(
    source: str | os.PathLike, output: str | os.PathLike, dtype: str = "fp32", max_seq_len: int = 2048
) -> Path:
    """Write the model of `source` (a Hugging Face or Meta folder) as a weights-only checkpoint `output`."""
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf

    from pretrain.checkpoint import code_version, fsync_tree

    source, output = Path(source), Path(output)
    if (source / "config.json").is_file():
        args, state = read_hf(source)
        tokenizer = source / "tokenizer.model"
    elif (source / "params.json").is_file():
        args, state = read_meta(source, max_seq_len)
        tokenizer = source / "tokenizer.model"
        if not tokenizer.is_file():  # Meta's releases keep it one folder up
            tokenizer = source.parent / "tokenizer.model"
    else:
        raise ConversionError(f"{source}: neither a Hugging Face folder (config.json) nor Meta's (params.json)")
    shapes = param_shapes(args)
    wrong = [f"{n} {tuple(state[n].shape)} (config: {s})" for n, s in shapes.items() if tuple(state[n].shape) != s]
    if wrong:
        raise ConversionError(f"{source}: tensors do not match its config: {', '.join(wrong[:5])}")
    state = {name: state[name].to(DTYPES[dtype]).contiguous() for name in shapes}
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with dcp_without_process_group():
        dcp.save({"model": state}, checkpoint_id=str(tmp / DCP_DIR))
    model = dataclasses.asdict(args)
    torch.save(
        {"config": {"model": model}, "step": 0, "imported_from": str(source), "code_version": code_version()},
        tmp / "trainer.pt",
    )
    (tmp / "model.yaml").write_text(f"# imported from {source}\n" + OmegaConf.to_yaml({"model": model}))
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    fsync_tree(tmp)
    shutil.rmtree(output, ignore_errors=True)
    os.replace(tmp, output)
    return output
