"""LLaMA's hand-written transformer-block backward (LLaMA-1 section 2.4), activation checkpointing `llama`.

"We save the activations that are expensive to compute, such as the outputs of linear layers ... by
manually implementing the backward function for the transformer layers, instead of relying on the
PyTorch autograd." The block is one `torch.autograd.Function` that keeps, per token:

    x (block input), q k v (outputs of wq wk wv, before RoPE), the attention output with its
    logsumexp, h (the residual after attention), a and b (outputs of w1 and w3)

and recomputes in the backward what is cheap: both RMSNorms, RoPE on q and k, the key/value repeat
of grouped-query attention, and the SwiGLU product silu(a) * b. Attention goes through the fused
SDPA kernels (flash on GPU, the flash CPU kernel on CPU), which never materialise the T x T scores;
their backward takes the saved output and logsumexp, so attention is not recomputed either.

The forward is op for op the one of `pretrain.model.TransformerBlock`, so losses match the autograd
model; under autocast the matmuls, RoPE and attention run in the autocast dtype as they do there.

Under tensor + sequence parallelism (`pretrain.parallel.tensor_parallel`) the same Function runs on
this rank's weight shards and sequence slice and issues the collectives itself (`SequenceCollectives`),
as Megatron-LM's and xformers' sequence-parallel matmuls do; see `LlamaBlockFunction`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from pretrain.model import TransformerBlock, apply_rope, heads_first, rms_norm

aten = torch.ops.aten


def _rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `rms_norm` for input and weight, recomputing the normalised input in fp32; the weight's in
    fp32 too (the caller sums it over tensor-parallel ranks, then casts it to the weight's dtype)."""
    compute = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for float64 checks
    xf = x.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    dyf = dy.to(compute)
    dweight = (dyf * xhat.type_as(x).to(compute)).flatten(0, -2).sum(0)
    dxhat = dyf * weight.to(compute)
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx.type_as(x), dweight


def _rope_backward(dy: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """RoPE is a rotation per pair: its gradient is the rotation by the opposite angle."""
    return apply_rope(dy, cos_sin * cos_sin.new_tensor([1.0, -1.0]))


def on_cpu(t: torch.Tensor) -> bool:
    """Whether attention takes the CPU kernels (the layout planner counts a CPU run on `meta` as one)."""
    return t.device.type == "cpu"


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple]:
    """Causal attention through SDPA's fused kernels; returns output, tensors and values for the backward."""
    if on_cpu(q):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        return out, (lse,), ()
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            "activation_checkpointing=llama on GPU needs bf16 or fp16 (flash attention); set train.precision"
        )
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)
    return out, (lse, cum_q, cum_k, seed, offset), (max_q, max_k)


def _attention_backward(dout, q, k, v, out, tensors: tuple, values: tuple):
    """dq, dk, dv of `_attention` from its saved output and logsumexp: the scores are not recomputed
    beyond what the fused backward kernel itself does tile by tile."""
    if on_cpu(q):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, tensors[0], 0.0, True)
    lse, cum_q, cum_k, seed, offset = tensors
    max_q, max_k = values
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset
    )


def _input_grad(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """For y = x @ weight.T: dx, in dy's dtype."""
    return dy @ weight.to(dy.dtype)


def _weight_grad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """For y = x @ weight.T: dweight, in the weight's dtype."""
    return (dy.flatten(0, -2).t() @ x.flatten(0, -2)).to(weight.dtype)


class SequenceCollectives:
    """The tensor-parallel group's collectives along the sequence dimension of (batch, seq, dim) tensors.

    With no group (one rank) every collective is the identity, so the block below is the same code with
    and without tensor parallelism. `gather` all-gathers each rank's slice of the sequence into the whole
    sequence; `scatter` sums the ranks' partial (batch, seq, dim) tensors and leaves each rank its slice
    (a reduce-scatter); `all_reduce` sums a tensor over the group. Each returns a `Pending` whose
    `wait()` gives the result: the collective runs while the caller computes something else.
    """

    def __init__(self, group=None):
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)

    def gather(self, t: torch.Tensor) -> Pending:
        if self.size == 1:
            return Pending(t)
        out = t.new_empty((self.size * t.shape[0], *t.shape[1:]))  # (ranks x batch, seq / ranks, dim): on dim 0
        work = dist.all_gather_single(out, t.contiguous(), group=self.group, async_op=True)
        return Pending(out, work, lambda o: o.unflatten(0, (self.size, -1)).movedim(0, 1).flatten(1, 2))

    def scatter(self, t: torch.Tensor) -> Pending:
        if self.size == 1:
            return Pending(t)
        parts = t.unflatten(1, (self.size, -1)).movedim(1, 0).flatten(0, 1)  # (ranks x batch, seq / ranks, dim)
        out = t.new_empty((t.shape[0], *parts.shape[1:]))
        return Pending(out, dist.reduce_scatter_single(out, parts.contiguous(), group=self.group, async_op=True))

    def all_reduce(self, t: torch.Tensor) -> Pending:
        if self.size == 1:
            return Pending(t)
        return Pending(t, dist.all_reduce(t, group=self.group, async_op=True))


class Pending:
    """A collective's result once `wait()` returns (at once when nothing was sent)."""

    def __init__(self, out: torch.Tensor, work=None, finish=None):
        self.out, self.work, self.finish = out, work, finish

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.finish(self.out) if self.finish is not None else self.out


class LlamaBlockFunction(torch.autograd.Function):
    """One LLaMA transformer block with LLaMA's hand-written backward (see the module docstring).

    Under tensor + sequence parallelism (`comm` with a group of T ranks) the weights are this rank's
    shards, as Megatron-LM splits them: wq wk wv w1 w3 by output rows (its heads, its slice of the
    feed-forward), wo w2 by input columns; the norms whole. The block's input and output are this
    rank's slice of the sequence. The forward all-gathers the normed input before the column-parallel
    matmuls and reduce-scatters the outputs of the row-parallel ones; the backward all-gathers the
    incoming gradient where the forward reduce-scattered, reduce-scatters the input gradients where it
    all-gathered, and all-reduces the norms' weight gradients. Only sequence slices (x, h) and this
    rank's heads and feed-forward slice (q k v, attention output, a, b) are kept: the gathered normed
    inputs are gathered again in the backward, each gather started before the input-gradient matmuls
    it overlaps, each reduce-scatter before the weight-gradient matmuls it overlaps.
    """

    @staticmethod
    def forward(ctx, x, cos_sin, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, eps, head_dim, dtype, comm):
        bsz = x.shape[0]
        xn = comm.gather(rms_norm(x, attn_norm, eps).to(dtype)).wait()  # (batch, seq, dim): the whole sequence
        seqlen = xn.shape[1]
        q = F.linear(xn, wq.to(dtype)).view(bsz, seqlen, -1, head_dim)  # this rank's heads
        k = F.linear(xn, wk.to(dtype)).view(bsz, seqlen, -1, head_dim)
        v = F.linear(xn, wv.to(dtype)).view(bsz, seqlen, -1, head_dim)
        out, tensors, values = _attention(*heads_first(q, k, v, cos_sin))
        h = x + comm.scatter(F.linear(out.transpose(1, 2).reshape(bsz, seqlen, -1), wo.to(dtype))).wait()
        hn = comm.gather(rms_norm(h, ffn_norm, eps).to(dtype)).wait()
        a, b = F.linear(hn, w1.to(dtype)), F.linear(hn, w3.to(dtype))
        y = h + comm.scatter(F.linear(F.silu(a) * b, w2.to(dtype))).wait()
        ctx.save_for_backward(
            x, q, k, v, out, h, a, b, cos_sin, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, *tensors
        )
        ctx.eps, ctx.dtype, ctx.values, ctx.comm = eps, dtype, values, comm
        return y

    @staticmethod
    def backward(ctx, dy):
        x, q, k, v, out, h, a, b, cos_sin, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, *tensors = ctx.saved_tensors
        eps, dtype, comm = ctx.eps, ctx.dtype, ctx.comm
        bsz, seqlen = q.shape[:2]
        # feed-forward, y = h + w2(silu(a) * b): recompute the SwiGLU product and the norm
        dy_c = comm.gather(dy.to(dtype)).wait()
        hn_pending = comm.gather(rms_norm(h, ffn_norm, eps).to(dtype))  # gathered again, while dg and dw2 run
        silu_a = F.silu(a)  # as in the forward, bit for bit
        g = silu_a * b
        dg = _input_grad(dy_c, w2)
        dw2 = _weight_grad(dy_c, g, w2)
        da = aten.silu_backward(dg * b, a)
        db = dg * silu_a
        dhn = comm.scatter(_input_grad(da, w1).float() + _input_grad(db, w3).float())  # sum in fp32
        hn = hn_pending.wait()
        dw1, dw3 = _weight_grad(da, hn, w1), _weight_grad(db, hn, w3)  # while the input gradient is scattered
        dh_norm, dffn_norm = _rms_norm_backward(dhn.wait(), h, ffn_norm, eps)
        dffn_norm = comm.all_reduce(dffn_norm)
        dh = dy + dh_norm
        # attention, h = x + wo(attention(rope(q), rope(k), v)): recompute RoPE, the repeat and the norm
        dh_c = comm.gather(dh.to(dtype)).wait()
        xn_pending = comm.gather(
            rms_norm(x, attn_norm, eps).to(dtype)
        )  # gathered again, while attention's backward runs
        attn_out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        dout = _input_grad(dh_c, wo).view(bsz, seqlen, -1, out.shape[-1]).transpose(1, 2)
        dwo = _weight_grad(dh_c, attn_out, wo)
        qr, kr, vr = heads_first(q, k, v, cos_sin)
        dqr, dkr, dvr = _attention_backward(dout, qr, kr, vr, out, tuple(tensors), ctx.values)
        dqr, dkr, dvr = (t.transpose(1, 2) for t in (dqr, dkr, dvr))  # (batch, seq, heads, dim)
        n_kv = k.shape[2]
        if n_kv != q.shape[2]:  # each kv head served n_heads // n_kv query heads: sum their gradients
            dkr = dkr.unflatten(2, (n_kv, -1)).sum(3)
            dvr = dvr.unflatten(2, (n_kv, -1)).sum(3)
        dq, dk = _rope_backward(dqr, cos_sin).flatten(2).to(dtype), _rope_backward(dkr, cos_sin).flatten(2).to(dtype)
        dv = dvr.flatten(2).to(dtype)
        dxn = comm.scatter(_input_grad(dq, wq).float() + _input_grad(dk, wk).float() + _input_grad(dv, wv).float())
        xn = xn_pending.wait()
        dwq, dwk, dwv = _weight_grad(dq, xn, wq), _weight_grad(dk, xn, wk), _weight_grad(dv, xn, wv)
        dx_norm, dattn_norm = _rms_norm_backward(dxn.wait(), x, attn_norm, eps)
        dx = dh + dx_norm
        dattn_norm = comm.all_reduce(dattn_norm)
        dattn_norm, dffn_norm = dattn_norm.wait().to(attn_norm.dtype), dffn_norm.wait().to(ffn_norm.dtype)
        weights = (dattn_norm, dwq, dwk, dwv, dwo, dffn_norm, dw1, dw2, dw3)
        return dx, None, *weights, None, None, None, None


def llama_block_forward(
    block: TransformerBlock, x: torch.Tensor, cos_sin: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`block.forward` through `LlamaBlockFunction` (the autocast dtype, if any, for matmuls).

    Under tensor parallelism the weights are DTensors on the tensor-parallel mesh: the block takes their
    local shards and issues the collectives of that mesh's group itself; `x` is this rank's slice of the
    sequence."""
    if mask is not None:
        raise ValueError("activation_checkpointing=llama does not support data.document_attention yet")
    attn, ffn = block.attention, block.feed_forward
    weights = [
        block.attention_norm.weight,
        attn.wq.weight,
        attn.wk.weight,
        attn.wv.weight,
        attn.wo.weight,
        block.ffn_norm.weight,
        ffn.w1.weight,
        ffn.w2.weight,
        ffn.w3.weight,
    ]
    group = None
    if isinstance(weights[1], DTensor):  # tensor parallel: this rank's shards, the mesh's group
        group = weights[1].device_mesh.get_group()
        weights = [w.to_local() for w in weights]
    comm = SequenceCollectives(group)
    device = x.device.type  # `meta` has no autocast: there the weights' dtype is the compute dtype
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else weights[1].dtype
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        return LlamaBlockFunction.apply(x, cos_sin, *weights, block.attention_norm.eps, attn.head_dim, dtype, comm)


def apply_llama_backward(model: nn.Module) -> None:
    """Route every transformer block of `model` through the hand-written backward."""
    for block in model.layers:
        block.forward = functools.partial(llama_block_forward, block)
