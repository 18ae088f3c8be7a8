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
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model import TransformerBlock, apply_rope, heads_first, rms_norm

aten = torch.ops.aten


def _rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `rms_norm` for input and weight, recomputing the normalised input in fp32."""
    compute = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for float64 checks
    xf = x.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    dyf = dy.to(compute)
    dweight = (dyf * xhat.type_as(x).to(compute)).flatten(0, -2).sum(0)
    dxhat = dyf * weight.to(compute)
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx.type_as(x), dweight.to(weight.dtype)


def _rope_backward(dy: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """RoPE is a rotation per pair: its gradient is the rotation by the opposite angle."""
    return apply_rope(dy, cos_sin * cos_sin.new_tensor([1.0, -1.0]))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple]:
    """Causal attention through SDPA's fused kernels; returns output, tensors and values for the backward."""
    if q.device.type == "cpu":
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
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, tensors[0], 0.0, True)
    lse, cum_q, cum_k, seed, offset = tensors
    max_q, max_k = values
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset
    )


def _matmul_grads(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For y = x @ weight.T: (dx, dweight), dweight in the weight's dtype."""
    dx = dy @ weight.to(dy.dtype)
    dweight = dy.flatten(0, -2).t() @ x.flatten(0, -2)
    return dx, dweight.to(weight.dtype)


class LlamaBlockFunction(torch.autograd.Function):
    """One LLaMA transformer block with LLaMA's hand-written backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, cos_sin, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, eps, n_heads, dtype):
        bsz, seqlen, _ = x.shape
        head_dim = wq.shape[0] // n_heads
        xn = rms_norm(x, attn_norm, eps).to(dtype)
        q = F.linear(xn, wq.to(dtype)).view(bsz, seqlen, n_heads, head_dim)
        k = F.linear(xn, wk.to(dtype)).view(bsz, seqlen, -1, head_dim)
        v = F.linear(xn, wv.to(dtype)).view(bsz, seqlen, -1, head_dim)
        out, tensors, values = _attention(*heads_first(q, k, v, cos_sin, n_heads))
        h = x + F.linear(out.transpose(1, 2).reshape(bsz, seqlen, -1), wo.to(dtype))
        hn = rms_norm(h, ffn_norm, eps).to(dtype)
        a, b = F.linear(hn, w1.to(dtype)), F.linear(hn, w3.to(dtype))
        y = h + F.linear(F.silu(a) * b, w2.to(dtype))
        ctx.save_for_backward(
            x, q, k, v, out, h, a, b, cos_sin, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, *tensors
        )
        ctx.eps, ctx.n_heads, ctx.dtype, ctx.values = eps, n_heads, dtype, values
        return y

    @staticmethod
    def backward(ctx, dy):
        x, q, k, v, out, h, a, b, cos_sin, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, *tensors = ctx.saved_tensors
        eps, n_heads, dtype = ctx.eps, ctx.n_heads, ctx.dtype
        bsz, seqlen, _ = x.shape
        # feed-forward, y = h + w2(silu(a) * b): recompute the SwiGLU product and the norm
        dy_c = dy.to(dtype)
        silu_a = F.silu(a)  # as in the forward, bit for bit
        dg, dw2 = _matmul_grads(dy_c, silu_a * b, w2)
        da = aten.silu_backward(dg * b, a)
        db = dg * silu_a
        hn = rms_norm(h, ffn_norm, eps).to(dtype)
        dhn1, dw1 = _matmul_grads(da, hn, w1)
        dhn3, dw3 = _matmul_grads(db, hn, w3)
        dh_norm, dffn_norm = _rms_norm_backward(dhn1.float() + dhn3.float(), h, ffn_norm, eps)  # sum in fp32
        dh = dy + dh_norm
        # attention, h = x + wo(attention(rope(q), rope(k), v)): recompute RoPE, the repeat and the norm
        dh_c = dh.to(dtype)
        dout, dwo = _matmul_grads(dh_c, out.transpose(1, 2).reshape(bsz, seqlen, -1), wo)
        dout = dout.view(bsz, seqlen, n_heads, -1).transpose(1, 2)
        qr, kr, vr = heads_first(q, k, v, cos_sin, n_heads)
        dqr, dkr, dvr = _attention_backward(dout, qr, kr, vr, out, tuple(tensors), ctx.values)
        dqr, dkr, dvr = (t.transpose(1, 2) for t in (dqr, dkr, dvr))  # (batch, seq, heads, dim)
        n_kv = k.shape[2]
        if n_kv != n_heads:  # each kv head served n_heads // n_kv query heads: sum their gradients
            dkr = dkr.unflatten(2, (n_kv, -1)).sum(3)
            dvr = dvr.unflatten(2, (n_kv, -1)).sum(3)
        dq, dk = _rope_backward(dqr, cos_sin).flatten(2), _rope_backward(dkr, cos_sin).flatten(2)
        dv = dvr.flatten(2)
        xn = rms_norm(x, attn_norm, eps).to(dtype)
        dxq, dwq = _matmul_grads(dq.to(dtype), xn, wq)
        dxk, dwk = _matmul_grads(dk.to(dtype), xn, wk)
        dxv, dwv = _matmul_grads(dv.to(dtype), xn, wv)
        dx_norm, dattn_norm = _rms_norm_backward(dxq.float() + dxk.float() + dxv.float(), x, attn_norm, eps)
        dx = dh + dx_norm
        return dx, None, dattn_norm, dwq, dwk, dwv, dwo, dffn_norm, dw1, dw2, dw3, None, None, None


def llama_block_forward(
    block: TransformerBlock, x: torch.Tensor, cos_sin: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`block.forward` through `LlamaBlockFunction` (the autocast dtype, if any, for matmuls)."""
    if mask is not None:
        raise ValueError("activation_checkpointing=llama does not support data.document_attention yet")
    attn, ffn = block.attention, block.feed_forward
    device = x.device.type  # `meta` has no autocast: there the weights' dtype is the compute dtype
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else attn.wq.weight.dtype
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        return LlamaBlockFunction.apply(
            x,
            cos_sin,
            block.attention_norm.weight,
            attn.wq.weight,
            attn.wk.weight,
            attn.wv.weight,
            attn.wo.weight,
            block.ffn_norm.weight,
            ffn.w1.weight,
            ffn.w2.weight,
            ffn.w3.weight,
            block.attention_norm.eps,
            attn.n_heads,
            dtype,
        )


def apply_llama_backward(model: nn.Module) -> None:
    """Route every transformer block of `model` through the hand-written backward."""
    for block in model.layers:
        block.forward = functools.partial(llama_block_forward, block)
