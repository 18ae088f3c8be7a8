"""Mapping between our (Meta's) parameter names and Hugging Face `LlamaForCausalLM`'s.

Meta rotates consecutive pairs of each head's dimensions; Hugging Face rotates the two halves. The
q and k projections are therefore permuted on the way: rows (head, pair, 2) -> (head, 2, pair).
"""

from __future__ import annotations

import torch

from pretrain.model import ModelArgs


def _to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary layout -> Hugging Face's half-split layout (rows of wq/wk)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `_to_halves`."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_config(args: ModelArgs):
    """A `transformers.LlamaConfig` with our shapes."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len,
        rope_theta=args.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )


_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _name_pairs(args: ModelArgs) -> list[tuple[str, str]]:
    """(our name, Hugging Face name) of every parameter."""
    pairs = [
        ("tok_embeddings.weight", "model.embed_tokens.weight"),
        ("norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ]
    for i in range(args.n_layers):
        pairs += [
            (f"layers.{i}.{ours}.weight", f"model.layers.{i}.{theirs}.weight") for ours, theirs in _LAYER_NAMES.items()
        ]
    return pairs


def _convert(state: dict[str, torch.Tensor], args: ModelArgs, to_hf: bool) -> dict[str, torch.Tensor]:
    """Rename every tensor, and permute the rows of wq/wk between the two rotary layouts."""
    permute = _to_halves if to_hf else _to_pairs
    heads = {".attention.wq.": args.n_heads, ".attention.wk.": args.kv_heads}
    out = {}
    for ours, theirs in _name_pairs(args):
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        w = state[src]
        for key, n_heads in heads.items():
            if key in f".{ours}":
                w = permute(w, n_heads)
        out[dst] = w
    return out


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our state dict -> `LlamaForCausalLM`'s."""
    return _convert(state, args, to_hf=True)


def from_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM`'s state dict -> ours."""
    return _convert(state, args, to_hf=False)
