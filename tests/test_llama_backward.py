"""LLaMA's hand-written block backward against autograd: float64 gradcheck, fp32 and bf16 gradients, with
document attention (a block-diagonal causal mask) and with LoRA."""

import json
import os

import pytest
import torch

import pretrain.llama_backward as lb
from pretrain.adapters import apply_adapters
from pretrain.config import LORA_TARGETS, Checkpointing, PeftConfig
from pretrain.llama_backward import LlamaBlockFunction, SequenceCollectives, llama_block_forward
from pretrain.model import ModelArgs, TransformerBlock, build_model, document_mask, rope_cos_sin
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing

# position ids of two rows of 31 tokens holding several documents each: three in the first row; in the second
# the tail of a document begun in an earlier sample (positions 5..14), then one more
POSITIONS = torch.tensor([[*range(10), *range(12), *range(9)], [*range(5, 15), *range(21)]])


def block_weights(block: TransformerBlock) -> list[torch.Tensor]:
    a, f = block.attention, block.feed_forward
    return [
        *(block.attention_norm.weight, a.wq.weight, a.wk.weight, a.wv.weight, a.wo.weight),
        *(block.ffn_norm.weight, f.w1.weight, f.w2.weight, f.w3.weight),
    ]


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_gradcheck_in_float64(n_kv_heads):
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=16, multiple_of=8, max_seq_len=8)
    torch.manual_seed(0)
    block = TransformerBlock(0, args).double()
    for p in block.parameters():
        p.data.normal_(0, 0.3)  # norms too, so their gradients are checked away from 1
    cos_sin = rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta).double()[:6]
    x = torch.randn(2, 6, 32, dtype=torch.float64, requires_grad=True)

    def block_fn(x, *weights):
        return LlamaBlockFunction.apply(
            x, cos_sin, *weights, args.norm_eps, args.head_dim, torch.float64, SequenceCollectives()
        )

    assert torch.autograd.gradcheck(block_fn, (x, *block_weights(block)))


def model_grads(mode: str, n_kv_heads: int, dtype=None, positions=None, targets=None):
    """Loss and every parameter's gradient (None for a frozen one) of a debug model under checkpointing `mode`;
    with `positions`, document attention; with `targets`, LoRA on them (B random, so the update matters)."""
    args = ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=128, multiple_of=16, max_seq_len=32
    )
    model = build_model(args, seed=3)
    if targets is not None:
        apply_adapters(model, PeftConfig(method="lora", rank=4, alpha=8, targets=targets))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".lora_B"):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    apply_activation_checkpointing(model, Checkpointing(mode))
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits = model(tokens[:, :-1], positions=positions)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("positions", [None, POSITIONS], ids=["causal", "documents"])
@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_gradients_equal_autograd_in_fp32_and_bf16(n_kv_heads, positions):
    loss, grads = model_grads("none", n_kv_heads, positions=positions)
    llama_loss, llama_grads = model_grads("llama", n_kv_heads, positions=positions)
    assert llama_loss == loss  # the same forward, op for op
    for name, grad in grads.items():
        torch.testing.assert_close(llama_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    if positions is not None:  # the documents change the loss: the mask is in the forward
        assert loss != model_grads("none", n_kv_heads)[0]
    loss, grads = model_grads("none", n_kv_heads, torch.bfloat16, positions)
    llama_loss, llama_grads = model_grads("llama", n_kv_heads, torch.bfloat16, positions)
    torch.testing.assert_close(llama_loss, loss, atol=1e-2, rtol=0)
    for name, grad in grads.items():  # bf16 matmuls: relative to the gradient's scale
        assert (llama_grads[name] - grad).norm() <= 0.03 * grad.norm() + 1e-6, name


def test_llama_mode_keeps_linear_outputs_and_recomputes_no_matmul_of_the_forward():
    from test_model import backward_op_counts

    none, llama = backward_op_counts("none"), backward_op_counts("llama")
    assert llama["mm"] == none["mm"]  # the backward's own matmuls only
    assert not [k for k in llama if k.startswith("_scaled_dot_product") and not k.endswith("backward")]
    assert llama["rsqrt"] > none["rsqrt"] == 0  # the norms are recomputed


def test_each_norm_backward_gets_its_partial_gradients_summed_in_fp32(monkeypatch):
    # under bf16 the input gradients of w1 and w3 (into the FFN norm) and of wq, wk and wv (into the
    # attention norm) are bf16; their sum must be taken in fp32. A bf16 sum loses their low bits and
    # still passes the 3% comparison with autograd above (which itself sums in bf16), so it is pinned here.
    partials, norm_inputs = {}, []
    input_grad, rms_norm_backward = lb._input_grad, lb._rms_norm_backward

    def recording_input_grad(dy, weight):
        dx = input_grad(dy, weight)
        partials[weight.data_ptr()] = dx
        return dx

    def recording_rms_norm_backward(dy, x, weight, eps):
        norm_inputs.append(dy)
        return rms_norm_backward(dy, x, weight, eps)

    monkeypatch.setattr(lb, "_input_grad", recording_input_grad)
    monkeypatch.setattr(lb, "_rms_norm_backward", recording_rms_norm_backward)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, multiple_of=16, max_seq_len=16)
    torch.manual_seed(0)
    block = TransformerBlock(0, args)
    weights = block_weights(block)
    cos_sin = rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta)
    x = torch.randn(2, 16, 64, requires_grad=True)
    y = LlamaBlockFunction.apply(
        x, cos_sin, *weights, args.norm_eps, args.head_dim, torch.bfloat16, SequenceCollectives()
    )
    y.backward(torch.randn_like(y))

    a, f = block.attention, block.feed_forward
    ffn_parts = [partials[w.weight.data_ptr()] for w in (f.w1, f.w3)]
    attention_parts = [partials[w.weight.data_ptr()] for w in (a.wq, a.wk, a.wv)]
    assert all(p.dtype == torch.bfloat16 for p in ffn_parts + attention_parts)
    ffn_in, attention_in = norm_inputs  # the backward meets the FFN norm first
    for received, parts in ((ffn_in, ffn_parts), (attention_in, attention_parts)):
        fp32_sum = sum(p.float() for p in parts)
        assert received.dtype == torch.float32
        assert torch.equal(received, fp32_sum)
        assert not torch.equal(received, sum(parts).float())  # the case is one where a bf16 sum differs


def document_bias(positions: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The model's additive document mask (batch, 1, seq, seq) for `positions`."""
    allowed = document_mask(positions)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def test_gradcheck_with_documents_and_lora_in_float64():
    # the base weights frozen, as LoRA leaves them: their gradients are skipped, A's and B's are checked
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, multiple_of=8, max_seq_len=8)
    torch.manual_seed(0)
    block = TransformerBlock(0, args).double().requires_grad_(False)
    for p in block.parameters():
        p.normal_(0, 0.3)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [3, 4, 0, 1, 2, 3]])
    cos_sin = rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta).double()[positions]
    mask = document_bias(positions, torch.float64)
    scalings = (2.0, None, 2.0, None, None, 2.0, None)  # wq, wv and w2 adapted
    a, f = block.attention, block.feed_forward
    lora = []
    for w in (a.wq.weight, a.wv.weight, f.w2.weight):  # A (rank, in), B (out, rank)
        lora += [torch.randn(2, w.shape[1], dtype=torch.float64), torch.randn(w.shape[0], 2, dtype=torch.float64)]
    lora = [t.mul_(0.3).requires_grad_() for t in lora]
    x = torch.randn(2, 6, 32, dtype=torch.float64, requires_grad=True)

    def block_fn(x, *lora):
        return LlamaBlockFunction.apply(
            *(x, cos_sin, *block_weights(block), args.norm_eps, args.head_dim, torch.float64),
            *(SequenceCollectives(), mask, scalings, *lora),
        )

    assert torch.autograd.gradcheck(block_fn, (x, *lora))


def test_document_attention_block_equals_each_document_alone_and_needs_the_mask_in_its_backward(monkeypatch):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, multiple_of=16, max_seq_len=32)
    torch.manual_seed(0)
    block = TransformerBlock(0, args)
    for p in block.parameters():
        p.data.normal_(0, 0.2)  # the norms too, so their gradients are checked away from 1
    table = rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta)
    positions = torch.tensor([[*range(5), *range(7), *range(4)], [*range(3, 8), *range(11)]])
    x, dy = torch.randn(2, 16, 64), torch.randn(2, 16, 64)

    def run(x, positions, dy, mask):
        """Output, input gradient and weight gradients of the hand-written block."""
        block.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        y = llama_block_forward(block, x, table[positions], mask)
        y.backward(dy)
        return y.detach(), x.grad, [p.grad.clone() for p in block.parameters()]

    y, dx, grads = run(x, positions, dy, document_bias(positions))
    # each document (or tail of one) alone, plain causal attention: its outputs, its input gradients and its
    # share of the weight gradients
    alone_y, alone_dx = torch.empty_like(y), torch.empty_like(dx)
    alone_grads = [torch.zeros_like(g) for g in grads]
    for row in range(2):
        starts = sorted({0, *(positions[row] == 0).nonzero().flatten().tolist()})
        for start, end in zip(starts, [*starts[1:], 16]):
            part = (slice(row, row + 1), slice(start, end))
            y_doc, dx_doc, grads_doc = run(x[part], positions[part], dy[part], None)
            alone_y[part], alone_dx[part] = y_doc, dx_doc
            alone_grads = [total + g for total, g in zip(alone_grads, grads_doc)]
    torch.testing.assert_close(y, alone_y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx, alone_dx, atol=1e-6, rtol=1e-5)
    for g, alone in zip(grads, alone_grads):
        torch.testing.assert_close(g, alone, atol=1e-5, rtol=1e-4)

    # the mask left out of attention's backward only: the same forward, gradients that cross documents
    attention_backward = lb._attention_backward
    monkeypatch.setattr(
        lb,
        "_attention_backward",
        lambda dout, q, k, v, out, mask, *rest: attention_backward(dout, q, k, v, out, None, *rest),
    )
    y_dropped, dx_dropped, grads_dropped = run(x, positions, dy, document_bias(positions))
    assert torch.equal(y_dropped, y)
    assert not torch.allclose(dx_dropped, alone_dx, atol=1e-3)
    assert not torch.allclose(grads_dropped[1], alone_grads[1], atol=1e-3)  # wq


def test_document_mask_on_the_gpu_branch_takes_the_memory_efficient_kernel():
    # on `meta` the block takes its CUDA branch (tests/test_gpu_paths.py): flash attention takes no mask, so the
    # memory-efficient kernel takes it as a bias, forward and backward once each; 13 tokens: rows not 8-aligned
    from test_gpu_paths import FLASH, FLASH_BACKWARD, RecordOps

    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, multiple_of=16, max_seq_len=16)
    with torch.device("meta"):
        block = TransformerBlock(0, args)
        cos_sin = rope_cos_sin(args.head_dim, 13, args.rope_theta).expand(2, 13, -1, -1)
        mask = torch.zeros(2, 1, 13, 13, dtype=torch.bfloat16)
        x = torch.randn(2, 13, 64, requires_grad=True)
    weights = block_weights(block)
    with RecordOps() as recorded:
        y = LlamaBlockFunction.apply(
            *(x, cos_sin, *weights, args.norm_eps, args.head_dim, torch.bfloat16, SequenceCollectives(), mask)
        )
        y.sum().backward()
    ops = recorded.ops
    assert ops.count("aten._scaled_dot_product_efficient_attention.default") == 1
    assert ops.count("aten._scaled_dot_product_efficient_attention_backward.default") == 1
    assert FLASH not in ops and FLASH_BACKWARD not in ops
    assert x.grad.shape == x.shape
    for w in weights:
        assert w.grad is not None and w.grad.shape == w.shape and w.grad.dtype == w.dtype


@pytest.mark.parametrize(
    "targets, positions", [(["wq", "wv", "w2"], None), (list(LORA_TARGETS), POSITIONS)], ids=["wq-wv-w2", "all-docs"]
)
def test_lora_gradients_equal_autograd_and_the_frozen_weights_get_none(targets, positions, monkeypatch):
    loss, grads = model_grads("none", 2, positions=positions, targets=targets)
    weight_grad, weighted = lb._weight_grad, []

    def recording_weight_grad(dy, x, weight):
        weighted.append(weight)
        return weight_grad(dy, x, weight)

    monkeypatch.setattr(lb, "_weight_grad", recording_weight_grad)
    llama_loss, llama_grads = model_grads("llama", 2, positions=positions, targets=targets)
    assert llama_loss == loss  # the same forward, op for op
    trained = {name for name, grad in grads.items() if grad is not None}
    assert trained == {name for name in grads if name.endswith((".lora_A", ".lora_B"))}
    assert len(trained) == 2 * 2 * len(targets)  # A and B of each target, in each of the 2 layers
    assert {name for name, grad in llama_grads.items() if grad is not None} == trained  # the base: none
    for name in trained:
        assert llama_grads[name].abs().max() > 0, name
        torch.testing.assert_close(llama_grads[name], grads[name], atol=1e-6, rtol=1e-4, msg=name)
    # no matmul for a frozen weight's gradient: the hand-written backward computes A's and B's only
    assert len(weighted) == len(trained) and all(w.requires_grad for w in weighted)


def test_lora_dropout_is_refused_while_training_under_llama():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=32)
    model = build_model(args)
    apply_adapters(model, PeftConfig(method="lora", rank=4, alpha=8, dropout=0.1, targets=["wq"]))
    apply_activation_checkpointing(model, Checkpointing.llama)
    tokens = torch.randint(0, 128, (2, 16))
    with pytest.raises(ValueError, match="peft.dropout=0"):
        model(tokens)
    model.eval()  # no dropout in evaluation: the block runs
    assert model(tokens).shape == (2, 16, 128)


def _tensor_parallel_worker(rank: int, port: int, out) -> None:
    """The hand-written block split over 2 ranks with a document mask, against the unsplit block's autograd."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from pretrain.parallel.tensor_parallel import block_plan

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    args = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=16, multiple_of=16, max_seq_len=32)
    torch.manual_seed(0)
    whole = TransformerBlock(0, args)
    for p in whole.parameters():
        p.data.normal_(0, 0.2)
    positions = torch.tensor([[*range(5), *range(7), *range(4)], [*range(7, 10), *range(13)]])
    cos_sin = rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta)[positions]
    mask = document_bias(positions)
    x_all, dy_all = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    x = x_all.clone().requires_grad_()
    y = whole(x, cos_sin, mask)  # the whole block, the whole sequence, plain autograd
    y.backward(dy_all)
    split = copy.deepcopy(whole)
    split.zero_grad(set_to_none=True)
    parallelize_module(split, mesh, block_plan())
    mine = slice(rank * 8, (rank + 1) * 8)  # this rank's slice of the sequence
    x_mine = x_all[:, mine].clone().requires_grad_()
    y_mine = llama_block_forward(split, x_mine, cos_sin, mask)
    y_mine.backward(dy_all[:, mine])
    errors = {
        "output": (y_mine - y[:, mine]).abs().max().item(),
        "input": (x_mine.grad - x.grad[:, mine]).abs().max().item(),
    }
    for (name, p), q in zip(split.named_parameters(), whole.parameters()):
        errors[name] = ((p.grad.full_tensor() - q.grad).abs().max() / q.grad.abs().max()).item()
    (out / f"rank{rank}.json").write_text(json.dumps(errors))
    dist.destroy_process_group()


def test_document_attention_under_tensor_parallel_equals_the_unsplit_block(tmp_path):
    from test_distributed import free_port

    from conftest import run_ranks

    run_ranks(_tensor_parallel_worker, (free_port(), tmp_path), 2)
    for rank in range(2):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert max(errors.values()) <= 1e-5, errors
