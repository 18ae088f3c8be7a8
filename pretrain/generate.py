"""`generate`: a quick sample from any checkpoint, greedy or nucleus (top-p), to eyeball a run.

The whole sequence is run again for each new token (no key/value cache): simple and exact, and quick
enough for the short samples this is for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from pretrain.model import ModelArgs, Transformer, build_model


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
) -> list[int]:
    """The prompt's continuation: up to `max_new_tokens` ids, stopping after `eos_id`."""
    if not 0 < top_p <= 1 or temperature < 0:
        raise ValueError(f"top_p must be in (0, 1] and temperature >= 0, got top_p={top_p}, temperature={temperature}")
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], device=device)
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.args.max_seq_len :])[:, -1]
        token = next_token(logits, temperature, top_p, generator)
        out.append(int(token))
        if out[-1] == eos_id:
            break
        tokens = torch.cat([tokens, token[:, None]], dim=1)
    return out


def load_for_inference(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> Transformer:
    """The fp32 model of a checkpoint folder of any strategy (or an `import` folder), in eval mode."""
    from pretrain.consolidate import WeightReader, checkpoint_config

    args = ModelArgs(**checkpoint_config(checkpoint)["model"])
    return build_model(args, device, values=WeightReader(checkpoint)).eval()


def find_tokenizer(checkpoint: Path, given: Optional[Path]) -> Path:
    """The tokenizer: as given, else the folder's own (`import`), else the run's `data.tokenizer`."""
    if given is not None:
        return given
    if (checkpoint / "tokenizer.model").is_file():
        return checkpoint / "tokenizer.model"
    from pretrain.consolidate import checkpoint_config

    path = Path(checkpoint_config(checkpoint).get("data", {}).get("tokenizer", ""))
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: its tokenizer {path} is not here; pass --tokenizer")
    return path
