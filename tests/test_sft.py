"""Supervised finetuning data: chat templates, the response-only loss mask in the shards, masked targets
from the loader, packed examples that never see each other, and bad records named by file and line."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.config import PipelineConfig, validate_pipeline
from data_pipeline.configfile import ConfigError, load_structured
from data_pipeline.loader import IGNORE_INDEX, BatchLoader, PackedSamples
from data_pipeline.sft import ALPACA_PREAMBLE
from data_pipeline.shards import Manifest, ShardError, SourceShards
from data_pipeline.sources import DataError
from data_pipeline.tokenize import TokenizeSettings, tokenize_source
from data_pipeline.tokenizer import Tokenizer, file_sha256
from pretrain.config import Checkpointing
from pretrain.model import ModelArgs, build_model
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "sft_sample.jsonl"

PAIR = {"id": "p1", "system": "Answer briefly.", "prompt": "What colour is the sky on a clear day?", "response": "Blue"}
CHAT = {
    "id": "c1",
    "messages": [
        {"role": "system", "content": "You are a careful cook."},
        {"role": "user", "content": "How much salt goes into pasta water?"},
        {"role": "assistant", "content": "About ten grams per litre."},
        {"role": "user", "content": "Before or after it boils?"},
        {"role": "assistant", "content": "After, so it dissolves at once."},
    ],
}
SHORT = [  # packed two or three to a 64-token row by the 512-piece test tokenizer
    {"prompt": "Name a primary colour.", "response": "Red."},
    {"prompt": "Two plus two?", "response": "Four."},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]},
    {"prompt": "Opposite of cold?", "response": "Hot."},
    {"prompt": "A baby cat is a?", "response": "Kitten."},
    {"messages": [{"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome."}]},
    {"prompt": "Is ice frozen water?", "response": "Yes, it is."},
    {"prompt": "Colour of grass?", "response": "Green."},
]


def write_jsonl(path: Path, records: list) -> Path:
    """`records` as a JSONL file (a str record is written as the line itself)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def tokenize_sft(tokenizer: Path, inputs: list[Path], out: Path, template: str = "llama2") -> Path:
    """SFT shards of `inputs` (no validation split), in `out`; returns `out`."""
    settings = TokenizeSettings(
        source=out.name, tokenizer_path=str(tokenizer), val_fraction=0.0, format="sft", template=template
    )
    tokenize_source(inputs, out, settings)
    return out


def documents(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss mask) of every training document of a source folder, in order."""
    stream = SourceShards(folder, "train")
    starts = [int(s) for shard, base in zip(stream.shards, stream.starts) for s in shard.offsets[:-1] + base]
    bounds = [*starts, stream.n_tokens]
    return [
        (stream.read(a, b - a), stream.read_mask(a, b - a).astype(np.int64)) for a, b in zip(bounds[:-1], bounds[1:])
    ]


def runs(tokens: np.ndarray, mask: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
    """The maximal runs of untrained and of trained tokens of one document, in order."""
    edges = np.flatnonzero(np.diff(mask)) + 1
    pieces = np.split(np.arange(len(tokens)), edges)
    untrained = [tokens[p].tolist() for p in pieces if not mask[p[0]]]
    trained = [tokens[p].tolist() for p in pieces if mask[p[0]]]
    return untrained, trained


def meta_llama2(dialog: list[dict], tok: Tokenizer) -> list[int]:
    """Meta's `chat_completion` (llama/generation.py) tokenizing a dialog that ends with an answer: each
    exchange encoded whole, `[INST] {user} [/INST] {answer} ` between BOS and EOS."""
    if dialog[0]["role"] == "system":
        first = "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]
        dialog = [{"role": "user", "content": first}] + dialog[2:]
    ids = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        text = f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} "
        ids += tok.encode(text, bos=True, eos=True)
    return ids


def as_messages(record: dict) -> list[dict]:
    """A prompt/response record as its conversation."""
    if "messages" in record:
        return record["messages"]
    system = [{"role": "system", "content": record["system"]}] if "system" in record else []
    exchange = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    return system + exchange


def test_llama2_mask_is_one_exactly_on_the_answers_and_their_eos(tiny_data, tmp_path):
    tok = Tokenizer(tiny_data["tokenizer"])
    folder = tokenize_sft(tiny_data["tokenizer"], [write_jsonl(tmp_path / "in.jsonl", [PAIR, CHAT])], tmp_path / "s")
    (pair_tokens, pair_mask), (chat_tokens, chat_mask) = documents(folder)
    # the document is Meta's own tokenization of the dialog, one example one document
    assert pair_tokens.tolist() == meta_llama2(as_messages(PAIR), tok)
    assert chat_tokens.tolist() == meta_llama2(CHAT["messages"], tok)
    untrained, trained = runs(pair_tokens, pair_mask)
    prompt = f"[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\n{PAIR['prompt']} [/INST]"
    assert [tok.decode(r) for r in untrained] == [prompt]
    assert [r[-1] for r in trained] == [tok.eos_id] and [tok.decode(r[:-1]) for r in trained] == ["Blue "]
    untrained, trained = runs(chat_tokens, chat_mask)
    assert [r[0] for r in untrained] == [tok.bos_id, tok.bos_id]  # BOS of every exchange is not trained on
    assert [tok.decode(r) for r in untrained] == [
        "[INST] <<SYS>>\nYou are a careful cook.\n<</SYS>>\n\nHow much salt goes into pasta water? [/INST]",
        "[INST] Before or after it boils? [/INST]",
    ]
    assert all(r[-1] == tok.eos_id for r in trained)
    assert [tok.decode(r[:-1]) for r in trained] == ["About ten grams per litre. ", "After, so it dissolves at once. "]


def test_alpaca_mask_is_one_exactly_on_the_responses_and_their_eos(tiny_data, tmp_path):
    tok = Tokenizer(tiny_data["tokenizer"])
    pair = {"prompt": PAIR["prompt"], "response": "Blue."}
    src = write_jsonl(tmp_path / "in.jsonl", [pair, CHAT])
    folder = tokenize_sft(tiny_data["tokenizer"], [src], tmp_path / "s", template="alpaca")
    (pair_tokens, pair_mask), (chat_tokens, chat_mask) = documents(folder)
    assert pair_tokens[0] == tok.bos_id and pair_mask[0] == 0 and pair_tokens[-1] == tok.eos_id and pair_mask[-1] == 1
    untrained, trained = runs(pair_tokens, pair_mask)
    prompt = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{pair['prompt']}\n\n### Response:\n"
    assert [tok.decode(r) for r in untrained] == [prompt]
    assert [tok.decode(r) for r in trained] == ["Blue."] and trained[0][-1] == tok.eos_id
    untrained, trained = runs(chat_tokens, chat_mask)
    assert [tok.decode(r) for r in untrained] == [
        "You are a careful cook.\n\n### Instruction:\nHow much salt goes into pasta water?\n\n### Response:\n",
        "### Instruction:\nBefore or after it boils?\n\n### Response:\n",
    ]
    assert [tok.decode(r[:-1]) for r in trained] == ["About ten grams per litre.", "After, so it dissolves at once."]


@pytest.mark.parametrize("template", ["llama2", "alpaca"])
def test_sample_config_tokenizes_through_the_cli(tiny_data, tmp_path, monkeypatch, template):
    from data_pipeline.__main__ import main

    monkeypatch.chdir(ROOT)  # the config names its input relative to the repository
    overrides = [f"tokenizer.path={tiny_data['tokenizer']}", f"tokenize.output={tmp_path}", "tokenize.val_fraction=0"]
    if template != "llama2":
        overrides.append(f"sources=[{{name: sft_sample, files: [{SAMPLE}], format: sft, template: {template}}}]")
    assert main(["tokenize", "configs/pipeline/sft_sample.yaml", *overrides]) == 0
    assert main(["verify", str(tmp_path), "--tokenizer", str(tiny_data["tokenizer"])]) == 0
    tok = Tokenizer(tiny_data["tokenizer"])
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    docs = documents(tmp_path / "sft_sample")
    assert len(records) == len(docs) == 20
    for record, (tokens, mask) in zip(records, docs):  # every answer, and only the answers, trained on
        answers = [m["content"] for m in as_messages(record) if m["role"] == "assistant"]
        _, trained = runs(tokens, mask)
        expected = [f"{a.strip()} " if template == "llama2" else a for a in answers]
        assert [tok.decode(r[:-1]) for r in trained] == expected and all(r[-1] == tok.eos_id for r in trained)
    manifest = Manifest.load(tmp_path / "sft_sample")
    assert manifest.config["template"] == template and manifest.config["format"] == "sft"


def debug_model(mode: str = "none", max_seq_len: int = 64) -> torch.nn.Module:
    """A two-layer model with random weights (norms away from 1), checkpointed by `mode`."""
    args = ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=max_seq_len
    )
    model = build_model(args, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.ndim == 1 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    apply_activation_checkpointing(model, Checkpointing(mode))
    return model


def test_loss_from_the_loader_targets_is_the_loss_over_response_tokens_only(tiny_data, tmp_path):
    tok = Tokenizer(tiny_data["tokenizer"])
    records = [PAIR, CHAT, *SHORT[:3]]
    tokenize_sft(tiny_data["tokenizer"], [write_jsonl(tmp_path / "in.jsonl", records)], tmp_path / "s")
    # the reference, from Meta's tokenization: each exchange's answer and EOS count, the rest does not
    tokens, trained = [], []
    for record in records:
        messages = as_messages(record)
        ids = meta_llama2(messages, tok)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        flags = np.zeros(len(ids), dtype=bool)
        ends = [i + 1 for i, t in enumerate(ids) if t == tok.eos_id]
        for end, answer in zip(ends, answers):
            flags[end - len(tok.encode(f"{answer.strip()} ")) - 1 : end] = True
        tokens += ids
        trained.append(flags)
    tokens, trained = torch.tensor(tokens), torch.from_numpy(np.concatenate(trained))
    seq_len = len(tokens) - 1  # one window: the whole stream
    samples = PackedSamples(tmp_path, seq_len=seq_len, sources=["s"])
    ((inputs, targets, positions),) = BatchLoader(samples, 1, 1, with_positions=True).next_batch()
    assert inputs[0].equal(tokens[:-1]) and targets[0][targets[0] != IGNORE_INDEX].equal(tokens[1:][trained[1:]])
    model = debug_model(max_seq_len=seq_len)
    loss = model(inputs, targets, positions)
    logits = model(inputs, positions=positions)[0]  # (seq_len, vocab)
    expected = F.cross_entropy(logits[trained[1:]], tokens[1:][trained[1:]])
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    every_token = F.cross_entropy(logits, tokens[1:])
    assert not torch.allclose(loss, every_token, atol=1e-3)  # without the mask the loss would be this one


@pytest.mark.parametrize("mode", ["none", "selective", "llama"])
def test_packed_examples_give_the_logits_and_gradients_of_each_alone(tiny_data, tmp_path, mode):
    folder = tokenize_sft(tiny_data["tokenizer"], [write_jsonl(tmp_path / "in.jsonl", SHORT)], tmp_path / "s")
    seq_len = 64
    samples = PackedSamples(tmp_path, seq_len=seq_len, sources=[folder.name], seed=0)
    ((inputs, targets, positions),) = BatchLoader(samples, 2, 2, with_positions=True).next_batch()
    model = debug_model(mode)
    packed = model(inputs, positions=positions)  # (2, seq_len, vocab)
    loss = F.cross_entropy(packed.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    loss.backward()
    together = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    alone_loss = 0.0
    for row in range(2):
        starts = torch.nonzero(positions[row] == 0).flatten().tolist()
        assert len(starts) >= 2  # two or three examples (and parts) share the row
        for a, b in zip(starts, [*starts[1:], seq_len]):
            assert positions[row, a:b].equal(torch.arange(b - a))
            logits = model(inputs[row : row + 1, a:b])
            torch.testing.assert_close(packed[row : row + 1, a:b], logits, atol=1e-5, rtol=0)
            alone_loss = alone_loss + F.cross_entropy(logits[0], targets[row, a:b], reduction="sum")
    alone_loss.backward()
    torch.testing.assert_close(loss, alone_loss, atol=1e-4, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(together[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_loader_resumes_exactly_with_masked_targets_and_positions(tiny_data, tmp_path):
    tokenize_sft(tiny_data["tokenizer"], [SAMPLE], tmp_path / "s")
    samples = PackedSamples(tmp_path, seq_len=32, seed=5)
    straight = BatchLoader(samples, 4, 2, with_positions=True)
    batches = [straight.next_batch() for _ in range(6)]
    assert any((targets == IGNORE_INDEX).any() for batch in batches for _, targets, _ in batch)
    first = BatchLoader(samples, 4, 2, with_positions=True)
    for _ in range(3):
        first.next_batch()
    resumed = BatchLoader(PackedSamples(tmp_path, seq_len=32, seed=5), 4, 2, with_positions=True)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for expected in batches[3:]:
        for got, want in zip(resumed.next_batch(), expected):
            assert all(a.equal(b) for a, b in zip(got, want))


def test_plain_and_sft_sources_blend_each_row_masked_by_its_own_source(tiny_data, tmp_path):
    tokenize_sft(tiny_data["tokenizer"], [SAMPLE], tmp_path / "sft")
    plain = tiny_data["sources"][0]
    os.symlink(tiny_data["root"] / plain, tmp_path / plain)
    samples = PackedSamples(tmp_path, seq_len=32, weights={"sft": 1.0, plain: 1.0})
    tokens, sources, _, mask = samples.batch(range(64))
    assert mask.shape == tokens.shape and mask[sources == samples.sources.index(plain)].all()
    ((inputs, targets),) = BatchLoader(samples, 64, 64).next_batch()
    from_sft = torch.from_numpy(sources == samples.sources.index("sft"))
    assert (targets[~from_sft] != IGNORE_INDEX).all() and (targets[from_sft] == IGNORE_INDEX).any()
    kept = targets != IGNORE_INDEX
    assert targets[kept].equal(torch.from_numpy(tokens[:, 1:])[kept])


def test_mask_is_listed_checksummed_and_verified_like_the_tokens(tiny_data, tmp_path):
    folder = tokenize_sft(tiny_data["tokenizer"], [SAMPLE], tmp_path / "tokens" / "s")
    (shard,) = [s for s in Manifest.load(folder).shards if s.split == "train"]
    assert shard.mask_sha256 == file_sha256(folder / "train-00000.mask")
    assert (folder / "train-00000.mask").stat().st_size == shard.tokens
    mask = folder / "train-00000.mask"
    data = bytearray(mask.read_bytes())
    data[5] ^= 1
    mask.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{mask}: sha256 differs"):
        SourceShards(folder, "train", verify_checksum=True)
    mask.write_bytes(bytes(data[:-3]))
    with pytest.raises(ShardError, match=rf"{mask}: {len(data) - 3} bytes, but the manifest says"):
        SourceShards(folder, "train")
    mask.unlink()
    with pytest.raises(ShardError, match=rf"{mask}: missing, but listed"):
        SourceShards(folder, "train")


def test_shards_without_a_mask_count_every_target(tiny_data, tmp_path):
    source = tiny_data["sources"][0]
    shutil.copytree(tiny_data["root"] / source, tmp_path / source)
    manifest = json.loads((tmp_path / source / "manifest.json").read_text())
    for shard in manifest["shards"]:  # a manifest written before masks existed
        del shard["mask_sha256"]
    (tmp_path / source / "manifest.json").write_text(json.dumps(manifest))
    samples = PackedSamples(tmp_path, seq_len=32)
    assert not samples.masked
    ((inputs, targets),) = BatchLoader(samples, 4, 4).next_batch()
    assert inputs[:, 1:].equal(targets[:, :-1]) and (targets != IGNORE_INDEX).all()


def chat(*turns: str) -> dict:
    """A chat record of `role: content` turns."""
    return {"messages": [dict(zip(("role", "content"), turn.split(": ", 1))) for turn in turns]}


BAD = [
    ({"prompt": "hi"}, "a prompt/response record lacks response"),
    ({"text": "plain text, not an example"}, "this one has neither"),
    ({"prompt": "a", "response": "b", "messages": []}, "this one has both"),
    ({"prompt": "a", "response": 7}, "response must be a string, got int"),
    (chat("user: a", "bot: b"), "messages\\[1\\]: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, "messages\\[0\\].content must be a string, got list"),
    (chat("system: s", "user: a"), "has no assistant turn"),
    (chat("user: a", "assistant: b", "user: c"), "messages\\[2\\] is out of order"),
    (chat("assistant: a", "user: b"), "messages\\[0\\] is out of order"),
    (chat("user: a", "system: s", "assistant: b"), "messages\\[1\\] is out of order"),
    ({"messages": "hello"}, "messages must be a non-empty list"),
    ("{broken", "bad json"),
    (["prompt", "response"], "expected a JSON object, got list"),
]


@pytest.mark.parametrize("record, reason", BAD, ids=[reason.replace("\\", "")[:28] for _, reason in BAD])
def test_a_bad_record_is_an_error_naming_file_and_line(tiny_data, tmp_path, record, reason):
    src = write_jsonl(tmp_path / "bad.jsonl", [PAIR, "", CHAT, record, PAIR])  # the blank line 2 counts as a line
    with pytest.raises(DataError, match=rf"^{src}:4: .*{reason}"):
        tokenize_sft(tiny_data["tokenizer"], [src], tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.bin"))  # nothing half written


@pytest.mark.parametrize(
    "source, key",
    [
        ("{name: a, files: [x.jsonl], format: sft}", "sources\\[0\\].template: format=sft needs one of llama2"),
        ("{name: a, files: [x.jsonl], format: sft, template: chatml}", "sources\\[0\\].template"),
        ("{name: a, files: [x.jsonl], format: chat}", "sources\\[0\\].format: 'chat' is not one of text, sft"),
        ("{name: a, files: [x.jsonl], template: llama2}", "sources\\[0\\].template: only for format=sft"),
        ("{name: a, dataset: org/set, format: sft, template: llama2}", "sources\\[0\\].dataset: format=sft reads"),
    ],
    ids=["no template", "unknown template", "unknown format", "template on text", "sft from a dataset"],
)
def test_config_names_the_key_of_a_bad_format_or_template(source, key):
    with pytest.raises(ConfigError, match=key):
        validate_pipeline(load_structured(PipelineConfig, None, [f"sources=[{source}]"]))


def test_config_takes_an_sft_source_framed_by_bos_and_eos_only():
    sft = "sources=[{name: a, files: [x.jsonl], format: sft, template: alpaca}]"
    validate_pipeline(load_structured(PipelineConfig, None, [sft]))
    with pytest.raises(ConfigError, match="tokenize.bos/eos: source 'a' is format=sft"):
        validate_pipeline(load_structured(PipelineConfig, None, [sft, "tokenize.eos=false"]))


def test_accumulated_micro_batches_weigh_every_response_token_alike_and_a_prompt_only_one_counts_zero():
    """train_step over micro-batches that count different numbers of response targets (one none at all) takes
    the loss and the update of the whole batch at once: the mean over every counted target."""
    from pretrain.config import load_config
    from pretrain.optim import build_scheduler
    from pretrain.parallel import build_strategy
    from pretrain.trainer import train_step

    cfg = load_config("debug", ["model.dim=64", "model.n_layers=2", "model.vocab_size=512", "train.device=cpu"])
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 512, (3, 16), generator=g)
    targets = torch.randint(0, 512, (3, 16), generator=g)
    targets[0, :12] = IGNORE_INDEX  # 4 counted
    targets[1, :] = IGNORE_INDEX  # a row of prompt only: 0 counted
    targets[2, :3] = IGNORE_INDEX  # 13 counted

    def step(micro_batches):
        strategy = build_strategy(cfg)
        model, optimizer = strategy.setup(cfg)
        scheduler = build_scheduler(optimizer, cfg.optim, 10)
        loss, norm, applied = train_step(model, micro_batches, optimizer, scheduler, strategy, 1.0, masked=True)
        return loss, norm, applied, [p.detach().clone() for p in model.parameters()]

    whole = step([(inputs, targets)])
    parts = step([(inputs[i : i + 1], targets[i : i + 1]) for i in range(3)])
    assert parts[2] and torch.isfinite(parts[0])
    torch.testing.assert_close(parts[0], whole[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(parts[1], whole[1], atol=1e-6, rtol=1e-6)
    for a, b in zip(parts[3], whole[3]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
