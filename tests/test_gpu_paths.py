"""The GPU code paths exercised on the CPU.

On the `meta` device tensors take the non-CPU branch of device checks, so the hand-written block runs
its CUDA branch there: `aten._scaled_dot_product_flash_attention` and its backward, with their shape
and dtype checks (DESIGN §10). What only a real GPU can show (speed, NCCL, the kernels' values) is in
`bench/gpu_check.sh` and in the tests marked `gpu` at the end.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.config import Checkpointing
from pretrain.llama_backward import LlamaBlockFunction, SequenceCollectives
from pretrain.model import ModelArgs, Transformer, TransformerBlock, build_model, rope_cos_sin
from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing

FLASH = "aten._scaled_dot_product_flash_attention.default"
FLASH_BACKWARD = "aten._scaled_dot_product_flash_attention_backward.default"
FLASH_CPU = "aten._scaled_dot_product_flash_attention_for_cpu.default"
FLASH_CPU_BACKWARD = "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"


class RecordOps(TorchDispatchMode):
    """The aten ops dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def tiny_args(n_kv_heads: int) -> ModelArgs:
    return ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=128, multiple_of=16, max_seq_len=32
    )


def block_weights(block: TransformerBlock) -> list[torch.Tensor]:
    a, f = block.attention, block.feed_forward
    return [
        *(block.attention_norm.weight, a.wq.weight, a.wk.weight, a.wv.weight, a.wo.weight),
        *(block.ffn_norm.weight, f.w1.weight, f.w2.weight, f.w3.weight),
    ]


def run_block(device: str, n_kv_heads: int, dtype: torch.dtype, residual_dtype: torch.dtype = torch.float32):
    """One hand-written block forward and backward on `device`: (output, input grad, weights, ops)."""
    args = tiny_args(n_kv_heads)
    with torch.device(device):
        block = TransformerBlock(0, args)
        cos_sin = rope_cos_sin(args.head_dim, 16, args.rope_theta)
    weights = block_weights(block)
    x = torch.randn(2, 16, args.dim, device=device, dtype=residual_dtype, requires_grad=True)
    with RecordOps() as recorded:
        y = LlamaBlockFunction.apply(x, cos_sin, *weights, args.norm_eps, args.head_dim, dtype, SequenceCollectives())
        y.sum().backward()
    return y, x.grad, weights, recorded.ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_hand_written_block_runs_the_cuda_flash_branch_forward_and_backward(n_kv_heads, dtype):
    y, dx, weights, ops = run_block("meta", n_kv_heads, dtype)
    assert ops.count(FLASH) == 1 and ops.count(FLASH_BACKWARD) == 1  # attention is not recomputed
    assert FLASH_CPU not in ops and FLASH_CPU_BACKWARD not in ops
    assert y.shape == dx.shape == (2, 16, 64) and y.dtype == dx.dtype == torch.float32  # the residual stream
    for w in weights:  # every weight gets a gradient of its own shape and dtype (fp32 master weights)
        assert w.grad is not None and w.grad.shape == w.shape and w.grad.dtype == w.dtype


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_hand_written_block_on_the_cpu_takes_the_cpu_flash_kernel(n_kv_heads):
    _, _, _, ops = run_block("cpu", n_kv_heads, torch.float32)
    assert ops.count(FLASH_CPU) == 1 and ops.count(FLASH_CPU_BACKWARD) == 1
    assert FLASH not in ops and FLASH_BACKWARD not in ops


def test_hand_written_block_off_the_cpu_refuses_fp32_naming_the_setting():
    # flash attention has no fp32 kernel: the choice is refused with the setting to change, not a kernel error
    with pytest.raises(ValueError, match="needs bf16 or fp16.*train.precision"):
        run_block("meta", 2, torch.float32)


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_whole_model_with_llama_checkpointing_runs_on_the_gpu_branch_in_bf16(n_kv_heads):
    # as FSDP's bf16 policy runs it: bf16 parameters, so the residual stream is bf16 from the embedding on
    args = tiny_args(n_kv_heads)
    with torch.device("meta"):
        model = Transformer(args)
    for p in model.parameters():  # the parameters in bf16, the RoPE table (a buffer) in fp32
        p.data = p.data.to(torch.bfloat16)
    apply_activation_checkpointing(model, Checkpointing.llama)
    model.loss_chunk_tokens = 16  # the chunked loss on this path too
    tokens = torch.zeros(2, 31, dtype=torch.long, device="meta")
    with RecordOps() as recorded:
        loss = model(tokens, tokens)
        loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32
    assert recorded.ops.count(FLASH) == 2 and recorded.ops.count(FLASH_BACKWARD) == 2  # one per layer
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == torch.bfloat16, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_hand_written_block_on_cuda_matches_autograd_in_bf16(n_kv_heads):
    # the flash kernels' values: the same loss and gradients as autograd through SDPA, within bf16
    def grads(mode: str):
        model = build_model(tiny_args(n_kv_heads), "cuda", seed=3)
        apply_activation_checkpointing(model, Checkpointing(mode))
        tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss, reference = grads("none")
    llama_loss, llama = grads("llama")
    torch.testing.assert_close(llama_loss, loss, atol=1e-2, rtol=0)
    for name, grad in reference.items():
        assert (llama[name] - grad).norm() <= 0.03 * grad.norm() + 1e-6, name


def test_hand_written_block_under_tensor_parallel_runs_the_cuda_flash_branch_with_its_collectives():
    # 2 tensor-parallel ranks as PyTorch's own tests fake them (the `fake` backend: collectives that check
    # nothing and send nothing), on `meta`: the bf16 flash-attention branch with this rank's heads and
    # feed-forward slice, the sequence gathered and scattered around it, every weight gradient a shard
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from pretrain.parallel.collectives import CollectiveCounter

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        args = tiny_args(2)
        with torch.device("meta"):
            block = TransformerBlock(0, args)
            cos_sin = rope_cos_sin(args.head_dim, 16, args.rope_theta)
        split = {1: 0, 2: 0, 3: 0, 4: 1, 6: 0, 7: 1, 8: 0}  # weight index -> the dimension split over ranks
        weights = [
            (w.chunk(2, split[i])[0] if i in split else w).detach().requires_grad_()
            for i, w in enumerate(block_weights(block))
        ]
        x = torch.randn(2, 8, args.dim, device="meta", requires_grad=True)  # this rank's 8 of 16 positions
        comm = SequenceCollectives(dist.group.WORLD)
        with RecordOps() as recorded, CollectiveCounter() as counter:
            y = LlamaBlockFunction.apply(x, cos_sin, *weights, args.norm_eps, args.head_dim, torch.bfloat16, comm)
            y.sum().backward()
    finally:
        dist.destroy_process_group()
    assert recorded.ops.count(FLASH) == 1 and recorded.ops.count(FLASH_BACKWARD) == 1
    assert y.shape == x.grad.shape == (2, 8, 64)
    for w in weights:
        assert w.grad is not None and w.grad.shape == w.shape and w.grad.dtype == w.dtype
    calls = {kind: n for (_, kind), n in counter.calls.items()}
    assert calls == {"all_gather": 6, "reduce_scatter": 4, "all_reduce": 2}
