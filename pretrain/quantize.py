"""A 4-bit NormalFloat (NF4) base for QLoRA (Dettmers et al. 2023), through torchao's `NF4Tensor`.

`quantize_nf4` replaces, in place, the weight of each linear layer of the transformer blocks (wq wk wv wo
w1 w2 w3, a plain `nn.Linear` or the frozen base of a `LoraLinear`) by an `NF4Tensor` parameter under the
same name; the embeddings, the norms and the output layer stay as they are, as in QLoRA and torchtune.

NF4 stores each weight as 4-bit indices into 16 levels (the quantiles of a normal distribution, scaled to
[-1, 1]), one absmax scale per block of 64 values, and quantizes those scales again (double quantization):
8-bit, less their mean, with one scale per 256 of them. So a weight costs 0.5 bytes a value plus 1/64 of a
byte for its block scale plus one scale of the weight's dtype per 64 * 256 values, about 0.516 bytes in all
(`nf4_bytes_per_parameter`): 4 bits and QLoRA's 0.127 bits of constants.

`F.linear(x, w)` with an NF4 weight goes to torchao's `linear_nf4`: the weight is dequantized to the input's
dtype for the matmul, the gradient flows to `x` (so LoRA's A and B upstream train) and never to the weight.
A model quantized before or after `apply_adapters` is the same model (LoraLinear's forward calls F.linear);
activation_checkpointing=llama's hand-written block backward dequantizes the same way (`weight.to(dtype)`).
Each call dequantizes the whole weight in torchao's plain PyTorch (int64 level indices included): a passing
buffer of about 21 bytes an element of that weight for an fp32 base, 16 for bf16 (measured on CPU), once in
the forward and once in the backward; nothing dequantized is kept between calls.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from pretrain.model import Transformer

# the linear layers of a block whose weights become NF4, by their paths in `TransformerBlock`
NF4_TARGETS = tuple(f"attention.{w}" for w in ("wq", "wk", "wv", "wo")) + tuple(
    f"feed_forward.{w}" for w in ("w1", "w2", "w3")
)


@functools.cache
def _torchao_nf4():
    """torchao's `NF4Tensor` class and `to_nf4`; its import's warnings about CUDA kernels it cannot load on
    this torch build (NF4 does not use them) are kept off the output."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization import NF4Tensor, to_nf4
    except ImportError as e:
        raise ImportError(f"NF4 quantization needs torchao: pip install -e '.[qlora]' ({e})") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return NF4Tensor, to_nf4


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an NF4-quantized weight."""
    nf4_tensor, _ = _torchao_nf4()
    return isinstance(tensor, nf4_tensor)


def nf4_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The NF4-quantized parameters of `model`, by name."""
    return {name: p for name, p in model.named_parameters() if is_nf4(p)}


def quantize_nf4(model: Transformer, block_size: int = 64, scaler_block_size: int = 256) -> list[str]:
    """Replace the weight of every block linear layer of `model` by a frozen NF4 one, in place, keeping its
    name; return the names of the quantized weights.

    Each weight needs a number of elements divisible by `block_size * scaler_block_size` (a whole number of
    double-quantization blocks of scales): a ValueError names every layer that has not, before anything is
    changed. A model quantized already is refused too.
    """
    nf4_tensor, to_nf4 = _torchao_nf4()
    modules = {}
    for i, block in enumerate(model.layers):
        for path in NF4_TARGETS:
            modules[f"layers.{i}.{path}"] = block.get_submodule(path)
    if any(isinstance(m.weight, nf4_tensor) for m in modules.values()):
        raise ValueError("the model is NF4-quantized already")
    group = block_size * scaler_block_size
    bad = [f"{name} {tuple(m.weight.shape)}" for name, m in modules.items() if m.weight.numel() % group]
    if bad:
        raise ValueError(
            f"NF4 needs each weight's size to be a multiple of block_size * scaler_block_size = {block_size} * "
            f"{scaler_block_size} = {group} (blocks of {block_size} values, their scales quantized "
            f"{scaler_block_size} at a time); not so for {', '.join(bad[:5])}"
            f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}: choose model.dim, n_kv_heads and the "
            f"feed-forward size (model.multiple_of) to make it so, or smaller blocks"
        )
    for module in modules.values():
        weight = module.weight.detach()
        module.weight = nn.Parameter(to_nf4(weight.contiguous(), block_size, scaler_block_size), requires_grad=False)
    return [f"{name}.weight" for name in modules]


def nf4_bytes(model: nn.Module) -> int:
    """Bytes the NF4 weights of `model` hold: 4-bit data, 8-bit block scales, the scales' own scales and
    mean, and each tensor's table of 16 levels."""
    total = 0
    for weight in nf4_weights(model).values():
        inner, _ = weight.__tensor_flatten__()
        total += sum(getattr(weight, name).nbytes for name in inner)
    return total


def nf4_bytes_per_parameter(block_size: int = 64, scaler_block_size: int = 256, dtype_bytes: int = 4) -> float:
    """Bytes per weight value of NF4 with double quantization, by arithmetic: half a byte of data, an int8
    scale per `block_size` values, a `dtype_bytes` scale per `block_size * scaler_block_size` values (the
    weight's dtype: 4 for fp32, 2 for bf16). 0.5159 for QLoRA's 64, 256 and fp32."""
    return 0.5 + 1 / block_size + dtype_bytes / (block_size * scaler_block_size)
