"""The `model` section of the config: a LLaMA's shape. Kept free of torch so that the config, `--help`
and `pretrain config` load without it; `pretrain.model` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelArgs:
    """Shape of a LLaMA model; the `model` section of the config."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as n_heads (multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # LLaMA-2 70B: 1.3
    ffn_hidden_dim: Optional[int] = None  # given explicitly, overrides the two above
    norm_eps: float = 1e-6  # LLaMA-1: 1e-6, LLaMA-2: 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    init_std: float = 0.02

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        """Dimension of one attention head."""
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size: int(2/3 * 4 * dim), times the multiplier, rounded up to multiple_of."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
