"""`generate` with a key/value cache: the logits of the full forward, the tokens of the full recompute and
of transformers' greedy generate, the same seeded draws."""

import pytest
import torch

from pretrain.generate import sample
from pretrain.model import KVCache, ModelArgs, build_model


def tiny_model(n_kv_heads: int, max_seq_len: int = 64, seed: int = 0):
    args = ModelArgs(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        vocab_size=128,
        multiple_of=16,
        max_seq_len=max_seq_len,
        init_std=0.1,  # peaked logits: a greedy choice is not a near tie decided by rounding
    )
    return build_model(args, seed=seed).eval()


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_cached_forward_gives_the_logits_of_the_full_forward(n_kv_heads):
    model = tiny_model(n_kv_heads)
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.args.n_layers, 24)
    # a prompt from 0, then 5 tokens after it (the masked path), then one token at a time
    pieces = [(0, 7), (7, 12), *((i, i + 1) for i in range(12, 20))]
    cached = torch.cat([model.forward_cached(tokens[:, a:b], cache, a) for a, b in pieces], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(cached, model(tokens), atol=1e-5, rtol=0)
    assert cache.keys[0].shape == (2, 24, n_kv_heads, 16)  # the kv heads, not the repeated ones
    with pytest.raises(ValueError, match="exceed the cache"):
        model.forward_cached(tokens[:, :5], cache, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as on a GPU: the cache holds what attention computes in
        cache = KVCache(model.args.n_layers, 20)
        cached = torch.cat([model.forward_cached(tokens[:, a:b], cache, a) for a, b in pieces], dim=1)
        with torch.no_grad():
            full = model(tokens)
    assert cache.keys[0].dtype == torch.bfloat16
    torch.testing.assert_close(cached.float(), full.float(), atol=0.1, rtol=0)


def test_greedy_and_seeded_top_p_with_cache_equal_without_and_transformers(tiny_data, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import shutil

    import sentencepiece as spm

    from pretrain.__main__ import main
    from pretrain.convert import import_weights
    from pretrain.generate import load_for_inference

    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    shutil.copyfile(tiny_data["tokenizer"], tmp_path / "hf" / "tokenizer.model")
    ours = load_for_inference(import_weights(tmp_path / "hf", tmp_path / "ours"))
    for prompt in ([1, 17, 100, 33, 7], [1, *range(2, 40)]):
        greedy = sample(ours, prompt, 20)
        assert greedy == sample(ours, prompt, 20, use_cache=False)
        with torch.no_grad():
            generated = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
        assert greedy == generated[0, len(prompt) :].tolist()
        for seed in range(2):
            drawn = sample(ours, prompt, 20, temperature=1.0, top_p=0.9, seed=seed)
            assert drawn == sample(ours, prompt, 20, temperature=1.0, top_p=0.9, seed=seed, use_cache=False)
        assert drawn != sample(ours, prompt, 20, temperature=1.0, top_p=0.9, seed=seed + 1)
        stop = greedy[5]  # eos: the same early stop with and without the cache
        assert sample(ours, prompt, 20, eos_id=stop) == greedy[: greedy.index(stop) + 1]
        assert sample(ours, prompt, 20, eos_id=stop, use_cache=False) == greedy[: greedy.index(stop) + 1]
    # the command line: sampled by default, the prompt as typed, then the continuation with its leading space
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer"]))
    prompt_text = "The history of"
    ids = [sp.bos_id(), *sp.encode(prompt_text)]
    assert main(["generate", str(tmp_path / "ours"), prompt_text, "--max-new-tokens=12"]) in (0, None)
    drawn = sample(ours, ids, 12, temperature=0.8, top_p=0.9, seed=0, eos_id=sp.eos_id())
    out = capsys.readouterr().out
    header = f"--- 'The history of' ({len(drawn)} new tokens) temperature 0.8, top-p 0.9, seed 0"
    assert f"{header}\n{prompt_text}{sp.decode(ids + drawn)[len(sp.decode(ids)) :]}\n" in out
    outputs = []
    for flags in (["--temperature=0"], ["--temperature=0", "--no-cache"]):
        main(["generate", str(tmp_path / "ours"), prompt_text, "--max-new-tokens=12", *flags])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and " greedy" in outputs[0]


def test_past_max_seq_len_the_cache_slides_like_the_full_recompute():
    model = tiny_model(2, max_seq_len=16)
    for prompt in ([1, 5, 9, 3], list(range(1, 21))):  # reaches the window; starts past it
        for temperature in (0.0, 1.0):
            cached = sample(model, prompt, 30, temperature=temperature, seed=2)
            assert cached == sample(model, prompt, 30, temperature=temperature, seed=2, use_cache=False)
            assert len(cached) == 30
    with pytest.raises(ValueError, match="prompt is empty"):
        sample(model, [], 4)


def test_continuation_text_keeps_the_leading_space_and_whitespace_gets_a_note(tiny_data):
    import sentencepiece as spm

    from pretrain.generate import continuation_text, whitespace_note

    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer"]))
    ids = sp.encode("The history of the world")
    cut = next(i for i in range(1, len(ids)) if sp.id_to_piece(ids[i]).startswith("▁"))  # a word starts here
    prompt, new = ids[:cut], ids[cut:]
    assert sp.decode(prompt) + continuation_text(sp.decode, prompt, new) == "The history of the world"
    assert continuation_text(sp.decode, prompt, new).startswith(" ")  # decode(new) alone drops it
    assert "5 newlines" in whitespace_note(" the\n\n\n\n\n") and "ends in" in whitespace_note(" the\n\n\n\n\n")
    assert "is only whitespace (2 newlines, 3 spaces)" in whitespace_note("\n   \n")
    assert whitespace_note(" the end\n\n") is None and whitespace_note("") is None
