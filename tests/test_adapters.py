"""LoRA and prompt tuning applied from outside the model, against Hugging Face PEFT (fp32, CPU, tiny model)."""

import json
import shutil

import pytest
import torch

from pretrain.adapters import (
    LoraLinear,
    adapter_state_dict,
    apply_adapters,
    load_peft_adapter,
    peft_config_of,
    to_peft_state_dict,
    write_peft_adapter,
)
from pretrain.config import LORA_TARGETS, ConfigError, PeftConfig, load_config
from pretrain.model import ModelArgs, build_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=48)
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w3": "up_proj"}
HF_NAMES["w2"] = "down_proj"


def random_base():
    """Our model with random weights (norms away from 1) and the same model as a LlamaForCausalLM."""
    from pretrain.hf import hf_config, to_hf_state_dict

    torch.manual_seed(0)
    ours = build_model(ARGS)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.2 if p.ndim == 1 else 0.05).add_(1.0 if p.ndim == 1 else 0.0)
    theirs = transformers.LlamaForCausalLM(hf_config(ARGS))
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), ARGS), strict=True)
    return ours, theirs


def randomise_adapter(model) -> None:
    """Non-zero adapter weights (B included), so the update matters."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * (1.0 if name.endswith("prompt") else 0.1))


def peft_grads(model) -> dict[str, torch.Tensor]:
    """The gradients of a PeftModel's adapter, by the names of its adapter file."""
    names = {"prompt_encoder.embedding.weight": "prompt_embeddings"}  # the name PEFT saves the prompt under
    grads = {name.replace(".default", ""): p.grad for name, p in model.named_parameters() if p.requires_grad}
    return {names.get(name, name): grad for name, grad in grads.items()}


def check_parity(ours, theirs, tokens: torch.Tensor, virtual: int = 0) -> None:
    """Equal logits, loss and adapter gradients within 1e-5."""
    our_logits, their_logits = ours(tokens), theirs(input_ids=tokens).logits[:, virtual:]
    assert our_logits.shape == their_logits.shape == (*tokens.shape, ARGS.vocab_size)
    torch.testing.assert_close(our_logits, their_logits, rtol=0, atol=1e-5)
    loss = ours(tokens[:, :-1], tokens[:, 1:])  # the trainer's call: targets are the next tokens
    their_loss = theirs(input_ids=tokens, labels=tokens).loss  # transformers shifts the labels itself
    torch.testing.assert_close(loss, their_loss, rtol=0, atol=1e-5)
    loss.backward()
    their_loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    mine, reference = to_peft_state_dict(grads, ARGS), peft_grads(theirs)
    assert sorted(mine) == sorted(reference)
    for name, grad in mine.items():
        torch.testing.assert_close(grad, reference[name], rtol=0, atol=1e-5, msg=name)
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)  # the base is frozen


def lora_pair(cfg: PeftConfig):
    ours, base = random_base()
    trainable = apply_adapters(ours, cfg)
    randomise_adapter(ours)
    lora = peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=[HF_NAMES[t] for t in cfg.targets]
    )
    theirs = peft.get_peft_model(base, lora)
    result = peft.set_peft_model_state_dict(theirs, to_peft_state_dict(adapter_state_dict(ours), ARGS))
    assert not result.unexpected_keys
    return ours, theirs, trainable


@pytest.mark.parametrize("targets", [["wq", "wv"], list(LORA_TARGETS)], ids=["wq-wv", "all"])
def test_lora_matches_peft_logits_loss_and_gradients(targets):
    # alpha / rank = 3: neither 1, nor alpha / sqrt(rank) (rsLoRA, 6), nor alpha (12)
    cfg = PeftConfig(method="lora", rank=4, alpha=12.0, targets=targets)
    ours, theirs, trainable = lora_pair(cfg)
    assert len(trainable) == 2 * len(targets) * ARGS.n_layers
    assert all(name.endswith((".lora_A", ".lora_B")) for name in trainable)
    assert "layers.0.attention.wq.weight" in dict(ours.named_parameters())  # the base keeps its names
    tokens = torch.randint(0, ARGS.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    check_parity(ours, theirs, tokens)


def test_lora_update_is_scaled_by_alpha_over_rank():
    base = torch.nn.Linear(16, 24, bias=False)
    lora = LoraLinear(base, rank=4, alpha=12.0, dropout=0.0)
    with torch.no_grad():
        lora.lora_A.normal_()
        lora.lora_B.normal_()
    x = torch.randn(5, 16)
    expected = x @ base.weight.T + 3.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)


def test_new_lora_starts_as_the_base_model_and_peft_initialises_a_alike():
    ours, _ = random_base()
    before = ours(torch.arange(20)[None])
    apply_adapters(ours, PeftConfig(method="lora", rank=4, targets=["wq", "w2"]), seed=3)
    torch.testing.assert_close(ours(torch.arange(20)[None]), before, rtol=0, atol=0)  # B = 0
    a = ours.layers[0].attention.wq.lora_A
    bound = 1 / ARGS.dim**0.5  # PEFT: kaiming_uniform_(a=sqrt(5)), i.e. uniform(-1/sqrt(in), 1/sqrt(in))
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std() > 0.5 * bound
    again, _ = random_base()
    apply_adapters(again, PeftConfig(method="lora", rank=4, targets=["wq", "w2"]), seed=3)
    assert torch.equal(again.layers[0].attention.wq.lora_A, a)


PEFT_CONFIGS = {"prompt_tuning": "PromptTuningConfig", "prefix_tuning": "PrefixTuningConfig"}


def virtual_token_pair(method: str, virtual: int):
    """Our model with a random prompt- or prefix-tuning adapter and PEFT's model with the same weights."""
    ours, base = random_base()
    trainable = apply_adapters(ours, PeftConfig(method=method, virtual_tokens=virtual))
    randomise_adapter(ours)
    config = getattr(peft, PEFT_CONFIGS[method])(task_type="CAUSAL_LM", num_virtual_tokens=virtual)
    theirs = peft.get_peft_model(base, config)
    peft.set_peft_model_state_dict(theirs, to_peft_state_dict(adapter_state_dict(ours), ARGS))
    return ours, theirs, trainable


def test_prefix_tuning_matches_peft_logits_loss_and_gradients():
    ours, theirs, trainable = virtual_token_pair("prefix_tuning", virtual=5)
    assert trainable == ["prefix.weight"]  # every layer's keys and values (grouped-query: 2 kv heads of 8)
    assert ours.prefix.weight.shape == (5, ARGS.n_layers * 2 * 2 * ARGS.head_dim)
    tokens = torch.randint(0, ARGS.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    check_parity(ours, theirs, tokens)


def test_prompt_tuning_matches_peft_logits_loss_and_gradients():
    ours, theirs, trainable = virtual_token_pair("prompt_tuning", virtual=6)
    assert trainable == ["tok_embeddings.prompt"]
    tokens = torch.randint(0, ARGS.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    check_parity(ours, theirs, tokens, virtual=6)


def test_prompt_tuning_loss_in_chunks_is_the_loss_at_once():
    ours, _, _ = virtual_token_pair("prompt_tuning", virtual=6)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 33), generator=torch.Generator().manual_seed(4))
    whole = ours(tokens[:, :-1], tokens[:, 1:])
    ours.loss_chunk_tokens = 7  # the chunks count only the targets that are not ignored
    torch.testing.assert_close(ours(tokens[:, :-1], tokens[:, 1:]), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "prefix_tuning"])
def test_our_adapter_folder_loads_in_peft_with_equal_logits(tmp_path, method):
    cfg = PeftConfig(method=method, rank=4, alpha=12.0, targets=["wq", "wk", "w1"], virtual_tokens=5)
    ours, base = random_base()
    apply_adapters(ours, cfg)
    randomise_adapter(ours)
    base.save_pretrained(tmp_path / "base")
    out = write_peft_adapter(tmp_path / "adapter", adapter_state_dict(ours), cfg, ARGS, str(tmp_path / "base"))
    theirs = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), out
    ).eval()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 30), generator=torch.Generator().manual_seed(5))
    virtual = cfg.virtual_tokens if method == "prompt_tuning" else 0
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(input_ids=tokens).logits[:, virtual:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "prefix_tuning"])
def test_peft_adapter_folder_loads_in_ours_with_equal_logits(tmp_path, method):
    ours, base = random_base()
    torch.manual_seed(6)
    if method == "lora":  # init_lora_weights=False: B random too
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "k_proj", "down_proj"])
        config.init_lora_weights = False
    elif method == "prompt_tuning":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7)
    else:
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7)
    theirs = peft.get_peft_model(base, config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    loaded = load_peft_adapter(ours, tmp_path / "adapter")
    if method == "lora":
        assert (loaded.rank, loaded.alpha, loaded.targets) == (4, 8.0, ["wk", "wv", "w2"])
    tokens = torch.randint(0, ARGS.vocab_size, (2, 30), generator=torch.Generator().manual_seed(5))
    virtual = 7 if method == "prompt_tuning" else 0
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(input_ids=tokens).logits[:, virtual:], rtol=0, atol=1e-5)
    other, _ = random_base()
    apply_adapters(other, PeftConfig(method=method, rank=8, virtual_tokens=3, targets=["wk", "wv", "w2"]))
    with pytest.raises(ValueError, match="peft.rank: 8 here, 4 there" if method == "lora" else "virtual_tokens"):
        load_peft_adapter(other, tmp_path / "adapter", PeftConfig(method=method, rank=8, virtual_tokens=3))


def test_peft_adapters_we_do_not_compute_are_refused_by_key(tmp_path):
    plain = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    assert peft_config_of(plain, "x").targets == ["wq"]
    for key, value in {"use_dora": True, "use_rslora": True, "bias": "all", "rank_pattern": {"q_proj": 2}}.items():
        with pytest.raises(ValueError, match=f"x: {key}="):
            peft_config_of({**plain, key: value}, "x")
    with pytest.raises(ValueError, match="target_modules"):
        peft_config_of({**plain, "target_modules": "q_proj|v_proj"}, "x")
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        peft_config_of({**plain, "peft_type": "IA3"}, "x")
    (tmp_path / "adapter_config.json").write_text(json.dumps(plain))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_peft_adapter(build_model(ARGS), tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["peft.method=qlora"], "peft.method='qlora' must be one of"),
        (["peft.method=lora", "peft.targets=[wq,q_proj]"], "peft.targets="),
        (["peft.method=lora", "peft.rank=0"], "peft.rank must be positive"),
        (["peft.method=lora", "peft.dropout=1.0"], r"peft.dropout must be in \[0, 1\)"),
        (["peft.method=lora", "peft.dropout=0.1", "train.activation_checkpointing=llama"], "peft.dropout=0.1"),
        (["peft.method=prompt_tuning", "model.max_seq_len=260"], r"data.seq_len=256 \+ peft.virtual_tokens=20 exceeds"),
        (["peft.method=lora", "train.strategy=fsdp", "train.tensor_parallel=2"], "train.tensor_parallel=2"),
        (["peft.init_from=somewhere"], "peft.method=none"),
        (["peft.method=lora", "peft.init_text=hello"], "peft.init_text starts prompt tuning"),
    ],
)
def test_peft_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("debug", overrides)


EVAL = ["train.steps=8", "train.eval_every=2", "train.eval_batches=2", "model.init_std=0.2"]  # a base LoRA can move


def held_out_losses(run_dir) -> list[float]:
    """The run's held-out losses, each on the same batches (steps 2, 4, 6, 8)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r]


def export(checkpoint, tmp_path, tokenizer):
    """export-hf (fp32, with the tokenizer) and export-peft of `checkpoint`, through the command line."""
    from pretrain.__main__ import main

    hf, adapter = tmp_path / "hf", tmp_path / "adapter"
    assert main(["export-hf", str(checkpoint), str(hf), "--dtype", "fp32", "--tokenizer", str(tokenizer)]) == 0
    assert main(["export-peft", str(checkpoint), str(adapter), "--base", str(hf)]) == 0
    return hf, adapter


def check_peft_loads(checkpoint, cfg, hf, adapter, virtual: int = 0) -> dict[str, torch.Tensor]:
    """PEFT on the exported base and adapter computes the checkpoint's logits; returns the checkpoint's tensors."""
    from pretrain.consolidate import consolidated_state_dict
    from pretrain.generate import load_for_inference

    theirs = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(hf), adapter).eval()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf)
    ours = load_for_inference(checkpoint)  # what generate, evaluate and lm-eval run: base + adapter
    state = consolidated_state_dict(checkpoint)
    assert ours.state_dict().keys() == state.keys()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(input_ids=tokens).logits[:, virtual:], rtol=0, atol=1e-5)
    return state


def test_lora_run_trains_the_adapter_only_and_exports_to_peft(tiny_data, tmp_path, monkeypatch, capsys):
    from conftest import tiny_overrides
    from pretrain.__main__ import main
    from pretrain.adapters import adapt
    from pretrain.consolidate import consolidated_state_dict
    from pretrain.generate import load_for_inference
    from pretrain.trainer import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_ckpt = tmp_path / "base" / "checkpoints" / "step-00000002"
    train(load_config("debug", tiny_overrides(tiny_data, tmp_path / "base", "train.steps=2", "model.init_std=0.2")))
    lora = ["peft.method=lora", "peft.rank=4", "peft.targets=[wq,wk,wv,wo,w1,w2,w3]", "optim.lr=3e-2", *EVAL]
    cfg = load_config("debug", tiny_overrides(tiny_data, tmp_path / "lora", *lora, f"train.init_from={base_ckpt}"))
    train(cfg)
    losses = held_out_losses(tmp_path / "lora")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    checkpoint = tmp_path / "lora" / "checkpoints" / f"step-{cfg.train.steps:08d}"

    hf, adapter = export(checkpoint, tmp_path, cfg.data.tokenizer)
    adapted = check_peft_loads(checkpoint, cfg, hf, adapter)
    assert "note: the base weights only; its lora adapter: export-peft" in capsys.readouterr().out
    assert main(["export-peft", str(base_ckpt), str(tmp_path / "none")]) == 2  # no adapter: one error line
    assert "peft.method=none" in capsys.readouterr().err
    merged = tmp_path / "merged"  # export-hf --merge: a plain LlamaForCausalLM computing the adapted model
    assert main(["export-hf", str(checkpoint), str(merged), "--dtype", "fp32", "--merge"]) == 0
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_for_inference(checkpoint)(tokens)
        got = transformers.LlamaForCausalLM.from_pretrained(merged)(input_ids=tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)  # W + sBA rounds apart from Wx + sB(Ax)
    assert main(["export-hf", str(base_ckpt), str(merged), "--merge"]) == 2
    base = consolidated_state_dict(base_ckpt)
    assert all(torch.equal(adapted[name], tensor) for name, tensor in base.items())  # the base bit-identical
    added = set(adapted) - set(base)
    assert {"layers.0.attention.wq.lora_A", "layers.1.feed_forward.w2.lora_B"} <= added and len(added) == 2 * 2 * 7
    assert all(adapted[f"layers.{i}.attention.wq.lora_B"].abs().sum() > 0 for i in range(2))  # it trained

    # the exported adapter starts a new run: peft.init_from, read back into the checkpoint's weights exactly
    model = build_model(cfg.model, values=base.__getitem__)
    again = load_config("debug", tiny_overrides(tiny_data, tmp_path / "again", *lora, f"peft.init_from={adapter}"))
    adapt(model, again)
    for name, tensor in adapter_state_dict(model).items():
        assert torch.equal(tensor, adapted[name]), name
    copy = shutil.copytree(adapter, tmp_path / "copy")
    short = [*lora, f"train.init_from={base_ckpt}", f"peft.init_from={copy}", "train.steps=2", "train.eval_every=0"]
    train(load_config("debug", tiny_overrides(tiny_data, tmp_path / "again", *short, "train.stop_at=1")))
    shutil.rmtree(copy)  # a resumed run takes its adapter from its checkpoint, not from peft.init_from
    assert train(load_config("debug", tiny_overrides(tiny_data, tmp_path / "again", *short)))["step"] == 2


def test_prompt_tuning_run_trains_exports_and_starts_from_text_as_peft(tiny_data, tmp_path, monkeypatch, capsys):
    from conftest import tiny_overrides
    from pretrain.__main__ import main
    from pretrain.adapters import adapt
    from pretrain.trainer import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = "The history of the world"
    prompt = ["peft.method=prompt_tuning", "peft.virtual_tokens=12", f"peft.init_text='{text}'", "optim.lr=1e-1"]
    cfg = load_config("debug", tiny_overrides(tiny_data, tmp_path / "run", *prompt, "model.max_seq_len=64", *EVAL))
    train(cfg)
    losses = held_out_losses(tmp_path / "run")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.02, losses
    checkpoint = tmp_path / "run" / "checkpoints" / f"step-{cfg.train.steps:08d}"
    hf, adapter = export(checkpoint, tmp_path, cfg.data.tokenizer)
    state = check_peft_loads(checkpoint, cfg, hf, adapter, virtual=12)
    capsys.readouterr()
    assert main(["generate", str(checkpoint), "The", "--max-new-tokens", "3"]) == 0  # with its virtual tokens
    assert "12 virtual positions of its adapter in front: no key/value cache" in capsys.readouterr().out

    fresh = build_model(cfg.model, values=state.__getitem__)  # the base, with a new prompt from peft.init_text
    adapt(fresh, cfg)
    config = peft.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=12,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(hf),
    )
    theirs = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(hf), config)
    assert torch.equal(fresh.tok_embeddings.prompt, theirs.prompt_encoder["default"].embedding.weight)


@pytest.mark.parametrize(
    "adapter",
    [["peft.method=lora", "peft.dropout=0.1", "peft.targets=[wq,wv,w2]"], ["peft.method=prompt_tuning"]],
    ids=["lora", "prompt_tuning"],
)
def test_adapter_run_resumes_exactly(tiny_data, tmp_path, adapter):
    from conftest import tiny_config
    from pretrain.trainer import train

    def losses(run_dir) -> list[float]:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]

    common = ["train.steps=6", "model.max_seq_len=64", "peft.virtual_tokens=4", *adapter]
    train(tiny_config(tiny_data, tmp_path / "straight", *common))
    train(tiny_config(tiny_data, tmp_path / "broken", *common, "train.stop_at=3"))
    train(tiny_config(tiny_data, tmp_path / "broken", *common))
    assert losses(tmp_path / "straight") == losses(tmp_path / "broken")  # dropout's random state included
    changed = tiny_config(tiny_data, tmp_path / "broken", *common, "train.steps=8", "peft.rank=2")
    with pytest.raises(ConfigError, match="peft.rank: 8 -> 2 cannot change in a run"):
        train(changed)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_lora_under_activation_checkpointing_gives_the_same_gradients(mode):
    from pretrain.config import Checkpointing
    from pretrain.parallel.activation_checkpoint import apply_activation_checkpointing

    cfg = PeftConfig(method="lora", rank=4, targets=list(LORA_TARGETS))
    tokens = torch.randint(0, ARGS.vocab_size, (2, 33), generator=torch.Generator().manual_seed(7))
    grads = []
    for checkpointing in (Checkpointing.none, Checkpointing(mode)):
        model, _ = random_base()
        apply_activation_checkpointing(model, checkpointing)
        apply_adapters(model, cfg)
        randomise_adapter(model)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "extra",
    [
        ["peft.method=lora"],
        ["peft.method=lora", "peft.rank=4", "peft.targets=[wk,wo,w1,w2,w3]"],
        ["peft.method=prompt_tuning", "model.max_seq_len=4096"],
    ],
)
def test_the_memory_planner_counts_the_adapter_the_model_trains(extra):
    """`memory` with a `peft` section: gradients and AdamW states for the adapter's parameters only, as many
    as `apply_adapters` leaves trainable; the frozen base's weights stay, in bf16."""
    from pretrain.adapters import adapter_parameters, apply_adapters
    from pretrain.config import load_config
    from pretrain.memory import plan_memory
    from pretrain.model import Transformer

    cfg = load_config("debug", extra)
    model = Transformer(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    apply_adapters(model, cfg.peft)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapter_parameters(cfg) == trainable > 0
    plan, full = (
        plan_memory(cfg, 1),
        plan_memory(load_config("debug", extra[1:] if extra[0].endswith("lora") else []), 1),
    )
    assert (plan.gradients, plan.optimizer) == (4.0 * trainable, 8.0 * trainable)
    # the frozen base in bf16 on a GPU (nothing trains it: no fp32 master), the adapter in fp32
    assert plan.parameters == 2.0 * total + 4.0 * trainable and full.gradients == 4.0 * total


def test_adapter_checkpoint_names_its_base_by_sha256_and_refuses_another(tiny_data, tmp_path):
    from conftest import tiny_config
    from pretrain.adapters import BASE_RECORD, weights_sha256
    from pretrain.checkpoint import load_torch
    from pretrain.consolidate import WeightReader, consolidated_state_dict
    from pretrain.trainer import train

    train(tiny_config(tiny_data, tmp_path / "base", "train.steps=3", "train.keep_last=2", "train.save_every=2"))
    base, other = (tmp_path / "base" / "checkpoints" / f"step-0000000{i}" for i in (3, 2))
    moved = shutil.copytree(base, tmp_path / "copy")
    lora = ["peft.method=lora", "peft.rank=4", "train.steps=4", "optim.lr=1e-2"]
    train(tiny_config(tiny_data, tmp_path / "run", *lora, f"train.init_from={moved}", "train.stop_at=2"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    record = load_torch(checkpoint / "trainer.pt")[BASE_RECORD]
    assert record == {"init_from": str(moved.resolve()), "sha256": weights_sha256(moved), "seed": None}
    served = consolidated_state_dict(checkpoint)  # the base from its pointer, the adapter from the checkpoint
    for name, tensor in consolidated_state_dict(base).items():
        assert torch.equal(served[name], tensor), name
    assert sum(name.endswith("lora_B") for name in served) == 2 * 2 and served["layers.1.attention.wv.lora_B"].any()

    with pytest.raises(ConfigError, match="its adapter was trained on train.init_from=.*but this run's base is"):
        train(tiny_config(tiny_data, tmp_path / "run", *lora, f"train.init_from={other}"))
    intact = (moved / "trainer.pt").read_bytes()
    (moved / "trainer.pt").write_bytes(intact + b"\0")  # a file of the base cut or grown
    with pytest.raises(ValueError, match="holds an adapter only; its base .*copy is damaged: .*trainer.pt is"):
        WeightReader(checkpoint)
    (moved / "trainer.pt").write_bytes(intact)
    shutil.rmtree(moved)
    shutil.copytree(other, moved)  # another checkpoint where the base was
    with pytest.raises(ValueError, match="holds an adapter only; its base .*copy changed since"):
        WeightReader(checkpoint)
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError, match="its base .*copy is gone"):
        WeightReader(checkpoint)
    # the same bytes elsewhere are the same base: the run resumes from them
    assert train(tiny_config(tiny_data, tmp_path / "run", *lora, f"train.init_from={base}"))["step"] == 4


def test_bf16_adapter_run_keeps_the_frozen_base_in_bf16_and_resumes_exactly(tiny_data, tmp_path):
    from conftest import assert_resumes_exactly, tiny_config
    from pretrain.parallel import build_strategy

    common = ["peft.method=lora", "peft.rank=4", "train.precision=bf16", "optim.lr=1e-2"]
    cfg = tiny_config(tiny_data, tmp_path / "straight", *common)
    model = build_strategy(cfg).build_model(cfg)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["layers.0.attention.wq.weight"] == dtypes["output.weight"] == torch.bfloat16
    assert dtypes["layers.0.attention_norm.weight"] == dtypes["layers.0.attention.wq.lora_A"] == torch.float32
    assert_resumes_exactly(tiny_data, tmp_path, *common)
