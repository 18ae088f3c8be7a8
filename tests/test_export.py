"""Export to Hugging Face: transformers loads the folder offline and computes what our model computes."""

import json

import pytest
import torch

from conftest import tiny_config
from pretrain.trainer import train

transformers = pytest.importorskip("transformers")


def greedy(forward, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        tokens = torch.cat([tokens, forward(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_exported_model_gives_our_logits_and_generations(tiny_data, tmp_path, n_kv_heads, monkeypatch):
    from pretrain.consolidate import consolidated_state_dict
    from pretrain.export import export_hf
    from pretrain.model import Transformer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_config(tiny_data, tmp_path / "run", "train.steps=3", f"model.n_kv_heads={n_kv_heads}")
    train(cfg)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    out = export_hf(checkpoint, tmp_path / "hf", tokenizer=tiny_data["tokenizer"], dtype="fp32")
    ours = Transformer(cfg.model)
    ours.load_state_dict(consolidated_state_dict(checkpoint))
    ours.eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=tokens).logits, ours(tokens), atol=1e-5, rtol=0)
        mine = greedy(ours, tokens[:, :8], 12)
        generated = theirs.generate(tokens[:, :8], max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(generated, mine)


def test_exported_tokenizer_gives_our_ids_on_real_and_mixed_text(tiny_data, tmp_path, monkeypatch):
    import sentencepiece as spm

    from conftest import CORPUS
    from pretrain.export import export_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train(tiny_config(tiny_data, tmp_path / "run", "train.steps=1"))
    out = export_hf(tmp_path / "run" / "checkpoints" / "step-00000001", tmp_path / "hf", tiny_data["tokenizer"])
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer"]))
    texts = ["Digits 12345 and 3.14159, emoji 😀🚀", "Ελληνικά, русский, 中文 and العربية", "two  spaces\n\ttab"]
    texts += ["  two leading spaces", " one", "   ", "", "trailing  ", "\n\nnewlines first", "zero\u200bwidth 𝔘"]
    for path in sorted(CORPUS.glob("*.jsonl")):  # every document of the bundled real corpus
        texts += [json.loads(line)["text"] for line in path.read_text().splitlines()]
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == [ours.bos_id(), *ours.encode(text)], text[:200]
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids[1:]), text[:200]
    assert theirs.eos_token_id == ours.eos_id() and theirs.bos_token_id == ours.bos_id()


def random_hf_model(folder, n_kv_heads: int, tokenizer):
    """A randomly initialised LlamaForCausalLM saved by transformers itself, with our tokenizer beside it."""
    import shutil

    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=64,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(n_kv_heads)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    shutil.copyfile(tokenizer, folder / "tokenizer.model")
    return model


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_hugging_face_to_ours_to_hugging_face_gives_identical_tensors(tiny_data, tmp_path, n_kv_heads, monkeypatch):
    from safetensors.torch import load_file

    from pretrain.convert import import_weights
    from pretrain.export import export_hf
    from pretrain.generate import load_for_inference

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = random_hf_model(tmp_path / "source", n_kv_heads, tiny_data["tokenizer"])
    imported = import_weights(tmp_path / "source", tmp_path / "ours")
    assert (imported / "tokenizer.model").read_bytes() == tiny_data["tokenizer"].read_bytes()
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # our model computes what theirs does (RoPE theta and norm eps carried over)
        torch.testing.assert_close(
            load_for_inference(imported)(tokens), source(input_ids=tokens).logits, atol=1e-5, rtol=0
        )
    out = export_hf(imported, tmp_path / "back", tokenizer=imported / "tokenizer.model", dtype="fp32")
    before, after = load_file(tmp_path / "source" / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    config_before = json.loads((tmp_path / "source" / "config.json").read_text())
    config_after = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert config_after[key] == config_before[key], key
    assert config_after["num_key_value_heads"] == n_kv_heads
    assert config_after["rms_norm_eps"] == 1e-5 and config_after["max_position_embeddings"] == 64
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, source(input_ids=tokens).logits, atol=0, rtol=0)


def test_import_of_metas_model_parallel_files(tiny_data, tmp_path):
    """Meta's layout: params.json and one consolidated.NN.pth per model-parallel rank, each holding
    its slice (embedding and row-parallel wo/w2 split by columns, the other matrices by rows)."""
    from pretrain.consolidate import WeightReader
    from pretrain.convert import import_weights
    from pretrain.model import ModelArgs, build_model

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, norm_eps=1e-5)
    full = build_model(args, seed=5).state_dict()
    meta = tmp_path / "llama-2-tiny"
    meta.mkdir()
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 16}
    (meta / "params.json").write_text(json.dumps({**params, "norm_eps": 1e-5}))
    for rank in range(2):
        part = {"rope.freqs": torch.zeros(8)}  # LLaMA-1's files carry their RoPE table
        for name, tensor in full.items():
            if name.endswith("norm.weight"):
                part[name] = tensor.clone()
            else:
                by_columns = name.startswith("tok_embeddings") or name.endswith(("wo.weight", "w2.weight"))
                part[name] = tensor.chunk(2, dim=1 if by_columns else 0)[rank].clone()
        torch.save(part, meta / f"consolidated.{rank:02d}.pth")
    (tmp_path / "tokenizer.model").write_bytes(tiny_data["tokenizer"].read_bytes())  # one folder up, as Meta ships
    imported = import_weights(meta, tmp_path / "ours", max_seq_len=4096)
    reader = WeightReader(imported)
    assert set(reader.shapes) == set(full)
    for name, tensor in full.items():
        assert torch.equal(reader(name), tensor), name
    model = torch.load(imported / "trainer.pt", weights_only=False)["config"]["model"]
    assert model["vocab_size"] == 512 and model["max_seq_len"] == 4096 and model["n_kv_heads"] == 2
    assert (imported / "tokenizer.model").is_file()
    (meta / "consolidated.01.pth").unlink()  # one file of two: the slices no longer make the whole
    with pytest.raises(ValueError, match="does not join"):
        import_weights(meta, tmp_path / "broken")


def test_a_run_starts_from_imported_weights(tiny_data, tmp_path, monkeypatch):
    from data_pipeline.loader import BatchLoader
    from pretrain.config import ConfigError
    from pretrain.convert import import_weights
    from pretrain.trainer import load_data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = random_hf_model(tmp_path / "source", 2, tiny_data["tokenizer"])
    imported = import_weights(tmp_path / "source", tmp_path / "ours")
    overrides = [f"train.init_from={imported}", "model.ffn_hidden_dim=176", "model.norm_eps=1e-5"]
    cfg = tiny_config(tiny_data, tmp_path / "run", "train.steps=2", "model.rope_theta=500000", *overrides)
    train(cfg)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    batch = BatchLoader(load_data(cfg), 8, 8).next_batch()[0]  # the run's first global batch
    with torch.no_grad():
        logits = source(input_ids=batch[0]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[1].flatten())
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected.item(), abs=1e-5)
    with pytest.raises(ConfigError, match="holds weights only"):  # resuming it makes no sense: say what does
        train(tiny_config(tiny_data, tmp_path / "run2", f"train.resume={imported}", *overrides))
    with pytest.raises(ConfigError, match="does not fit the model"):
        train(tiny_config(tiny_data, tmp_path / "run3", *overrides, "model.n_kv_heads=4"))  # wk, wv differ


def test_generate_greedy_equals_transformers_and_top_p_is_seeded(tiny_data, tmp_path, monkeypatch):
    import subprocess
    import sys

    from pretrain.convert import import_weights
    from pretrain.generate import load_for_inference, sample

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = random_hf_model(tmp_path / "source", 2, tiny_data["tokenizer"])
    ours = load_for_inference(import_weights(tmp_path / "source", tmp_path / "ours"))
    prompt = [1, 17, 200, 33, 7]
    greedy = sample(ours, prompt, 20)
    with torch.no_grad():
        theirs = source.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert greedy == theirs[0, len(prompt) :].tolist()
    drawn = sample(ours, prompt, 20, temperature=1.0, top_p=0.9, seed=3)
    assert drawn == sample(ours, prompt, 20, temperature=1.0, top_p=0.9, seed=3)
    assert drawn != sample(ours, prompt, 20, temperature=1.0, top_p=0.9, seed=4)
    assert sample(ours, prompt, 20, temperature=1.0, top_p=1e-6, seed=3) == greedy  # the nucleus of one token
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "generate", str(tmp_path / "ours"), "The history of", "--max-new-tokens=8"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "The history of" in result.stdout and "(8 new tokens)" in result.stdout


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_one_config_mapping_both_ways(n_kv_heads):
    """Export and import read one table: every model value survives our config.json and transformers' own."""
    from pretrain.hf import ConversionError, hf_config, hf_config_dict, hf_model_args
    from pretrain.model import ModelArgs

    args = ModelArgs(
        dim=64,
        n_layers=3,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        vocab_size=300,
        ffn_hidden_dim=176,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=96,
        init_std=0.01,
    )
    assert hf_model_args({"model_type": "llama", **hf_config_dict(args)}, "config.json") == args
    assert hf_model_args(hf_config(args).to_dict(), "config.json") == args  # as transformers writes it
    without = {k: v for k, v in hf_config_dict(args).items() if k != "num_hidden_layers"}
    with pytest.raises(ConversionError, match="config.json: no num_hidden_layers"):
        hf_model_args({"model_type": "llama", **without}, "config.json")
