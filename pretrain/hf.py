"""The one mapping between our model and Hugging Face `LlamaForCausalLM`: config keys and tensor names.

`hf_config_dict` (export, `hf_config` for the parity tests and benchmarks) and `hf_model_args` (import)
read the same table, so a key added to one direction is added to the other.

Meta rotates consecutive pairs of each head's dimensions; Hugging Face rotates the two halves. The
q and k projections are therefore permuted on the way: rows (head, pair, 2) -> (head, 2, pair).
"""

from __future__ import annotations

import os

import torch

from pretrain.model import ModelArgs


class ConversionError(ValueError):
    """A source folder that cannot be imported; the message names the file and the key."""


# ModelArgs field -> LlamaConfig key, for the values that map one to one
_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "max_seq_len": "max_position_embeddings",
    "init_std": "initializer_range",
}
# what our LLaMA computes, in LlamaConfig's words: written on export, refused on import when different
_FIXED = {"hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
# LlamaConfig's defaults, for a config.json that leaves these out
_HF_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048, "initializer_range": 0.02}


def _to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary layout -> Hugging Face's half-split layout (rows of wq/wk)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `_to_halves`."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_config_dict(args: ModelArgs) -> dict:
    """The model keys of a `LlamaForCausalLM` `config.json` with our shapes."""
    return {
        **{theirs: getattr(args, ours) for ours, theirs in _CONFIG_KEYS.items()},
        "intermediate_size": args.hidden_dim,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        **_FIXED,
    }


def hf_config(args: ModelArgs):
    """A `transformers.LlamaConfig` with our shapes."""
    from transformers import LlamaConfig

    return LlamaConfig(**hf_config_dict(args))


def hf_model_args(config: dict, path: str | os.PathLike) -> ModelArgs:
    """Our model section from a `LlamaForCausalLM` `config.json` (the inverse of `hf_config_dict`);
    what our model does not compute is refused with a `ConversionError` naming `path` and the key."""
    if config.get("model_type") != "llama":
        raise ConversionError(f"{path}: model_type {config.get('model_type')!r}, expected 'llama'")
    for key, ours in {**_FIXED, "rope_scaling": None}.items():
        if config.get(key, ours) != ours:
            raise ConversionError(f"{path}: {key}={config[key]!r} is not supported (our LLaMA has {key}={ours!r})")
    rope = config.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(
            f"{path}: rope_parameters.rope_type={rope['rope_type']!r} is not supported (plain RoPE only)"
        )
    config = {**_HF_DEFAULTS, **{k: v for k, v in rope.items() if k == "rope_theta"}, **config}
    missing = [key for key in (*_CONFIG_KEYS.values(), "intermediate_size") if key not in config]
    if missing:
        raise ConversionError(f"{path}: no {', '.join(missing)}")
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    args = ModelArgs(
        **{ours: config[theirs] for ours, theirs in _CONFIG_KEYS.items() if ours != "rope_theta"},
        rope_theta=float(config["rope_theta"]),
        n_kv_heads=None if kv_heads == config["num_attention_heads"] else kv_heads,  # None: multi-head
        ffn_hidden_dim=config["intermediate_size"],
    )
    if config.get("head_dim", args.head_dim) != args.head_dim:
        raise ConversionError(f"{path}: head_dim={config['head_dim']} differs from hidden_size / num_attention_heads")
    return args


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


def hf_module_name(ours: str) -> str:
    """A block's module by Hugging Face's name: `layers.3.attention.wq` -> `model.layers.3.self_attn.q_proj`."""
    _, layer, rest = ours.split(".", 2)
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


def output_rows_to_hf(ours: str, w: torch.Tensor, args: ModelArgs, to_hf: bool = True) -> torch.Tensor:
    """A matrix whose rows are the outputs of module `ours` (its weight, a LoRA B) in the other model's
    rotary layout: the rows of wq and wk permuted, any other module's as they are (`to_hf=False`: back)."""
    heads = {"attention.wq": args.n_heads, "attention.wk": args.kv_heads}.get(ours.split(".", 2)[2])
    if heads is None:
        return w
    return (_to_halves if to_hf else _to_pairs)(w, heads)


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our state dict -> `LlamaForCausalLM`'s."""
    return _convert(state, args, to_hf=True)


def from_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM`'s state dict -> ours."""
    return _convert(state, args, to_hf=False)
