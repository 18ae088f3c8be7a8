"""The LLaMA model: a plain, single-process PyTorch module.

Pre-norm RMSNorm, SwiGLU feed-forward, rotary position embeddings (RoPE) on queries and keys,
grouped-query attention and untied input/output embeddings, with Meta's parameter names
(`tok_embeddings`, `layers.N.attention.wq|wk|wv|wo`, `layers.N.feed_forward.w1|w2|w3`,
`attention_norm`, `ffn_norm`, `norm`, `output`) so Meta's checkpoints map one to one.

Everything distributed (sharding, activation checkpointing, compilation) is applied from outside.
Build on the `meta` device, move to a real device with `to_empty`, then call `init_weights()`.
Generation goes through `Transformer.forward_cached` with a `KVCache` (inference only; training
never calls it).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model_args import ModelArgs  # noqa: F401  (the config section, torch-free)


def count_params(args: ModelArgs) -> tuple[int, int]:
    """(total parameters, parameters without the input embedding), from the shapes alone."""
    d, q, kv = args.dim, args.head_dim, args.kv_heads
    attention = d * args.n_heads * q + 2 * d * kv * q + args.n_heads * q * d
    ffn = 3 * d * args.hidden_dim
    per_layer = attention + ffn + 2 * d  # + attention_norm, ffn_norm
    embedding = args.vocab_size * d
    non_embedding = args.n_layers * per_layer + d + args.vocab_size * d  # + norm, output
    return embedding + non_embedding, non_embedding


def tensor_parallel_params(args: ModelArgs, tensor_parallel: int) -> int:
    """Parameters one of `tensor_parallel` ranks holds: the norms whole, every matrix split."""
    total, _ = count_params(args)
    norms = (2 * args.n_layers + 1) * args.dim
    return (total - norms) // tensor_parallel + norms


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs per token: 6 * N + 12 * L * H * Q * T (PaLM appendix B, as torchtitan).

    N is the parameter count without the input embedding (a lookup costs no matmul FLOPs).
    Each parameter takes 2 FLOPs (multiply, add) per token forward and 4 backward: 6 * N.
    Attention adds QK^T and scores @ V: 2 matmuls of 2 * H * Q * T FLOPs per token per layer
    forward, times 3 for forward + backward: 12 * L * H * Q * T. Causal masking is not
    discounted and activation recomputation is not counted.
    """
    _, n = count_params(args)
    return 6 * n + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square normalisation in fp32 (fp64 for float64 checks), then the learned scale."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        """Scale of one."""
        nn.init.ones_(self.weight)


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """cos and sin of the rotary angles, shape (max_seq_len, head_dim // 2, 2), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head by the position's angle (Meta's layout).

    x: (batch, seq, heads, head_dim); cos_sin: (seq, head_dim // 2, 2), or (batch, seq, head_dim // 2, 2)
    for position ids of their own per row (positions reset at document starts).
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))  # (batch, seq, heads, hd/2, 2)
    x0, x1 = xf.unbind(-1)
    cos, sin = cos_sin[..., None, :, 0], cos_sin[..., None, :, 1]  # ([batch,] seq, 1, head_dim // 2)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin: torch.Tensor):
    """RoPE on q and k, keys and values repeated for grouped-query attention (each kv head serves
    n_heads // n_kv_heads query heads); (batch, seq, heads, dim) in, (batch, heads, seq, dim) out.
    The head counts are read from the shapes, so a tensor-parallel rank's share of the heads works too."""
    q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
    n_heads = q.shape[2]
    if k.shape[2] != n_heads:
        k = k.repeat_interleave(n_heads // k.shape[2], dim=2)
        v = v.repeat_interleave(n_heads // v.shape[2], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class Attention(nn.Module):
    """Causal grouped-query self-attention through scaled_dot_product_attention."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Causal attention, or with `mask` (batch, 1, seq, seq; additive, -inf where not allowed) within
        documents only."""
        bsz, seqlen, _ = x.shape  # heads: -1, all of them, or a tensor-parallel rank's share
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k, v = heads_first(q, k, v, cos_sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def forward_cached(
        self,
        x: torch.Tensor,
        cos_sin: torch.Tensor,
        mask: Optional[torch.Tensor],
        cache: KVCache,
        layer: int,
        start: int,
    ) -> torch.Tensor:
        """Attention of the new tokens `x` (positions start, start + 1, ...) to themselves and to the tokens
        already in `cache`, whose keys and values they join. `mask` (seq, start + seq; True where allowed)
        for several new tokens after a start, else None: causal from position 0, or a single token."""
        bsz, seqlen, _ = x.shape
        q = apply_rope(self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim), cos_sin)
        k = apply_rope(self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim), cos_sin)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        keys, values = cache.update(layer, start, k, v)  # (batch, start + seq, n_kv_heads, head_dim)
        if self.n_kv_heads != self.n_heads:
            keys = keys.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
            values = values.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
        causal = mask is None and start == 0 and seqlen > 1
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, is_causal=causal
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos_sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_cached(
        self, x: torch.Tensor, cos_sin: torch.Tensor, mask: Optional[torch.Tensor], cache: KVCache, start: int
    ) -> torch.Tensor:
        """`forward` for new tokens at positions start, start + 1, ..., attending to `cache` too."""
        h = x + self.attention.forward_cached(self.attention_norm(x), cos_sin, mask, cache, self.layer_id, start)
        return h + self.feed_forward(self.ffn_norm(h))


def initial_value(args: ModelArgs, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial value of parameter `name` (of `shape`) as a full fp32 CPU tensor, from its own generator.

    Normal(0, init_std) for embeddings and linear layers; the two projections that write into
    the residual stream (wo, w2) are scaled by 1/sqrt(2 * n_layers) (GPT-2); norms start at 1.
    Each parameter draws from a generator seeded by (seed, name), so the model starts the same
    whatever the order of initialisation, the sharding or the number of ranks.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    std = args.init_std
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std /= math.sqrt(2 * args.n_layers)
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(shape, generator=generator).mul_(std)  # in place: one full tensor at a time


class Transformer(nn.Module):
    """LLaMA: token embedding, n_layers blocks, final RMSNorm, untied output projection."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos_sin = rope_cos_sin(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos_sin", cos_sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, values: Optional[Callable[[str], torch.Tensor]] = None) -> None:
        """Initialise every parameter and buffer in place (after `to_empty` from `meta`): parameters
        from `values` (name -> full tensor, e.g. a `WeightReader`) when given, else `initial_value`."""
        self.rope_cos_sin.copy_(rope_cos_sin(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta))
        for name, param in self.named_parameters():
            param.copy_(values(name) if values is not None else initial_value(self.args, name, param.shape, seed))

    loss_chunk_tokens = 0  # with targets: compute the loss this many tokens at a time (0: all at once)

    def forward(
        self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab); with targets (batch, seq), the mean
        next-token cross-entropy in fp32 instead, `loss_chunk_tokens` tokens at a time when set.

        With `positions` (batch, seq), position ids that restart at 0 at each document start (the
        loader's document boundaries), RoPE uses them and each token attends only to earlier tokens
        of its own document.
        """
        seqlen = tokens.shape[1]
        if seqlen > self.args.max_seq_len:
            raise ValueError(f"sequence of {seqlen} tokens exceeds model.max_seq_len={self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)  # (batch, seq, dim)
        if positions is None:
            cos_sin, extra = self.rope_cos_sin[:seqlen], ()
        else:  # one additive mask in the attention dtype, shared by every layer (a bool one is converted per layer)
            device = h.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
            allowed = document_mask(positions)
            bias = torch.zeros(allowed.shape, dtype=dtype, device=h.device).masked_fill_(~allowed, float("-inf"))
            cos_sin, extra = self.rope_cos_sin[positions], (bias,)
        for layer in self.layers:
            h = layer(h, cos_sin, *extra)
        h = self.norm(h)
        if targets is None:
            return self.output(h)
        return chunked_cross_entropy(self.output, h.flatten(0, 1), targets.flatten(), self.loss_chunk_tokens)

    @torch.no_grad()
    def forward_cached(self, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Inference: tokens (batch, seq) at positions start .. start + seq - 1 -> logits (batch, seq, vocab).

        The tokens before `start` are the ones whose keys and values `cache` holds; these tokens' keys and
        values are added to it. Prefill a prompt with start=0, then feed one token at a time. The same
        logits as `forward` on the whole sequence (up to rounding); training never comes here.
        """
        seqlen = tokens.shape[1]
        end = start + seqlen
        if end > min(cache.max_len, self.args.max_seq_len):
            raise ValueError(
                f"positions up to {end} exceed the cache ({cache.max_len}) or model.max_seq_len={self.args.max_seq_len}"
            )
        h = self.tok_embeddings(tokens)  # (batch, seq, dim)
        mask = None  # a single new token sees everything before it; a prompt from 0 is plain causal
        if seqlen > 1 and start > 0:  # new token i sees positions 0 .. start + i
            mask = torch.ones(seqlen, end, dtype=torch.bool, device=h.device).tril(diagonal=start)
        cos_sin = self.rope_cos_sin[start:end]
        for layer in self.layers:
            h = layer.forward_cached(h, cos_sin, mask, cache, start)
        return self.output(self.norm(h))


class KVCache:
    """The keys and values of the tokens so far, per layer, for generating one token at a time.

    Each layer's are (batch, max_len, n_kv_heads, head_dim): the kv heads, not the query heads they
    serve under grouped-query attention. They are allocated at a layer's first update, in the dtype
    its attention computes in (bf16 under autocast), and written in place after that.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.keys: list[Optional[torch.Tensor]] = [None] * n_layers
        self.values: list[Optional[torch.Tensor]] = [None] * n_layers

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` (batch, seq, n_kv_heads, head_dim) at positions start .. start + seq - 1 of
        `layer`; return the keys and values of positions 0 .. start + seq - 1."""
        end = start + k.shape[1]
        if self.keys[layer] is None:
            shape = (k.shape[0], self.max_len, *k.shape[2:])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, start:end] = k
        values[:, start:end] = v
        return keys[:, :end], values[:, :end]


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) boolean: token i attends to token j when j <= i within the same document.

    Documents start where the position id is 0; tokens before a row's first start are the tail of a
    document that began in an earlier sample, and attend among themselves.
    """
    doc = torch.cumsum((positions == 0).long(), dim=1)  # document number of each token
    seqlen = positions.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=positions.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def _chunk_loss(output: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output(h).float(), targets, reduction="sum")


def chunked_cross_entropy(output: nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of `output(h)` (fp32) against `targets`, `chunk` tokens at a time; targets of -100
    (cross_entropy's ignore_index: positions with nothing to predict, e.g. virtual tokens) are left out of
    the sum and of the count, as F.cross_entropy does (a batch of -100 only has loss 0, with zero gradients).

    Each chunk's logits are made, reduced to a loss and dropped; in the backward pass they are made
    again one chunk at a time (activation checkpointing), so the full-vocabulary fp32 logits of the
    whole batch never exist. The price is the output projection's forward once more.
    """
    counted = (targets != -100).sum().clamp(min=1)  # a batch with nothing to predict has loss 0, not 0/0
    if chunk <= 0 or chunk >= len(targets):
        return F.cross_entropy(output(h).float(), targets, reduction="sum") / counted
    from torch.utils.checkpoint import checkpoint

    total = torch.zeros((), device=h.device)
    for h_part, targets_part in zip(h.split(chunk), targets.split(chunk)):  # split: no full-size zero grads
        total = total + checkpoint(_chunk_loss, output, h_part, targets_part, use_reentrant=False)
    return total / counted


def param_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, by Meta's names, without allocating the model."""
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in Transformer(args).named_parameters()}


def build_model(
    args: ModelArgs,
    device: torch.device | str = "cpu",
    seed: int = 0,
    values: Optional[Callable[[str], torch.Tensor]] = None,
) -> Transformer:
    """Build on `meta`, materialise on `device`, initialise (from `values` when given)."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    model.init_weights(seed, values)
    return model
