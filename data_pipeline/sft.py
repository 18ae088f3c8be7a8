"""Supervised finetuning (SFT) examples: records rendered by a chat template into pieces that are trained
on (the responses) or not (everything else), then tokens with a per-token loss mask.

Records, one JSON object per line of a JSONL file (optionally .gz/.zst):
- `{"prompt": str, "response": str}`, optionally with `"system": str`: one exchange;
- `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`: a conversation, an
  optional system message first, then user and assistant turns alternating, ending with an assistant's.
The source's `id_field` names an example (for the validation split), else its `file:line` does.

Templates (`sources[i].template`):
- `llama2`: Meta's Llama 2 chat format, as its `chat_completion` builds it: each exchange is
  `<s>[INST] {user} [/INST] {answer} </s>`, a system message wrapped in `<<SYS>>\\n...\\n<</SYS>>\\n\\n`
  in front of the first user message;
- `alpaca`: Stanford Alpaca's prompt, `Below is an instruction ... \\n\\n### Instruction:\\n{user}\\n\\n
  ### Response:\\n{answer}</s>` (a system message replaces the first line), framed by `<s>`.

Each example is one document, `BOS ... EOS`. The loss mask is 1 on the tokens of every assistant turn and
the EOS that ends it, 0 on everything else (BOS, system, user and template text). Each piece is encoded
on its own, as Meta's chat code encodes turn by turn, so no token straddles prompt and response.

A record that does not fit (bad JSON, not UTF-8, neither prompt/response nor messages, an unknown role,
a content that is not a string, no assistant turn, turns out of order) is a `DataError` naming the file
and line, never skipped: an SFT set is curated, and a bad record means the file is not what the template
expects.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from data_pipeline.sources import DataError, Document, encodable, jsonl_records


class Special(enum.Enum):
    """A special token a template places: BOS or EOS (their ids come from the tokenizer)."""

    bos = "bos"
    eos = "eos"


Segment = tuple[Union[str, Special], bool]  # (text or a special token, whether its tokens count in the loss)
Exchange = tuple[str, str]  # (user message, assistant answer)

ROLES = ("system", "user", "assistant")
B_INST, E_INST = "[INST]", "[/INST]"  # Meta's llama/generation.py
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def llama2(system: Optional[str], exchanges: list[Exchange]) -> list[Segment]:
    """Meta's Llama 2 chat format: `<s>[INST] {user} [/INST] {answer} </s>` per exchange, the system
    message inside the first `[INST]`; contents stripped, the answer followed by a space, as Meta's
    `chat_completion` writes them."""
    segments: list[Segment] = []
    for k, (user, answer) in enumerate(exchanges):
        if k == 0 and system is not None:
            user = B_SYS + system + E_SYS + user
        segments += [
            (Special.bos, False),
            (f"{B_INST} {user.strip()} {E_INST}", False),
            (f"{answer.strip()} ", True),
            (Special.eos, True),
        ]
    return segments


def alpaca(system: Optional[str], exchanges: list[Exchange]) -> list[Segment]:
    """Stanford Alpaca's prompt: a preamble (or the system message), then `### Instruction:` and
    `### Response:` blocks, each answer ended by EOS; one BOS in front."""
    segments: list[Segment] = [(Special.bos, False)]
    head = (ALPACA_PREAMBLE if system is None else system) + "\n\n"
    for k, (user, answer) in enumerate(exchanges):
        prompt = f"### Instruction:\n{user}\n\n### Response:\n"
        segments += [(head + prompt if k == 0 else prompt, False), (answer, True), (Special.eos, True)]
    return segments


TEMPLATES: dict[str, Callable[[Optional[str], list[Exchange]], list[Segment]]] = {
    "llama2": llama2,
    "alpaca": alpaca,
}


def conversation(record: Any, origin: str) -> tuple[Optional[str], list[Exchange]]:
    """The system message (or None) and the (user, assistant) exchanges of one record; a DataError naming
    `origin` (file:line) when the record is not a prompt/response or a well-formed conversation."""
    if not isinstance(record, dict):
        raise DataError(f"{origin}: expected a JSON object, got {type(record).__name__}")
    has_pair, has_messages = "prompt" in record or "response" in record, "messages" in record
    if has_pair == has_messages:
        what = "both" if has_pair else "neither"
        raise DataError(f"{origin}: an SFT record has prompt and response, or messages; this one has {what}")
    if has_pair:
        missing = [key for key in ("prompt", "response") if key not in record]
        if missing:
            raise DataError(f"{origin}: a prompt/response record lacks {missing[0]}")
        messages = [{"role": "user", "content": record["prompt"]}]
        messages.append({"role": "assistant", "content": record.get("response")})
        if "system" in record:
            messages.insert(0, {"role": "system", "content": record["system"]})
        names = {"system": "system", "user": "prompt", "assistant": "response"}
    else:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{origin}: messages must be a non-empty list of {{role, content}} objects")
        names = {role: None for role in ROLES}
    for n, message in enumerate(messages):
        where = f"messages[{n}]"
        if not isinstance(message, dict):
            raise DataError(f"{origin}: {where} must be a {{role, content}} object, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            role = message.get("role")
            raise DataError(f"{origin}: {where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        field = names[message["role"]] or f"{where}.content"
        if not isinstance(content, str):
            raise DataError(f"{origin}: {field} must be a string, got {type(content).__name__}")
        if not encodable(content):
            raise DataError(f"{origin}: {field} holds a lone surrogate (e.g. JSON's \\ud800), not valid Unicode")
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    roles = [m["role"] for m in turns]
    if "assistant" not in roles:
        raise DataError(f"{origin}: the conversation has no assistant turn, so nothing to train on")
    expected = ["user", "assistant"] * (len(roles) // 2)
    if roles != expected:
        at = next((i for i, (a, b) in enumerate(zip(roles, expected)) if a != b), len(expected))
        at += 1 if system is not None else 0
        raise DataError(
            f"{origin}: messages[{at}] is out of order: after an optional system message, user and assistant "
            "turns must alternate, starting with the user and ending with the assistant"
        )
    return system, [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]


def read_examples(path: Path, template: str, id_field: str = "id") -> Iterator[Document]:
    """Every record of a JSONL file as a Document whose `segments` are the example rendered by `template`
    and whose `text` is their plain text; a bad record is a DataError naming the file and line."""
    path = Path(path)
    if not any(s.lower() in (".jsonl", ".json", ".ndjson") for s in path.suffixes):
        raise DataError(f"{path}: SFT examples are read from JSONL files (.jsonl[.gz|.zst])")
    render = TEMPLATES[template]
    for origin, record, reason in jsonl_records(path):
        if reason:
            raise DataError(f"{origin}: {reason.replace('_', ' ')}")
        segments = render(*conversation(record, origin))
        doc_id = record.get(id_field)
        text = "".join(piece for piece, _ in segments if isinstance(piece, str))
        yield Document(origin, id=origin if doc_id is None else str(doc_id), text=text, segments=segments)


def encode_examples(examples: list[list[Segment]], tokenizer: Any, threads: int = 1) -> tuple[np.ndarray, ...]:
    """Rendered examples -> (tokens (n_tokens,) int64, lengths (n_examples,) int64, loss mask (n_tokens,)
    uint8): the examples' tokens concatenated, each one's length, and 1 where a token counts in the loss.
    Text pieces are encoded in one batch (SentencePiece's threads), specials are the tokenizer's ids."""
    texts = [piece for segments in examples for piece, _ in segments if isinstance(piece, str)]
    encoded = iter(tokenizer.encode_batch(texts, threads))
    special = {Special.bos: [tokenizer.bos_id], Special.eos: [tokenizer.eos_id]}
    tokens: list[int] = []
    mask: list[int] = []
    lengths: list[int] = []
    for segments in examples:
        before = len(tokens)
        for piece, trained in segments:
            ids = special[piece] if isinstance(piece, Special) else next(encoded)
            tokens += ids
            mask += [int(trained)] * len(ids)
        lengths.append(len(tokens) - before)
    return np.array(tokens, dtype=np.int64), np.array(lengths, dtype=np.int64), np.array(mask, dtype=np.uint8)
