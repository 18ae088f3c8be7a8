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

With document attention (`data.document_attention`) the block takes the model's additive mask, causal
within each document: the CPU flash kernel takes it as it is, and on the GPU, where flash attention takes
no mask, the memory-efficient kernel takes it as a bias; both keep output and logsumexp for the backward,
which runs the same kernel's backward with the same mask. With LoRA (`pretrain.adapters.LoraLinear`) each
adapted projection adds its update scaling * (x A^T) B^T; x A^T (rank values per token) is kept, and the
backward gives A and B their gradients and skips the frozen base weights'.

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

from pretrain.adapters import LoraLinear
from pretrain.model import TransformerBlock, apply_rope, heads_first, rms_norm

aten = torch.ops.aten
NO_ADAPTERS = (None,) * 7  # the LoRA scalings of wq wk wv wo w1 w2 w3: none adapted


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


def _efficient_bias(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The additive mask (batch, 1, seq, seq) as the memory-efficient kernel takes its bias, as SDPA passes it:
    rows 8-element aligned (padded, then sliced back, when the sequence is not a multiple of 8), expanded over
    the heads (batch, heads, seq, seq) without a copy."""
    seq_k = mask.shape[-1]
    if seq_k % 8 or not mask.is_contiguous():
        mask = F.pad(mask, (0, -seq_k % 8))[..., :seq_k]
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple, tuple]:
    """Causal attention through SDPA's fused kernels, or with `mask` (batch, 1, seq, seq; additive, in q's dtype,
    -inf where not allowed) within documents; returns output, tensors and values for the backward."""
    if on_cpu(q):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, mask is None, attn_mask=mask)
        return out, (lse,), ()
    if mask is not None:  # flash attention takes no mask: the memory-efficient kernel takes it as a bias
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            q, k, v, _efficient_bias(mask, q, k), True, 0.0, False
        )
        return out, (lse, seed, offset), ()
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            "activation_checkpointing=llama on GPU needs bf16 or fp16 (flash attention); set train.precision"
        )
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)
    return out, (lse, cum_q, cum_k, seed, offset), (max_q, max_k)


def _attention_backward(dout, q, k, v, out, mask, tensors: tuple, values: tuple):
    """dq, dk, dv of `_attention` from its saved output and logsumexp, with the forward's mask: the scores are
    not recomputed beyond what the fused backward kernel itself does tile by tile."""
    if on_cpu(q):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, tensors[0], 0.0, mask is None, attn_mask=mask
        )
    if mask is not None:
        lse, seed, offset = tensors
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, _efficient_bias(mask, q, k), out, lse, seed, offset, 0.0, [True, True, True, False], False
        )
        return dq, dk, dv
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


def _adapters(scalings: tuple, lora: tuple) -> list[tuple | None]:
    """Per projection (wq wk wv wo w1 w2 w3): (A, B, scaling) of its LoRA update, or None without one; `lora`
    holds the A and B of the adapted projections, in that order."""
    pairs = iter(zip(lora[::2], lora[1::2]))
    return [None if scaling is None else (*next(pairs), scaling) for scaling in scalings]


def _linear(x: torch.Tensor, weight: torch.Tensor, adapter: tuple | None, dtype: torch.dtype):
    """x @ weight.T in `dtype`, plus the LoRA update scaling * (x @ A.T) @ B.T when `adapter` is (A, B, scaling),
    as `pretrain.adapters.LoraLinear` computes it; returns the output and u = x @ A.T (None without an adapter),
    (batch, seq, rank), kept for the backward."""
    y = F.linear(x, weight.to(dtype))
    if adapter is None:
        return y, None
    a, b, scaling = adapter
    u = F.linear(x, a.to(dtype))  # (batch, seq, rank)
    return y + F.linear(u, b.to(dtype)) * scaling, u


def _linear_input_grad(dy: torch.Tensor, weight: torch.Tensor, adapter: tuple | None):
    """For `_linear`: the parts of dx (the base weight's, then the adapter's) and du, the gradient of
    u = x @ A.T (None without an adapter)."""
    dx = _input_grad(dy, weight)
    if adapter is None:
        return [dx], None
    a, b, scaling = adapter
    du = _input_grad(dy * scaling, b)  # (batch, seq, rank)
    return [dx, _input_grad(du, a)], du


def _adapter_grads(dy: torch.Tensor, du, x: torch.Tensor, u, adapter: tuple | None) -> tuple:
    """dA and dB of `_linear`'s adapter, from du (`_linear_input_grad`), the input x and u = x @ A.T; none
    without an adapter."""
    if adapter is None:
        return ()
    a, b, scaling = adapter
    return _weight_grad(du, x, a), _weight_grad(dy, u * scaling, b)


def _sum(parts: list[torch.Tensor], fp32: bool = False) -> torch.Tensor:
    """The sum of a tensor's gradient parts; in fp32 (fp64 for float64 checks) when `fp32`: autocast casts a
    norm's output to the compute dtype once per matmul, and autograd sums the gradients behind those casts in
    fp32."""
    total = parts[0].to(torch.promote_types(parts[0].dtype, torch.float32)) if fp32 else parts[0]
    for part in parts[1:]:
        total = total + part.to(total.dtype)
    return total


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
    def forward(
        ctx,
        x,
        cos_sin,
        attn_norm,
        wq,
        wk,
        wv,
        wo,
        ffn_norm,
        w1,
        w2,
        w3,
        eps,
        head_dim,
        dtype,
        comm,
        mask=None,
        scalings=NO_ADAPTERS,
        *lora,
    ):
        """The block's output (batch, seq, dim). `mask`: None (causal) or the additive document mask
        (batch, 1, seq, seq) in `dtype`; `scalings`: the LoRA scaling of each of wq wk wv wo w1 w2 w3, None
        where not adapted; `lora`: the A (rank, in) and B (out, rank) of each adapted one, in that order."""
        lq, lk, lv, lo, l1, l2, l3 = _adapters(scalings, lora)
        bsz = x.shape[0]
        xn = comm.gather(rms_norm(x, attn_norm, eps).to(dtype)).wait()  # (batch, seq, dim): the whole sequence
        seqlen = xn.shape[1]
        (q, uq), (k, uk), (v, uv) = _linear(xn, wq, lq, dtype), _linear(xn, wk, lk, dtype), _linear(xn, wv, lv, dtype)
        q, k, v = (t.view(bsz, seqlen, -1, head_dim) for t in (q, k, v))  # this rank's heads
        out, tensors, values = _attention(*heads_first(q, k, v, cos_sin), mask)
        o, uo = _linear(out.transpose(1, 2).reshape(bsz, seqlen, -1), wo, lo, dtype)
        h = x + comm.scatter(o).wait()
        hn = comm.gather(rms_norm(h, ffn_norm, eps).to(dtype)).wait()
        (a, u1), (b, u3) = _linear(hn, w1, l1, dtype), _linear(hn, w3, l3, dtype)
        f, u2 = _linear(F.silu(a) * b, w2, l2, dtype)
        y = h + comm.scatter(f).wait()
        ctx.save_for_backward(
            *(x, q, k, v, out, h, a, b, cos_sin, mask, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3),
            *(uq, uk, uv, uo, u1, u2, u3),  # None where not adapted
            *lora,
            *tensors,
        )
        ctx.eps, ctx.dtype, ctx.values, ctx.comm, ctx.scalings = eps, dtype, values, comm, scalings
        return y

    @staticmethod
    def backward(ctx, dy):
        """dx, the weights' gradients (None for a frozen one) and the LoRA A's and B's, as `forward` takes them."""
        x, q, k, v, out, h, a, b, cos_sin, mask, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, *rest = (
            ctx.saved_tensors
        )
        uq, uk, uv, uo, u1, u2, u3 = rest[:7]
        n_lora = 2 * sum(s is not None for s in ctx.scalings)
        lora, tensors = rest[7 : 7 + n_lora], rest[7 + n_lora :]
        lq, lk, lv, lo, l1, l2, l3 = _adapters(ctx.scalings, lora)
        # which base weights want a gradient: not the ones LoRA froze (their matmuls are skipped)
        _, need_q, need_k, need_v, need_o, _, need_1, need_2, need_3 = ctx.needs_input_grad[2:11]
        eps, dtype, comm = ctx.eps, ctx.dtype, ctx.comm
        bsz, seqlen = q.shape[:2]
        # feed-forward, y = h + w2(silu(a) * b): recompute the SwiGLU product and the norm
        dy_c = comm.gather(dy.to(dtype)).wait()
        hn_pending = comm.gather(rms_norm(h, ffn_norm, eps).to(dtype))  # gathered again, while dg and dw2 run
        silu_a = F.silu(a)  # as in the forward, bit for bit
        g = silu_a * b
        dg_parts, du2 = _linear_input_grad(dy_c, w2, l2)
        dg = _sum(dg_parts)
        dw2 = _weight_grad(dy_c, g, w2) if need_2 else None
        da = aten.silu_backward(dg * b, a)
        db = dg * silu_a
        (d1, du1), (d3, du3) = _linear_input_grad(da, w1, l1), _linear_input_grad(db, w3, l3)
        dhn = comm.scatter(_sum(d1 + d3, fp32=True))
        hn = hn_pending.wait()
        dw1 = _weight_grad(da, hn, w1) if need_1 else None  # while the input gradient is scattered
        dw3 = _weight_grad(db, hn, w3) if need_3 else None
        lora_ffn = (*_adapter_grads(da, du1, hn, u1, l1), *_adapter_grads(dy_c, du2, g, u2, l2))
        lora_ffn += _adapter_grads(db, du3, hn, u3, l3)
        dh_norm, dffn_norm = _rms_norm_backward(dhn.wait(), h, ffn_norm, eps)
        dffn_norm = comm.all_reduce(dffn_norm)
        dh = dy + dh_norm
        # attention, h = x + wo(attention(rope(q), rope(k), v)): recompute RoPE, the repeat and the norm
        dh_c = comm.gather(dh.to(dtype)).wait()
        xn_pending = comm.gather(
            rms_norm(x, attn_norm, eps).to(dtype)
        )  # gathered again, while attention's backward runs
        attn_out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        dout_parts, duo = _linear_input_grad(dh_c, wo, lo)
        dout = _sum(dout_parts).view(bsz, seqlen, -1, out.shape[-1]).transpose(1, 2)
        dwo = _weight_grad(dh_c, attn_out, wo) if need_o else None
        lora_o = _adapter_grads(dh_c, duo, attn_out, uo, lo)
        qr, kr, vr = heads_first(q, k, v, cos_sin)
        dqr, dkr, dvr = _attention_backward(dout, qr, kr, vr, out, mask, tuple(tensors), ctx.values)
        dqr, dkr, dvr = (t.transpose(1, 2) for t in (dqr, dkr, dvr))  # (batch, seq, heads, dim)
        n_kv = k.shape[2]
        if n_kv != q.shape[2]:  # each kv head served n_heads // n_kv query heads: sum their gradients
            dkr = dkr.unflatten(2, (n_kv, -1)).sum(3)
            dvr = dvr.unflatten(2, (n_kv, -1)).sum(3)
        dq, dk = _rope_backward(dqr, cos_sin).flatten(2).to(dtype), _rope_backward(dkr, cos_sin).flatten(2).to(dtype)
        dv = dvr.flatten(2).to(dtype)
        (dxq, duq), (dxk, duk), (dxv, duv) = (
            _linear_input_grad(dq, wq, lq),
            _linear_input_grad(dk, wk, lk),
            _linear_input_grad(dv, wv, lv),
        )
        dxn = comm.scatter(_sum(dxq + dxk + dxv, fp32=True))
        xn = xn_pending.wait()
        dwq = _weight_grad(dq, xn, wq) if need_q else None
        dwk = _weight_grad(dk, xn, wk) if need_k else None
        dwv = _weight_grad(dv, xn, wv) if need_v else None
        lora_qkv = (*_adapter_grads(dq, duq, xn, uq, lq), *_adapter_grads(dk, duk, xn, uk, lk))
        lora_qkv += _adapter_grads(dv, duv, xn, uv, lv)
        dx_norm, dattn_norm = _rms_norm_backward(dxn.wait(), x, attn_norm, eps)
        dx = dh + dx_norm
        dattn_norm = comm.all_reduce(dattn_norm)
        dattn_norm, dffn_norm = dattn_norm.wait().to(attn_norm.dtype), dffn_norm.wait().to(ffn_norm.dtype)
        weights = (dattn_norm, dwq, dwk, dwv, dwo, dffn_norm, dw1, dw2, dw3)
        return dx, None, *weights, None, None, None, None, None, None, *lora_qkv, *lora_o, *lora_ffn


def _attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The model's document mask as the additive bias the kernels take, in `dtype`: a boolean one (True where
    allowed) becomes 0 / -inf, as SDPA converts it."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def _lora_inputs(projections: list[nn.Module]) -> tuple[tuple, list[torch.Tensor]]:
    """The `scalings` and `lora` arguments of `LlamaBlockFunction` for the block's projections (wq wk wv wo
    w1 w2 w3), some of them `LoraLinear`s of `pretrain.adapters`."""
    scalings, lora = [], []
    for module in projections:
        if not isinstance(module, LoraLinear):
            scalings.append(None)
            continue
        if isinstance(module.dropout, nn.Dropout) and module.training:
            raise ValueError(
                "activation_checkpointing=llama does not compute LoRA dropout; set peft.dropout=0 "
                "or train.activation_checkpointing=selective"
            )
        scalings.append(module.scaling)
        lora += [module.lora_A, module.lora_B]
    return tuple(scalings), lora


def llama_block_forward(
    block: TransformerBlock, x: torch.Tensor, cos_sin: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`block.forward` through `LlamaBlockFunction` (the autocast dtype, if any, for matmuls).

    `mask`: the model's document mask (batch, 1, seq, seq; additive, or boolean True where allowed), or None
    for causal attention. A projection that is a `LoraLinear` adds its LoRA update. Under tensor parallelism
    the weights are DTensors on the tensor-parallel mesh: the block takes their local shards and issues the
    collectives of that mesh's group itself; `x` is this rank's slice of the sequence, the mask covers the
    whole sequence (attention runs on all of it, for this rank's heads)."""
    attn, ffn = block.attention, block.feed_forward
    projections = [attn.wq, attn.wk, attn.wv, attn.wo, ffn.w1, ffn.w2, ffn.w3]
    weights = [
        block.attention_norm.weight,
        *(p.weight for p in projections[:4]),
        block.ffn_norm.weight,
        *(p.weight for p in projections[4:]),
    ]
    scalings, lora = _lora_inputs(projections)
    group = None
    if isinstance(weights[1], DTensor):  # tensor parallel: this rank's shards, the mesh's group
        if lora:
            raise ValueError("activation_checkpointing=llama does not compute LoRA under tensor parallelism")
        group = weights[1].device_mesh.get_group()
        weights = [w.to_local() for w in weights]
    comm = SequenceCollectives(group)
    device = x.device.type  # `meta` has no autocast: there the weights' dtype is the compute dtype
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else weights[1].dtype
    if mask is not None:
        mask = _attention_bias(mask, dtype)
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        return LlamaBlockFunction.apply(
            x, cos_sin, *weights, block.attention_norm.eps, attn.head_dim, dtype, comm, mask, scalings, *lora
        )


def apply_llama_backward(model: nn.Module) -> None:
    """Route every transformer block of `model` through the hand-written backward."""
    for block in model.layers:
        block.forward = functools.partial(llama_block_forward, block)
