"""Export to Hugging Face: transformers loads the folder offline and computes what our model computes."""

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


def test_exported_tokenizer_gives_our_ids_on_mixed_text(tiny_data, tmp_path, monkeypatch):
    import sentencepiece as spm

    from pretrain.export import export_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train(tiny_config(tiny_data, tmp_path / "run", "train.steps=1"))
    out = export_hf(tmp_path / "run" / "checkpoints" / "step-00000001", tmp_path / "hf", tiny_data["tokenizer"])
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer"]))
    texts = ["Digits 12345 and 3.14159, emoji 😀🚀", "Ελληνικά, русский, 中文 and العربية", "two  spaces\n\ttab"]
    for text in texts:  # (text that starts with spaces is split differently by transformers 5: not yet matched)
        assert theirs(text)["input_ids"] == [ours.bos_id(), *ours.encode(text)], text
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
