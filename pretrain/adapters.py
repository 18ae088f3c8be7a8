"""Parameter-efficient adaptation, applied to a plain `Transformer` from outside: LoRA and prompt tuning.

`apply_adapters` freezes every base parameter and adds the adapter of the `peft` config section:

- LoRA (Hu et al. 2021): each targeted linear layer (wq wk wv wo w1 w2 w3) becomes a `LoraLinear` computing
  `x W^T + (alpha / rank) * dropout(x) A^T B^T`, A (rank, in) and B (out, rank) trained, B starting at zero.
  The base weight keeps its parameter and its name (`layers.0.attention.wq.weight`); the adapter's are
  `layers.0.attention.wq.lora_A` and `.lora_B`.
- Prompt tuning (Lester et al. 2021): `virtual_tokens` trained embeddings (`tok_embeddings.prompt`) in front of
  every sequence. Hooks on the model's forward put that many placeholder tokens in front of the input (their
  embeddings replaced by the prompt, so RoPE positions and the causal mask cover them as in PEFT) and as many
  targets in front of the targets (-100, no loss, but the last virtual token's, which is the first input
  token: PEFT's loss predicts it too), and drop the virtual positions' logits.

Hugging Face PEFT is the reference for both: the same base and adapter weights give the same logits and
gradients (tests/test_adapters.py). Its adapter folder (`adapter_config.json` + `adapter_model.safetensors`) is
the interchange: `export_peft` writes one from a checkpoint of ours, `read_peft_adapter` and `load_peft_adapter`
read one that PEFT wrote. Names map through `pretrain.hf`; a LoRA B of wq or wk has its rows permuted between
Meta's and Hugging Face's rotary layouts, as the weights they adapt are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import LORA_TARGETS, ConfigError, ExperimentConfig, PeftConfig
from pretrain.hf import hf_module_name, output_rows_to_hf
from pretrain.model import ModelArgs, Transformer, heads_first, param_shapes

IGNORE = -100  # cross_entropy's ignore_index: the targets of virtual positions
PEFT_PREFIX = "base_model.model."  # what PeftModel puts in front of the base model's module names
PROMPT = "tok_embeddings.prompt"
PREFIX = "prefix.weight"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LORA_KINDS = ("lora_A", "lora_B")
BASE_RECORD = "peft_base"  # trainer.pt's key: the base an adapter-only checkpoint was trained on (`base_record`)


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trained low-rank update: x W^T + scaling * dropout(x) A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the base's own parameter, under the same name
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (rank, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, rank)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight) + update * self.scaling


class VirtualTokenEmbedding(nn.Module):
    """The input embedding with trained virtual tokens in front: the first `n` positions of its input are
    placeholders whose embeddings are the prompt's."""

    def __init__(self, base: nn.Embedding, n: int):
        super().__init__()
        self.n = n
        self.weight = base.weight  # the base's own parameter, under the same name
        self.prompt = nn.Parameter(torch.empty(n, base.embedding_dim, device=base.weight.device, dtype=torch.float32))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = F.embedding(tokens[:, self.n :], self.weight)  # (batch, seq, dim)
        return torch.cat([self.prompt.to(h.dtype).expand(len(tokens), -1, -1), h], dim=1)  # (batch, n + seq, dim)


def _with_virtual_positions(model: Transformer, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: `n` placeholder tokens in front of the input; in front of the targets, -100 (no loss)
    for the first n - 1 and the first input token for the last, which predicts it (PEFT's loss does the same)."""
    n = model.tok_embeddings.n
    bound = {**dict(zip(("tokens", "targets", "positions"), args)), **kwargs}
    if bound.get("positions") is not None:
        raise ValueError("prompt tuning with document attention (position ids) is not supported yet")
    tokens = bound["tokens"]
    bound["tokens"] = torch.cat([tokens.new_zeros(len(tokens), n), tokens], dim=1)
    if bound.get("targets") is not None:
        targets = bound["targets"]
        ignored = targets.new_full((len(targets), n - 1), IGNORE)
        bound["targets"] = torch.cat([ignored, tokens[:, :1].to(targets.dtype), targets], dim=1)
    return (), bound


def _without_virtual_logits(model: Transformer, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the logits of the real tokens only (a loss passes as it is)."""
    return output if kwargs.get("targets") is not None else output[:, model.tok_embeddings.n :]


class PrefixKeyValues(nn.Module):
    """Prefix tuning's trained keys and values: for each of `n` virtual positions, each layer's key and value
    (n_kv_heads * head_dim each, keys in Meta's rotary layout and not rotated: they stand for tokens already
    seen), in one matrix laid out as PEFT's prefix embedding: (n, n_layers * 2 * kv_dim), layer-major, key first."""

    def __init__(self, n: int, n_layers: int, kv_dim: int, device: torch.device):
        super().__init__()
        self.n, self.n_layers = n, n_layers
        self.weight = nn.Parameter(torch.empty(n, n_layers * 2 * kv_dim, device=device, dtype=torch.float32))

    def key_value(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s prefix key and value, each (n, kv_dim)."""
        kv = self.weight.view(self.n, self.n_layers, 2, -1)[:, layer]  # (n, 2, kv_dim)
        return kv[:, 0], kv[:, 1]


def _attention_with_prefix(attention: nn.Module, prefix: PrefixKeyValues, layer: int, x, cos_sin, mask=None):
    """`Attention.forward` with the prefix's keys and values in front of the sequence's: every token attends to
    all `n` of them, then causally (`mask`, which the model makes from the shifted positions) to the sequence."""
    bsz, seqlen, _ = x.shape
    hd = attention.head_dim
    q = attention.wq(x).view(bsz, seqlen, -1, hd)
    k = attention.wk(x).view(bsz, seqlen, -1, hd)
    v = attention.wv(x).view(bsz, seqlen, -1, hd)
    q, k, v = heads_first(q, k, v, cos_sin)  # (batch, heads, seq, head_dim), RoPE at positions n, n + 1, ...
    keys, values = (t.view(prefix.n, -1, hd).to(q.dtype) for t in prefix.key_value(layer))  # (n, kv_heads, hd)
    repeat = q.shape[1] // keys.shape[1]  # grouped-query attention: each kv head serves `repeat` query heads
    keys, values = (t.repeat_interleave(repeat, dim=1).transpose(0, 1).expand(bsz, -1, -1, -1) for t in (keys, values))
    k, v = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)  # (batch, heads, n + seq, head_dim)
    mask = torch.cat(
        [mask.new_zeros(*mask.shape[:-1], prefix.n).expand(bsz, -1, -1, -1), mask.expand(bsz, -1, -1, -1)], dim=-1
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attention.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


def _with_prefix_positions(model: Transformer, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: the sequence at positions n, n + 1, ... (after the prefix, as PEFT's past key values
    put it), which also gives the model's causal mask."""
    n = model.prefix.n
    bound = {**dict(zip(("tokens", "targets", "positions"), args)), **kwargs}
    if bound.get("positions") is not None:
        raise ValueError("prefix tuning with document attention (position ids) is not supported")
    tokens = bound["tokens"]
    if n + tokens.shape[1] > model.args.max_seq_len:
        raise ValueError(
            f"{tokens.shape[1]} tokens after peft.virtual_tokens={n} exceed model.max_seq_len={model.args.max_seq_len}"
        )
    bound["positions"] = torch.arange(n, n + tokens.shape[1], device=tokens.device).expand(len(tokens), -1)
    return (), bound


def _module_path(target: str) -> str:
    """`wq` -> `attention.wq`, `w1` -> `feed_forward.w1`: where a LoRA target sits in a block."""
    return f"{'attention' if target in ('wq', 'wk', 'wv', 'wo') else 'feed_forward'}.{target}"


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator of its own for parameter `name`, as `pretrain.model.initial_value` seeds the base's."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def prompt_init_ids(text: str, tokenizer: str | os.PathLike, n: int) -> list[int]:
    """The `n` token ids prompt tuning starts from, as PEFT's TEXT initialisation takes them with our exported
    tokenizer: BOS and the text's tokens, repeated or cut to `n`."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids = [sp.bos_id(), *sp.encode(text)]
    return (ids * math.ceil(n / len(ids)))[:n]


def apply_adapters(
    model: Transformer,
    cfg: PeftConfig,
    seed: int = 0,
    init_ids: Optional[list[int]] = None,
    initialise: bool = True,
) -> list[str]:
    """Freeze every parameter of `model` and add `cfg`'s adapter to it, in place; return the trainable names.

    With `initialise` (and a model whose parameters hold memory, not on `meta`) the adapter gets its initial
    values (`adapter_initial_value`); a strategy that builds the model without values first passes False and
    writes them later, as it does the base's.
    """
    if any(isinstance(m, (LoraLinear, VirtualTokenEmbedding, PrefixKeyValues)) for m in model.modules()):
        raise ValueError("the model has adapters already")
    model.requires_grad_(False)
    device = model.output.weight.device
    if cfg.method == "lora":
        for block in model.layers:
            for target in cfg.targets:
                parent = block.get_submodule(_module_path(target).split(".")[0])
                setattr(parent, target, LoraLinear(getattr(parent, target), cfg.rank, cfg.alpha, cfg.dropout))
    elif cfg.method == "prompt_tuning":
        model.tok_embeddings = VirtualTokenEmbedding(model.tok_embeddings, cfg.virtual_tokens)
        model.register_forward_pre_hook(_with_virtual_positions, with_kwargs=True)
        model.register_forward_hook(_without_virtual_logits, with_kwargs=True)
    elif cfg.method == "prefix_tuning":
        args = model.args
        model.prefix = PrefixKeyValues(cfg.virtual_tokens, args.n_layers, args.kv_heads * args.head_dim, device)
        for i, block in enumerate(model.layers):
            block.attention.forward = functools.partial(_attention_with_prefix, block.attention, model.prefix, i)
        model.register_forward_pre_hook(_with_prefix_positions, with_kwargs=True)
    else:
        raise ValueError(f"peft.method={cfg.method}: nothing to apply")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if initialise and model.output.weight.device.type != "meta":
        init_adapters(model, seed, init_ids)
    return trainable


def adapter_initial_value(
    name: str,
    shape: tuple[int, ...],
    seed: int,
    embedding: Optional[torch.Tensor] = None,
    init_ids: Optional[list[int]] = None,
) -> torch.Tensor:
    """The initial value of adapter parameter `name`, a full fp32 tensor on the CPU, the same whatever the
    strategy and the number of ranks: LoRA's A as PEFT's (Kaiming-uniform, bound 1/sqrt(in)) from a generator
    seeded by (`seed`, name), B zero; the prompt from rows `init_ids` of the base's `embedding` (PEFT's TEXT
    initialisation, `prompt_init_ids`), else normal(0, 1) as PEFT's RANDOM."""
    if name.endswith(".lora_A"):
        bound = 1 / math.sqrt(shape[1])
        return torch.rand(shape, generator=_generator(seed, name)) * 2 * bound - bound
    if name.endswith(".lora_B"):
        return torch.zeros(shape)
    if name == PREFIX:  # PEFT's prefix embedding: normal(0, 1)
        return torch.randn(shape, generator=_generator(seed, PREFIX))
    if name != PROMPT:
        raise KeyError(f"{name} is not an adapter parameter")
    if init_ids is not None:
        return embedding[torch.tensor(init_ids, device=embedding.device)].float().cpu()
    return torch.randn(shape, generator=_generator(seed, PROMPT))


@torch.no_grad()
def init_adapters(model: Transformer, seed: int = 0, init_ids: Optional[list[int]] = None) -> None:
    """Write the initial values of the adapter `apply_adapters` added (`adapter_initial_value`)."""
    embedding = model.tok_embeddings.weight
    for name, param in model.named_parameters():
        if is_adapter_name(name):
            param.copy_(adapter_initial_value(name, tuple(param.shape), seed, embedding, init_ids))


def adapter_initial_values(cfg: ExperimentConfig, base: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """Adapter parameter name -> its initial value for the run `cfg` describes, whose base weights `base` gives
    (name -> full tensor): `peft.init_from`'s weights (a PEFT adapter folder), else `adapter_initial_value`
    seeded by `train.seed`, the prompt from `peft.init_text` (tokenized by `data.tokenizer`)."""
    p = cfg.peft
    if p.init_from is not None:
        try:
            theirs, state = read_peft_adapter(p.init_from, cfg.model)
            check_same_adapter(p, theirs, p.init_from)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"peft.init_from: {e}") from None
        return state.__getitem__
    init_ids = None
    if p.method == "prompt_tuning" and p.init_text is not None:
        if not Path(cfg.data.tokenizer).is_file():
            raise ConfigError(f"peft.init_text needs data.tokenizer to tokenize it: {cfg.data.tokenizer} not found")
        init_ids = prompt_init_ids(p.init_text, cfg.data.tokenizer, p.virtual_tokens)
    embedding = base("tok_embeddings.weight") if init_ids is not None else None
    shapes = all_param_shapes(cfg)
    return lambda name: adapter_initial_value(name, shapes[name], cfg.train.seed, embedding, init_ids)


def adapt(model: Transformer, cfg: ExperimentConfig) -> list[str]:
    """`apply_adapters` to a model with values, the adapter's initial values those of the run `cfg` describes
    (`adapter_initial_values`: `peft.init_from`, `peft.init_text`, seeded). Returns the trainable names."""
    trainable = apply_adapters(model, cfg.peft, initialise=False)
    values = adapter_initial_values(cfg, lambda name: model.get_parameter(name).detach())
    copy_adapter(model, {name: values(name) for name in trainable})
    return trainable


def all_param_shapes(cfg: ExperimentConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape by name, the adapter's included, without allocating the model."""
    if cfg.peft.method == "none":
        return param_shapes(cfg.model)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    apply_adapters(model, cfg.peft)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def adapter_parameters(cfg: ExperimentConfig) -> int:
    """How many parameters the `peft` section trains (0 without an adapter), counted on `meta`."""
    return sum(math.prod(s) for name, s in all_param_shapes(cfg).items() if is_adapter_name(name))


def describe_adapter(cfg: ExperimentConfig) -> str:
    """One line for the start-up banner: the adapter and its share of the parameters."""
    p = cfg.peft
    shapes = all_param_shapes(cfg)
    trainable = sum(math.prod(s) for name, s in shapes.items() if is_adapter_name(name))
    total = sum(math.prod(s) for s in shapes.values())
    what = (
        f"lora rank {p.rank}, alpha {p.alpha:g} on {','.join(p.targets)}"
        if p.method == "lora"
        else f"{p.method.replace('_', ' ')}, {p.virtual_tokens} virtual tokens"
    )
    return f"{what}: {trainable:,} trainable parameters ({100 * trainable / total:.2f}% of {total:,}), base frozen"


def is_adapter_name(name: str) -> bool:
    """Whether parameter `name` belongs to an adapter (not to the base model)."""
    return name.endswith((".lora_A", ".lora_B")) or name in (PROMPT, PREFIX)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors by our names."""
    return {name: t for name, t in model.state_dict().items() if is_adapter_name(name)}


def to_peft_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Adapter tensors by our names -> by PEFT's (`adapter_model.safetensors`), B of wq/wk in HF's rotary rows."""
    out = {}
    for name, tensor in state.items():
        if name in (PROMPT, PREFIX):
            out["prompt_embeddings"] = tensor if name == PROMPT else prefix_keys_to_hf(tensor, args)
            continue
        module, kind = name.rsplit(".", 1)
        if kind == "lora_B":
            tensor = output_rows_to_hf(module, tensor, args)
        out[f"{PEFT_PREFIX}{hf_module_name(module)}.{kind}.weight"] = tensor
    return out


def from_peft_state_dict(
    state: dict[str, torch.Tensor], cfg: PeftConfig, args: ModelArgs, where: str
) -> dict[str, torch.Tensor]:
    """PEFT's adapter tensors -> ours, for the adapter `cfg` describes; a missing or extra tensor is named."""
    if cfg.method in ("prompt_tuning", "prefix_tuning"):
        expected = {PROMPT if cfg.method == "prompt_tuning" else PREFIX: "prompt_embeddings"}
    else:
        modules = [f"layers.{i}.{_module_path(t)}" for i in range(args.n_layers) for t in cfg.targets]
        expected = {
            f"{m}.{kind}": f"{PEFT_PREFIX}{hf_module_name(m)}.{kind}.weight" for m in modules for kind in LORA_KINDS
        }
    missing = [theirs for theirs in expected.values() if theirs not in state]
    extra = sorted(set(state) - set(expected.values()))
    if missing or extra:
        raise ValueError(f"{where}: missing {missing[:3]}, unexpected {extra[:3]}")
    out = {}
    for ours, theirs in expected.items():
        tensor = state[theirs].float()
        if ours == PREFIX:
            tensor = prefix_keys_to_hf(tensor, args, to_hf=False)
        if ours.endswith(".lora_B"):
            tensor = output_rows_to_hf(ours.rsplit(".", 1)[0], tensor, args, to_hf=False)
        out[ours] = tensor
    return out


def prefix_keys_to_hf(prefix: torch.Tensor, args: ModelArgs, to_hf: bool = True) -> torch.Tensor:
    """A prefix (n, n_layers * 2 * kv_dim) with each layer's keys in Hugging Face's rotary layout (the rows
    of wk permuted: a key meets the query of the same layout); values as they are (`to_hf=False`: back)."""
    n = prefix.shape[0]
    layers = prefix.reshape(n, args.n_layers, 2, -1).clone()
    for i in range(args.n_layers):
        keys = layers[:, i, 0].T  # (kv_dim, n): rows as wk's outputs
        layers[:, i, 0] = output_rows_to_hf(f"layers.{i}.attention.wk", keys, args, to_hf=to_hf).T
    return layers.reshape(n, -1)


def _peft_module(ours: str) -> str:
    """`wq` -> `q_proj`: the module name PEFT's target_modules lists."""
    return hf_module_name(f"layers.0.{_module_path(ours)}").rsplit(".", 1)[1]


def peft_adapter_config(cfg: PeftConfig, args: ModelArgs, base: Optional[str] = None) -> dict:
    """The `adapter_config.json` PEFT reads for `cfg` on a model of `args`."""
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True, "revision": None}
    if cfg.method == "lora":
        return {
            **common,
            "peft_type": "LORA",
            "r": cfg.rank,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": sorted(_peft_module(t) for t in cfg.targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
    if cfg.method == "prefix_tuning":  # PEFT's grouped-query form: token_dim and heads of the keys and values
        return {
            **common,
            "peft_type": "PREFIX_TUNING",
            "num_virtual_tokens": cfg.virtual_tokens,
            "token_dim": args.kv_heads * args.head_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": args.kv_heads,
            "num_layers": args.n_layers,
            "encoder_hidden_size": args.kv_heads * args.head_dim,
            "prefix_projection": False,
        }
    # RANDOM whatever the initialisation was: the weights are what counts, and TEXT makes PEFT ask for a tokenizer
    return {
        **common,
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": cfg.virtual_tokens,
        "token_dim": args.dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": args.n_heads,
        "num_layers": args.n_layers,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
    }


def peft_config_of(adapter: dict, where: str) -> PeftConfig:
    """Our `peft` section for a PEFT `adapter_config.json`; what we do not compute is refused, naming the key."""
    kind = adapter.get("peft_type")
    if adapter.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{where}: task_type={adapter['task_type']!r}, expected CAUSAL_LM")
    if kind == "LORA":
        plain = {
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "exclude_modules": None,
            "layer_replication": None,
            "lora_bias": False,
            "target_parameters": None,
            "trainable_token_indices": None,
        }
        for key, value in plain.items():
            if adapter.get(key) not in (None, value):
                raise ValueError(f"{where}: {key}={adapter[key]!r} is not supported (only {key}={value!r})")
        modules = adapter.get("target_modules")
        ours = {_peft_module(t): t for t in LORA_TARGETS}
        if not isinstance(modules, list) or any(m not in ours for m in modules):
            raise ValueError(f"{where}: target_modules={modules!r}; expected a list of {', '.join(ours)}")
        targets = [t for t in LORA_TARGETS if _peft_module(t) in modules]
        return PeftConfig(
            method="lora",
            rank=int(adapter["r"]),
            alpha=float(adapter["lora_alpha"]),
            dropout=float(adapter.get("lora_dropout", 0.0)),
            targets=targets,
        )
    if kind == "PROMPT_TUNING":
        if adapter.get("num_transformer_submodules", 1) != 1:
            raise ValueError(f"{where}: num_transformer_submodules={adapter['num_transformer_submodules']}, expected 1")
        return PeftConfig(method="prompt_tuning", virtual_tokens=int(adapter["num_virtual_tokens"]))
    if kind == "PREFIX_TUNING":
        if adapter.get("prefix_projection"):
            raise ValueError(
                f"{where}: prefix_projection=true is not supported (its MLP is dropped after training: export the "
                "projected prefix, prefix_projection=false)"
            )
        if adapter.get("num_transformer_submodules", 1) != 1:
            raise ValueError(f"{where}: num_transformer_submodules={adapter['num_transformer_submodules']}, expected 1")
        return PeftConfig(method="prefix_tuning", virtual_tokens=int(adapter["num_virtual_tokens"]))
    raise ValueError(f"{where}: peft_type={kind!r} is not supported (LORA, PROMPT_TUNING or PREFIX_TUNING)")


def read_peft_adapter(folder: str | os.PathLike, args: ModelArgs) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """Our `peft` section and the adapter's tensors by our names, from a PEFT adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_file, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a PEFT adapter folder: {ADAPTER_CONFIG}, {ADAPTER_WEIGHTS})")
    try:
        adapter = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: {e}") from None
    cfg = peft_config_of(adapter, str(config_file))
    if cfg.method == "prompt_tuning" and adapter.get("token_dim", args.dim) != args.dim:
        raise ValueError(f"{config_file}: token_dim={adapter['token_dim']}, the model's dim is {args.dim}")
    kv_dim = args.kv_heads * args.head_dim
    if cfg.method == "prefix_tuning" and (adapter.get("token_dim"), adapter.get("num_layers")) != (
        kv_dim,
        args.n_layers,
    ):
        raise ValueError(
            f"{config_file}: token_dim={adapter.get('token_dim')}, num_layers={adapter.get('num_layers')}; the model's "
            f"keys and values are {kv_dim} wide in {args.n_layers} layers"
        )
    return cfg, from_peft_state_dict(load_file(str(weights)), cfg, args, str(weights))


def load_peft_adapter(model: Transformer, folder: str | os.PathLike, cfg: Optional[PeftConfig] = None) -> PeftConfig:
    """Copy a PEFT adapter folder's weights into `model`, which carries the adapter of `cfg` (`apply_adapters`);
    without `cfg`, the adapter is first applied as the folder describes it. A `cfg` that differs from the
    folder's is refused, naming the keys. Returns the folder's config."""
    theirs, state = read_peft_adapter(folder, model.args)
    if cfg is None:
        apply_adapters(model, theirs)
    else:
        check_same_adapter(cfg, theirs, folder)
    copy_adapter(model, state)
    return theirs


def check_same_adapter(cfg: PeftConfig, theirs: PeftConfig, folder: str | os.PathLike) -> None:
    """Refuse, naming the keys, an adapter folder whose adapter (`theirs`) is not the one `cfg` describes."""
    keys = ["method", *(("rank", "alpha", "targets") if theirs.method == "lora" else ("virtual_tokens",))]
    differ = [
        f"peft.{k}: {getattr(cfg, k)!r} here, {getattr(theirs, k)!r} there"
        for k in keys
        if getattr(cfg, k) != getattr(theirs, k)
    ]
    if differ:
        raise ValueError(f"{folder} holds another adapter ({'; '.join(differ)})")


@torch.no_grad()
def copy_adapter(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (by our names) into the model's adapter parameters."""
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        params[name].copy_(tensor)


def write_peft_adapter(
    output: str | os.PathLike,
    state: dict[str, torch.Tensor],
    cfg: PeftConfig,
    args: ModelArgs,
    base: Optional[str] = None,
) -> Path:
    """Write adapter tensors (our names) as a PEFT adapter folder `output` (written whole, then renamed)."""
    from safetensors.torch import save_file

    from pretrain.export import umask_file_mode

    output = Path(output)
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.float().contiguous() for k, v in to_peft_state_dict(state, args).items()}
    save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_adapter_config(cfg, args, base), indent=2) + "\n")
    for path in tmp.iterdir():
        path.chmod(umask_file_mode())
    shutil.rmtree(output, ignore_errors=True)
    os.replace(tmp, output)
    return output


def merge_lora(state: dict[str, torch.Tensor], cfg: PeftConfig) -> dict[str, torch.Tensor]:
    """The base's tensors with each LoRA update folded into its weight, W + (alpha / rank) B @ A; what a
    plain model computes as the adapted one does (dropout aside)."""
    if cfg.method != "lora":
        raise ValueError(f"peft.method={cfg.method}: only a LoRA adapter merges into the weights")
    scaling = cfg.alpha / cfg.rank
    merged = {name: tensor for name, tensor in state.items() if not is_adapter_name(name)}
    for name, a in state.items():
        if name.endswith(".lora_A"):
            module = name.removesuffix(".lora_A")
            merged[f"{module}.weight"] = merged[f"{module}.weight"] + scaling * state[f"{module}.lora_B"] @ a
    return merged


def load_checkpoint_adapter(model: Transformer, peft: dict, reader) -> None:
    """Apply the adapter of a checkpoint's `peft` section to `model` and copy in its trained weights, read by
    `reader` (a `pretrain.consolidate.WeightReader` of that checkpoint)."""
    apply_adapters(model, PeftConfig(**peft))
    copy_adapter(model, {name: reader(name) for name in reader.shapes if is_adapter_name(name)})


def export_peft(checkpoint: str | os.PathLike, output: str | os.PathLike, base: Optional[str] = None) -> Path:
    """Write the adapter of checkpoint folder `checkpoint` (a run with `peft.method` set) as a PEFT adapter
    folder `output`; `base` is recorded as its base_model_name_or_path (e.g. the export-hf folder)."""
    from pretrain.consolidate import WeightReader, checkpoint_config

    config = checkpoint_config(checkpoint)
    cfg = PeftConfig(**config.get("peft", {}))
    if cfg.method == "none":
        raise ValueError(f"{checkpoint}: a run without an adapter (peft.method=none); export-hf exports its weights")
    reader = WeightReader(checkpoint)
    state = {name: reader(name) for name in reader.shapes if is_adapter_name(name)}
    if not state:
        raise ValueError(f"{checkpoint}: peft.method={cfg.method} in its config but no adapter tensors")
    return write_peft_adapter(output, state, cfg, ModelArgs(**config["model"]), base)


def base_record(cfg: ExperimentConfig) -> dict:
    """The base of adapter run `cfg`, which its checkpoints (trainable parameters only) point to: `train.init_from`
    resolved and the sha256 of its files (`weights_sha256`), or the seeded initialisation of `train.seed`."""
    if cfg.train.init_from is None:
        return {"init_from": None, "sha256": None, "seed": cfg.train.seed}
    path = Path(cfg.train.init_from).resolve()
    return {"init_from": str(path), "sha256": weights_sha256(path), "seed": None}


def weights_sha256(path: Path) -> str:
    """The identity of base weights `path`. A checkpoint folder (with checksums.json) is named by the sha256 of
    that listing (every file's name, size and checksum, taken when it was written), so nothing but the listing
    is read: a 7B base is not hashed again at every start and every open. Anything else (a weights file, an
    imported folder) by the sha256 of its bytes (`files_sha256`), taken once per process for the same files."""
    from pretrain.checkpoint import CHECKSUMS, read_listing

    if path.is_dir() and (path / CHECKSUMS).is_file():
        algorithm, files = read_listing(path)
        listing = json.dumps({"algorithm": algorithm, "files": files}, sort_keys=True)
        return hashlib.sha256(listing.encode()).hexdigest()
    return files_sha256(path)


def files_sha256(path: Path) -> str:
    """sha256 of a weights file; of a folder, the sha256 of its files' list (relative name and sha256 of each).
    Remembered for files of the same sizes and modification times."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return _files_sha256(path, tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=8)
def _files_sha256(path: Path, files: tuple) -> str:
    from data_pipeline.tokenizer import file_sha256

    if path.is_file():
        return file_sha256(path)
    names = sorted(Path(f) for f, _, _ in files)
    return hashlib.sha256("".join(f"{f.relative_to(path)}\0{file_sha256(f)}\n" for f in names).encode()).hexdigest()


def same_base(recorded: str, path: Path) -> bool:
    """Whether base `path` is the one recorded with sha256 `recorded` (`weights_sha256`; an adapter checkpoint
    written before checkpoint bases were named by their listing recorded `files_sha256`, compared then)."""
    return weights_sha256(path) == recorded or (
        path.is_dir() and (path / "checksums.json").is_file() and files_sha256(path) == recorded
    )


def base_mismatch(saved: dict, now: dict) -> Optional[str]:
    """Why base `now` (`base_record` of this run) is not the base `saved` an adapter checkpoint was trained on,
    or None when it is (the same sha256 wherever the files are now, or the same seeded initialisation)."""
    if saved["seed"] == now["seed"] and (
        saved["sha256"] == now["sha256"] or (saved["sha256"] and same_base(saved["sha256"], Path(now["init_from"])))
    ):
        return None
    was = (
        f"train.init_from={saved['init_from']} (sha256 {saved['sha256']})"
        if saved["sha256"]
        else (f"the seeded initialisation (train.seed={saved['seed']}, no train.init_from)")
    )
    is_now = (
        f"train.init_from={now['init_from']} (sha256 {now['sha256']})"
        if now["sha256"]
        else (f"the seeded initialisation (train.seed={now['seed']})")
    )
    return f"its adapter was trained on {was}, but this run's base is {is_now}; give the same base weights"


def open_base(record: dict, model: dict, where: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], Callable]:
    """The base weights an adapter-only checkpoint (`where`) names in `record`: (shapes by name, name -> full fp32
    tensor), after checking it is the recorded base (`same_base`) and, a checkpoint, that its files have their
    sizes (their checksums are the ones the recorded listing names); the seeded initialisation of the
    checkpoint's `model` section when it started from none."""
    args = ModelArgs(**model)
    shapes = param_shapes(args)
    if record["init_from"] is None:
        from pretrain.model import initial_value

        return shapes, lambda name: initial_value(args, name, shapes[name], record["seed"])
    from pretrain.consolidate import WeightReader

    path = Path(record["init_from"])
    if not path.exists():
        raise FileNotFoundError(f"{where} holds an adapter only; its base {path} is gone (sha256 {record['sha256']})")
    if not same_base(record["sha256"], path):
        raise ValueError(f"{where} holds an adapter only; its base {path} changed since (sha256 {record['sha256']})")
    from pretrain.checkpoint import CHECKSUMS, damaged_files

    if path.is_dir() and (path / CHECKSUMS).is_file() and (problems := damaged_files(path, hashes=False)):
        raise ValueError(f"{where} holds an adapter only; its base {path} is damaged: {'; '.join(problems)}")
    reader = WeightReader(path)
    return {name: shape for name, shape in reader.shapes.items()}, reader
