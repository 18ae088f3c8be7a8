"""QLoRA's NF4 base (pretrain/quantize.py, torchao's NF4Tensor) on a debug-size model, on CPU: its bytes, its
weights' and logits' errors against the fp32 model, LoRA trained on top of it, `generate --quantize nf4`."""

import copy
import importlib.util
import json
import math

import pytest
import torch

from pretrain.adapters import adapter_state_dict, apply_adapters
from pretrain.config import LORA_TARGETS, PeftConfig
from pretrain.model import ModelArgs, build_model
from pretrain.quantize import is_nf4, nf4_bytes, nf4_bytes_per_parameter, nf4_weights, quantize_nf4

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao (the qlora extra)")

# configs/model/debug.yaml's shape, its vocabulary the 512 pieces of the test tokenizer and 2 layers: every block
# weight a multiple of 64 * 256 values (wk, wv 256 x 128; w1, w3 704 x 256)
ARGS = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64, max_seq_len=64)


def relative_rms(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """RMS of `approx - exact` over the RMS of `exact`."""
    return math.sqrt(float((approx.double() - exact.double()).square().mean() / exact.double().square().mean()))


def flat(tensors) -> torch.Tensor:
    """The tensors as one vector."""
    return torch.cat([t.detach().flatten() for t in tensors])


def tokens(batch: int = 2, seq: int = 48, seed: int = 0) -> torch.Tensor:
    """Random token ids."""
    return torch.randint(0, ARGS.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_with_block_weights(model, change) -> torch.Tensor:
    """The logits of a copy of `model` whose block weights are `change(weight)`, computed in fp32."""
    other = copy.deepcopy(model)
    for name, p in other.named_parameters():
        if p.ndim == 2 and name.startswith("layers."):
            p.copy_(change(p))
    return other(tokens())


def stored(p: torch.Tensor) -> list[torch.Tensor]:
    """What a weight stores: an NF4 one its data, scales, their scales and mean, and levels; a plain one itself."""
    if is_nf4(p):
        names, _ = p.__tensor_flatten__()
        return [getattr(p, name) for name in names]
    return [p.detach()]


def test_nf4_weights_take_half_a_byte_plus_scales_and_keep_their_names():
    model = build_model(ARGS)
    names_before = [name for name, _ in model.named_parameters()]
    others = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("layers.")}
    quantized = quantize_nf4(model)
    assert [name for name, _ in model.named_parameters()] == names_before
    assert sorted(quantized) == sorted(nf4_weights(model)) and len(quantized) == 7 * ARGS.n_layers
    blocks = [name for name, _ in model.named_parameters() if name.startswith("layers.")]
    assert [name for name in blocks if not name.endswith("norm.weight")] == quantized
    for name, p in model.named_parameters():  # embeddings, final norm and output as they were
        if name in others:
            assert torch.equal(p, others[name]) and type(p) is torch.nn.Parameter
    numel = sum(p.numel() for p in nf4_weights(model).values())
    per_parameter = nf4_bytes(model) / numel
    assert 0.5 < per_parameter < 0.6
    # the arithmetic: 4 bits, an int8 scale per 64 values, an fp32 scale per 64 * 256 (QLoRA: 0.127 bits of
    # constants), plus per tensor the mean of its scales (4 bytes) and the 16 levels (64 bytes)
    assert nf4_bytes(model) == pytest.approx(numel * nf4_bytes_per_parameter() + len(quantized) * 68, abs=1)
    assert 8 * (nf4_bytes_per_parameter() - 0.5) == pytest.approx(0.127, abs=0.001)
    with pytest.raises(ValueError, match="quantized already"):
        quantize_nf4(model)


@torch.no_grad()
def test_dequantized_weights_are_within_nf4_rounding_of_the_originals():
    base = build_model(ARGS)
    model = copy.deepcopy(base)
    quantize_nf4(model)
    for name, weight in nf4_weights(model).items():
        original = base.get_parameter(name).flatten().view(-1, 64)  # (blocks, 64)
        dequantized = weight.get_original_weight().flatten().view(-1, 64)
        half_gap = float(weight.nf4.sort().values.diff().max()) / 2  # 0.152: between -1 and -0.696
        exact_scale = original.abs().amax(dim=1)  # each block's absmax
        scale = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor, 256)
        # double quantization: a scale is its block-of-256's mean plus int8 steps of (largest deviation / 128)
        deviation = (exact_scale - exact_scale.mean()).view(-1, 256).abs().amax(dim=1, keepdim=True)
        assert ((scale - exact_scale).view(-1, 256).abs() <= deviation / 128 * (1 + 1e-4)).all(), name
        # a value rounds to the nearest level of its block: off by at most half the largest gap times the block's
        # absmax, plus the error of the double-quantized scale it is multiplied by (|level| <= 1)
        bound = half_gap * exact_scale + (scale - exact_scale).abs()
        assert ((dequantized - original).abs() <= bound[:, None] * (1 + 1e-5)).all(), name
        assert 0.08 < relative_rms(dequantized, original) < 0.1, name  # NF4 on normal weights: ~0.092


@torch.no_grad()
def test_nf4_logits_err_more_than_bf16s_as_their_weight_error_predicts():
    base = build_model(ARGS).eval()
    reference = base(tokens())
    bf16 = copy.deepcopy(base).to(torch.bfloat16)(tokens()).float()
    model = copy.deepcopy(base)
    quantize_nf4(model)
    nf4 = model(tokens())
    weights = [base.get_parameter(name) for name in nf4_weights(model)]
    nf4_weight_error = relative_rms(flat(w.get_original_weight() for w in nf4_weights(model).values()), flat(weights))
    # the model's sensitivity to noise in its block weights, measured with a small one: those weights rounded
    # to bf16 (computed in fp32). The logits move in proportion to a weight error that size or NF4's (Gaussian
    # noise of NF4's RMS moves them by 0.153, NF4 itself by 0.164), so NF4's weight error predicts its logits'.
    rounded = logits_with_block_weights(base, lambda w: w.bfloat16().float())
    bf16_weight_error = relative_rms(flat(w.bfloat16() for w in weights), flat(weights))
    sensitivity = relative_rms(rounded, reference) / bf16_weight_error  # measured 1.81 (2 layers; 4: 2.2)
    predicted = sensitivity * nf4_weight_error
    error, bf16_error = relative_rms(nf4, reference), relative_rms(bf16, reference)
    print(f"logits relative RMS error: NF4 {error:.4f} (predicted {predicted:.4f}), bf16 model {bf16_error:.5f}")
    assert 10 * bf16_error < error < 1.5 * predicted  # measured: 10 * 0.0068 < 0.164 < 1.5 * 0.166
    assert 0.5 * predicted < error


def test_lora_on_an_nf4_base_learns_and_leaves_the_base_bit_identical():
    model = build_model(ARGS)
    trainable = apply_adapters(model, PeftConfig(method="lora", rank=8, alpha=16.0, targets=list(LORA_TARGETS)))
    quantize_nf4(model)  # after apply_adapters: LoraLinear's frozen `.weight` becomes NF4 under its own name
    frozen = {name: p for name, p in model.named_parameters() if name not in trainable}
    before = {name: [t.clone() for t in stored(p)] for name, p in frozen.items()}
    params = [model.get_parameter(name) for name in trainable]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    batch = tokens(4, 33, seed=3)
    losses = []
    for _ in range(8):
        loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        assert all(p.grad is None for p in frozen.values())
        assert all(p.grad is not None for p in params)
        assert all(p.grad.abs().sum() > 0 for name, p in zip(trainable, params) if losses or name.endswith("B"))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses  # measured 6.28 -> 4.48
    for name, p in frozen.items():
        assert all(torch.equal(a, b) for a, b in zip(before[name], stored(p))), name
    # the other order, quantize then apply_adapters, is the same model: the same logits for the same adapter
    other = build_model(ARGS)
    quantize_nf4(other)
    assert apply_adapters(other, PeftConfig(method="lora", rank=8, alpha=16.0, targets=list(LORA_TARGETS))) == trainable
    other.load_state_dict(adapter_state_dict(model), strict=False)
    with torch.no_grad():
        assert torch.equal(other(batch), model(batch))


def test_llama_backward_on_an_nf4_base_gives_the_lora_gradients_of_autograd():
    from pretrain.llama_backward import apply_llama_backward

    model = build_model(ARGS)
    apply_adapters(model, PeftConfig(method="lora", rank=8, alpha=16.0, targets=list(LORA_TARGETS)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    quantize_nf4(model)
    handwritten = copy.deepcopy(model)
    apply_llama_backward(handwritten)  # activation_checkpointing=llama: its Function dequantizes the weights
    batch = tokens(2, 33)
    for m in (model, handwritten):
        m(batch[:, :-1], batch[:, 1:]).backward()
    for (name, p), q in zip(model.named_parameters(), handwritten.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert p.grad is None and q.grad is None


def test_shapes_nf4_cannot_block_are_refused_by_name_before_anything_changes():
    model = build_model(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=64))
    with pytest.raises(ValueError, match=r"16384 .* not so for layers\.0\.attention\.wq \(64, 64\)"):
        quantize_nf4(model)
    assert not nf4_weights(model)
    with pytest.raises(ValueError, match=r"for \S+\.wk \(32, 64\), \S+\.wv \(32, 64\): choose"):
        quantize_nf4(model, block_size=64, scaler_block_size=64)  # wq (64 x 64) fits blocks of 64 * 64; wk, wv not
    assert not nf4_weights(model)
    assert len(quantize_nf4(model, block_size=16, scaler_block_size=64)) == 7  # 1024 divides every weight


def test_generate_with_an_nf4_base(tiny_data, tmp_path, capsys):
    from pretrain.__main__ import main
    from pretrain.convert import import_weights
    from pretrain.generate import load_for_inference

    base = build_model(ARGS)
    meta = tmp_path / "meta"  # Meta's release layout, which `import` reads
    meta.mkdir()
    params = {k: getattr(ARGS, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")}
    (meta / "params.json").write_text(json.dumps({**params, "norm_eps": ARGS.norm_eps}))
    torch.save(base.state_dict(), meta / "consolidated.00.pth")
    (meta / "tokenizer.model").write_bytes(tiny_data["tokenizer"].read_bytes())
    folder = import_weights(meta, tmp_path / "ours", max_seq_len=ARGS.max_seq_len)
    assert main(["generate", str(folder), "The history of", "--max-new-tokens=8", "--quantize=nf4"]) in (0, None)
    out = capsys.readouterr().out
    assert "--- 14 block weights quantized to NF4: 5.6 MiB -> 0.7 MiB" in out
    assert "--- 'The history of' (8 new tokens) temperature 0.8, top-p 0.9, seed 0\nThe history of" in out
    model = load_for_inference(folder)
    quantize_nf4(base)
    with torch.no_grad():
        reference = model(tokens())
        quantize_nf4(model)
        assert torch.equal(model(tokens()), base(tokens()))  # the same NF4 model as the one built in memory
        assert 0.1 < relative_rms(model(tokens()), reference) < 0.25  # 0.164, as in the test of the logits above


def test_qlora_run_trains_on_an_nf4_base_resumes_exactly_and_generates_on_the_same_base(tiny_data, tmp_path, capsys):
    from conftest import assert_resumes_exactly, tiny_config
    from pretrain.__main__ import main
    from pretrain.generate import load_for_inference
    from pretrain.parallel import build_strategy

    # NF4 blocks of 64 x 256 values: dim 128 with 4 kv heads, a feed-forward of 384
    shape = ["model.dim=128", "model.n_kv_heads=4", "model.multiple_of=128"]
    common = [*shape, "peft.method=lora", "peft.quantize=nf4", "optim.lr=1e-2"]
    cfg = tiny_config(tiny_data, tmp_path / "straight", *common)
    model = build_strategy(cfg).build_model(cfg)
    assert len(nf4_weights(model)) == 7 * cfg.model.n_layers
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n in dict(model.named_parameters()) if n.endswith(("lora_A", "lora_B"))
    ]
    assert_resumes_exactly(tiny_data, tmp_path, *common)
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-00000004"
    loaded = load_for_inference(checkpoint)  # the adapter on the same 4-bit base it learnt on
    assert len(nf4_weights(loaded)) == 7 * cfg.model.n_layers
    capsys.readouterr()
    assert main(["generate", str(checkpoint), "The", "--max-new-tokens", "3", "--quantize", "nf4"]) == 0
    assert "the base is NF4 already" in capsys.readouterr().out
