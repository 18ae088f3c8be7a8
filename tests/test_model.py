"""The model: Meta's sizes, Hugging Face parity, FLOPs per token, `python -m pretrain info`."""

import json
import subprocess
import sys

import pytest
import torch

from pretrain.config import load_config
from pretrain.model import ModelArgs, Transformer, build_model, count_params, flops_per_token

META_SIZES = {  # DESIGN §4; llama2-7b/13b share LLaMA-1's shapes
    "llama1-7b": 6_738_415_616,
    "llama1-13b": 13_015_864_320,
    "llama1-33b": 32_528_943_616,
    "llama1-65b": 65_285_660_672,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
}


@pytest.mark.parametrize("preset", sorted(META_SIZES))
def test_presets_give_meta_parameter_counts_on_meta_device(preset):
    args = load_config(preset).model
    with torch.device("meta"):
        model = Transformer(args)
    built = sum(p.numel() for p in model.parameters())
    assert built == META_SIZES[preset]
    assert count_params(args) == (built, built - args.vocab_size * args.dim)
    assert all(p.is_meta for p in model.parameters())


def test_debug_model_is_a_few_million_parameters():
    total, _ = count_params(load_config("debug").model)
    assert 1_000_000 < total < 20_000_000


def test_flops_per_token_llama1_7b_by_hand():
    args = load_config("llama1-7b").model
    n = 6_738_415_616 - 32_000 * 4096  # without the input embedding
    by_hand = 6 * n + 12 * 32 * 32 * 128 * 2048
    assert by_hand == 42_865_287_168
    assert flops_per_token(args, 2048) == by_hand


def test_info_prints_parameters_and_flops():
    out = subprocess.run(
        [sys.executable, "-m", "pretrain", "info", "llama1-65b", "--json"], capture_output=True, text=True, check=True
    ).stdout
    info = json.loads(out)
    assert info["params"] == 65_285_660_672
    assert info["non_embedding_params"] == 65_285_660_672 - 32_000 * 8192
    assert info["flops_per_token"] == flops_per_token(load_config("llama1-65b").model, 2048)
    text = subprocess.run(
        [sys.executable, "-m", "pretrain", "info", "llama2-70b"], capture_output=True, text=True, check=True
    ).stdout
    assert "68,976,648,192" in text


def _random_model(args: ModelArgs) -> Transformer:
    model = build_model(args)
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1 too, so their weights matter
            p.normal_(0.0, 0.2 if p.ndim == 1 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    return model


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_logits_match_huggingface_llama(n_kv_heads):
    transformers = pytest.importorskip("transformers")
    from pretrain.hf import from_hf_state_dict, hf_config, to_hf_state_dict

    torch.manual_seed(0)
    args = ModelArgs(
        dim=64,
        n_layers=3,
        n_heads=8,
        n_kv_heads=n_kv_heads,
        vocab_size=128,
        multiple_of=32,
        max_seq_len=48,
        norm_eps=1e-5,
        rope_theta=10000.0,
    )
    ours = _random_model(args).eval()
    theirs = transformers.LlamaForCausalLM(hf_config(args)).eval()
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), args), strict=True)
    tokens = torch.randint(0, args.vocab_size, (3, 48))
    with torch.no_grad():
        a, b = ours(tokens), theirs(tokens).logits
    assert a.shape == b.shape == (3, 48, 128)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    loss_ours = torch.nn.functional.cross_entropy(a[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss_hf = theirs(tokens, labels=tokens).loss
    torch.testing.assert_close(loss_ours, loss_hf, rtol=0, atol=1e-5)
    back = from_hf_state_dict(theirs.state_dict(), args)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_meta_build_then_init_is_deterministic_and_sane():
    args = load_config("debug").model
    a = build_model(args, seed=3)
    b = build_model(args, seed=3)
    assert not torch.equal(a.output.weight, build_model(args, seed=4).output.weight)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert torch.isfinite(p).all(), name
    assert torch.equal(a.layers[0].attention_norm.weight, torch.ones(args.dim))
    std = a.layers[0].attention.wq.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert a.layers[0].attention.wo.weight.std().item() < std / 2  # scaled residual projections


def test_sequence_longer_than_max_is_refused():
    model = build_model(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=16, multiple_of=8, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def backward_op_counts(mode: str) -> dict[str, int]:
    """aten ops run during the backward pass of the small model under checkpointing `mode`."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from pretrain.config import Checkpointing
    from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=32)
    model = build_model(args)
    apply_activation_checkpointing(model, Checkpointing(mode))
    loss = model(torch.randint(0, 128, (2, 16))).square().mean()
    with Count() as counter:
        loss.backward()
    return counter.ops


def test_selective_checkpointing_recomputes_cheap_ops_but_no_matmul_or_attention():
    none, full, selective = (backward_op_counts(m) for m in ("none", "full", "selective"))

    def attention_forwards(ops):
        return sum(n for k, n in ops.items() if k.startswith("_scaled_dot_product") and not k.endswith("backward"))

    assert full["mm"] > none["mm"] and attention_forwards(full) == 2  # full recomputes every block
    assert selective["mm"] == none["mm"] and attention_forwards(selective) == 0  # matmul and attention kept
    assert selective["rsqrt"] > none["rsqrt"] == 0 and selective["silu"] > none["silu"] == 0  # norms, SwiGLU redone


def test_chunked_loss_equals_the_whole_and_never_makes_the_full_logits():
    from torch.utils._python_dispatch import TorchDispatchMode

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=32)
    tokens = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(0))
    results = {}
    for chunk in (0, 24):
        model = build_model(args, seed=1)
        model.loss_chunk_tokens = chunk

        class Largest(TorchDispatchMode):
            largest = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                        Largest.largest = max(Largest.largest, t.numel())
                return out

        with Largest():
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
        results[chunk] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()}, Largest.largest)
    whole, chunked = results[0], results[24]
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-6, rtol=0)
    for name, grad in whole[1].items():
        torch.testing.assert_close(chunked[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert whole[2] >= 4 * 32 * 512  # the full logits of the batch
    assert chunked[2] < 4 * 32 * 512 and chunked[2] >= 24 * 512  # one chunk's logits at most (embedding grads aside)


def test_document_attention_sees_each_packed_document_as_if_alone():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=32)
    model = build_model(args, seed=2)
    generator = torch.Generator().manual_seed(0)
    first, second = (
        torch.randint(0, 128, (1, 10), generator=generator),
        torch.randint(0, 128, (1, 22), generator=generator),
    )
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(10), torch.arange(22)])[None]
    with torch.no_grad():
        together = model(packed, positions=positions)
        plain = model(packed)
        torch.testing.assert_close(together[:, :10], model(first), atol=1e-5, rtol=0)
        torch.testing.assert_close(together[:, 10:], model(second), atol=1e-5, rtol=0)
        assert not torch.allclose(plain[:, 10:], model(second), atol=1e-3)  # without it, the second sees the first
