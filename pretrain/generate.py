"""`generate`: a quick sample from any checkpoint, greedy or nucleus (top-p), to eyeball a run.

The prompt goes through the model once (prefill), filling a key/value cache (`model.KVCache`);
each new token then costs one token's forward. `use_cache=False` runs the whole sequence again for
each new token instead: slower, kept to check the cache against. Past `model.max_seq_len` tokens
both look at the last `max_seq_len` only (a sliding window, each step a full forward).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

from pretrain.model import KVCache, ModelArgs, Transformer, build_model


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token id per row of `logits` (batch, vocab): the argmax at temperature 0, else a draw
    from the smallest set of most likely tokens whose probability reaches `top_p`."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above each one
    sorted_probs[before >= top_p] = 0.0  # the first token always stays
    choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator).to(order.device)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def sample(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: Optional[int] = None,
    use_cache: bool = True,
) -> list[int]:
    """The prompt's continuation: up to `max_new_tokens` ids, stopping after `eos_id`.

    With `use_cache` the prompt is run once and each new token alone (a key/value cache); without,
    the whole sequence for every token. Both give the same tokens (the same draws for a seed). A prompt-
    or prefix-tuned model runs without the cache (its virtual positions come in through `forward`).
    """
    if not 0 < top_p <= 1 or temperature < 0:
        raise ValueError(f"top_p must be in (0, 1] and temperature >= 0, got top_p={top_p}, temperature={temperature}")
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's BOS)")
    device = next(model.parameters()).device
    virtual = virtual_positions(model)
    window = model.args.max_seq_len - virtual
    use_cache = use_cache and not virtual  # the cached forward knows no virtual positions: the whole sequence
    tokens = torch.tensor([prompt], device=device)
    cache = KVCache(model.args.n_layers, min(window, len(prompt) + max_new_tokens)) if use_cache else None
    cached = 0  # tokens whose keys and values are in the cache
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(max_new_tokens):
        if cache is not None and tokens.shape[1] <= window:  # prefill the prompt, then one token at a time
            logits = model.forward_cached(tokens[:, cached:], cache, cached)[:, -1]
            cached = tokens.shape[1]
        else:  # no cache, or past max_seq_len: the last max_seq_len tokens again
            logits = model(tokens[:, -window:])[:, -1]
        token = next_token(logits, temperature, top_p, generator)
        out.append(int(token))
        if out[-1] == eos_id:
            break
        tokens = torch.cat([tokens, token[:, None]], dim=1)
    return out


def continuation_text(decode: Callable[[list[int]], str], prompt: list[int], new: list[int]) -> str:
    """The text the new tokens add to the prompt's: decoded with the prompt, since a piece's leading
    space (SentencePiece's "▁") is dropped at the start of a decode."""
    before, after = decode(prompt), decode(prompt + new)
    return after[len(before) :] if after.startswith(before) else decode(new)


def whitespace_note(text: str) -> Optional[str]:
    """A note when `text` is, or ends in, a run of whitespace of 4 or more characters: a terminal shows
    it as blank lines or nothing, and a reader may take it for a bug of the decoding."""
    body = text.rstrip()
    tail = text[len(body) :]
    if len(tail) < 4:
        return None
    names = {"\n": "newlines", " ": "spaces", "\t": "tabs"}
    counts = ", ".join(f"{tail.count(c)} {name}" for c, name in names.items() if tail.count(c))
    where = "is only whitespace" if not body else "ends in whitespace"
    return f"the continuation {where} ({counts or f'{len(tail)} characters'})"


def virtual_positions(model: Transformer) -> int:
    """How many positions a prompt- or prefix-tuned model's adapter puts in front of every sequence (0 without)."""
    from pretrain.adapters import PrefixKeyValues, VirtualTokenEmbedding

    adapters = [m for m in model.modules() if isinstance(m, (PrefixKeyValues, VirtualTokenEmbedding))]
    return adapters[0].n if adapters else 0


def load_for_inference(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> Transformer:
    """The fp32 model of a checkpoint folder of any strategy (or an `import` folder), in eval mode; the
    adapter of a `peft.method` run applied, with its trained weights, on the base NF4-quantized again when
    the run's was (`peft.quantize=nf4`: quantization is deterministic, the same 4-bit base)."""
    from pretrain.consolidate import WeightReader, checkpoint_config

    config, reader = checkpoint_config(checkpoint), WeightReader(checkpoint)
    model = build_model(ModelArgs(**config["model"]), device, values=reader)
    if config.get("peft", {}).get("method", "none") != "none":
        from pretrain.adapters import load_checkpoint_adapter

        load_checkpoint_adapter(model, config["peft"], reader)
    if config.get("peft", {}).get("quantize", "none") == "nf4":  # QLoRA: the adapter learnt on the NF4 base
        from pretrain.quantize import quantize_nf4

        quantize_nf4(model)
    return model.eval()


def find_tokenizer(checkpoint: Path, given: Optional[Path]) -> Path:
    """The tokenizer: as given, else the folder's own (`import`), else the run's `data.tokenizer`; one
    FileNotFoundError naming the path (and what a relative one was taken relative to) when it is not there."""
    from pretrain.config import away_from_root, path_not_found

    if given is not None:
        if not given.is_file():
            raise FileNotFoundError(path_not_found(f"--tokenizer {given}", given))
        return given
    if (checkpoint / "tokenizer.model").is_file():
        return checkpoint / "tokenizer.model"
    from pretrain.consolidate import checkpoint_config

    configured = checkpoint_config(checkpoint).get("data", {}).get("tokenizer")
    if not configured:
        raise FileNotFoundError(f"{checkpoint}: no tokenizer.model in it and no data.tokenizer; pass --tokenizer")
    path = Path(configured)
    if not path.is_file():
        what = f"{checkpoint}: its run's data.tokenizer={path}"
        raise FileNotFoundError(path_not_found(what, path, away_from_root("pass --tokenizer") or "pass --tokenizer"))
    return path
