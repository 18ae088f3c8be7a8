"""Command line: `python -m pretrain COMMAND ...` (train, config, info, layout, plan, memory, plot, ...).

Nothing heavy is imported here at module level (torch comes with the command that needs it), so
`--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pretrain.config import (
    CONFIGS_DIR,
    CommandLineError,
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    check_launch,
    check_paths,
    config_source,
    load_config,
    path_not_found,
    to_dict,
)
from pretrain.errors import NonFiniteLoss

OVERRIDES_HELP = "key=value overrides (keys below), e.g. train.steps=100"
# the commands that read a checkpoint: its files are checked against its checksums.json before any is read
READS_CHECKPOINT = ("consolidate", "evaluate", "export-hf", "export-peft", "generate", "lm-eval")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions reported as one `error:` line: ConfigError, ShardError and bad data are ValueErrors."""
    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, NonFiniteLoss]
    trainer = sys.modules.get("pretrain.trainer")
    if trainer is not None and hasattr(trainer, "NonFiniteLoss"):  # its own class, until it imports pretrain.errors
        errors.append(trainer.NonFiniteLoss)
    return tuple(errors)


def launched_rank() -> int:
    """This process's rank under a launcher (torchrun, deepspeed), else 0."""
    return int(os.environ.get("RANK", "0"))


def budget_text(cfg: ExperimentConfig) -> str:
    """How the length of training is set: `train.tokens=1.4e+12 -> 333,787 steps`, or by train.steps."""
    t = cfg.train
    if t.tokens is not None:
        return f"train.tokens={t.tokens:g} -> {t.steps:,} steps"
    return f"train.steps={t.steps:,} (train.tokens not set)"


def cmd_config(config: str, overrides: list[str], as_json: bool) -> None:
    """Print the resolved config (defaults, YAML and overrides merged; train.steps as train.tokens decides it)."""
    resolved = to_dict(load_config(config, overrides))
    if as_json:
        print(json.dumps(resolved, indent=2))
    else:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.create(resolved)), end="")


def cmd_info(
    config: str, overrides: list[str], as_json: bool, gpus: int | None = None, gpu: str | None = None, kinds=None
) -> None:
    """Print what a config means: parameters, FLOPs per token, batch and total compute; with a cluster
    (--gpus, --gpu), the predicted days and GPU-hours of its best layout."""
    from pretrain.model import count_params, flops_per_token, tensor_parallel_params

    cfg = load_config(config, overrides)
    source = config_source(config)
    m, seq = cfg.model, cfg.data.seq_len
    total, non_embedding = count_params(m)
    fpt = flops_per_token(m, seq)
    info = {
        "config": config,
        "config_file": str(source),
        "params": total,
        "non_embedding_params": non_embedding,
        "flops_per_token": fpt,
        "seq_len": seq,
        "dim": m.dim,
        "n_layers": m.n_layers,
        "n_heads": m.n_heads,
        "n_kv_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "ffn_hidden_dim": m.hidden_dim,
        "vocab_size": m.vocab_size,
        "global_batch_tokens": cfg.train.global_batch_tokens,
        "steps": cfg.train.steps,
        "tokens_budget": cfg.train.tokens,
        "total_tokens": cfg.train.steps * cfg.train.global_batch_tokens,
        "total_flops": fpt * cfg.train.steps * cfg.train.global_batch_tokens,
        "tensor_parallel": cfg.train.tensor_parallel,
        # each layer split over the tensor-parallel ranks (the norms whole on each), before FSDP shards it further
        "params_per_tensor_parallel_rank": tensor_parallel_params(m, cfg.train.tensor_parallel),
    }
    best = None
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus {gpus}: at least 1")
    if gpus or gpu:
        from pretrain.layout import get_kind, kind_for_precision, plan_layouts

        kind = kind_for_precision(get_kind(gpu or "a100-80gb", kinds), cfg)
        fitting = [p for p in plan_layouts(cfg, gpus or 8, kind) if p.fits]
        best = fitting[0] if fitting else None
        info["cluster"] = {"gpus": gpus or 8, "gpu": kind.name, "best_layout": best.as_json() if best else None}
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(f"read {source}")
    print(
        f"{config}: dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads ({m.kv_heads} kv), head dim "
        f"{m.head_dim}, ffn {m.hidden_dim}, vocab {m.vocab_size}"
    )
    print(f"parameters:               {total:>20,}")
    print(f"  without input embedding:{non_embedding:>20,}")
    print(f"FLOPs per token (T={seq}): {fpt:>19,}  (6N + 12·L·H·Q·T)")
    print(f"tokens per step:          {info['global_batch_tokens']:>20,}")
    print(f"training tokens:          {info['total_tokens']:>20,}  ({cfg.train.steps:,} steps)")
    print(f"token budget:             {budget_text(cfg)}")
    print(f"training FLOPs:           {info['total_flops']:>20.3e}")
    if cfg.train.tensor_parallel > 1:
        print(
            f"tensor parallel:          {cfg.train.tensor_parallel:>20}  (each layer split over these GPUs: "
            f"{info['params_per_tensor_parallel_rank']:,} parameters each before FSDP)"
        )
    if "cluster" in info:
        where = f"{info['cluster']['gpus']:,} x {info['cluster']['gpu']}"
        if best is None:
            print(f"on {where}:          no layout fits (python -m pretrain memory ... --fewest)")
        else:
            print(
                f"on {where}: {best.days:,.1f} days, {best.gpu_hours:,.0f} GPU-hours at "
                f"{best.tokens_per_sec_per_gpu:,.0f} tokens/sec/GPU (MFU {100 * best.mfu:.1f}%), predicted for"
            )
            print(f"  {' '.join(best.layout.overrides())}  (python -m pretrain layout: every layout)")


def cmd_plan(config: str, overrides: list[str], tokens: list[str], total: float | None) -> None:
    """Print the blending plan: per source, weight, tokens available, tokens drawn and epochs."""
    from data_pipeline.loader import resolve_sources
    from data_pipeline.mixture import format_plan, plan
    from data_pipeline.shards import Manifest

    cfg = load_config(config, overrides)
    given = {}
    for item in tokens:
        name, _, value = item.partition("=")
        try:
            given[name] = int(float(value))
        except ValueError:
            raise ConfigError(f"--tokens {item}: expected SOURCE=COUNT, e.g. commoncrawl=852.7e9") from None
    if not (cfg.data.weights or cfg.data.sources) or any(s not in given for s in cfg.data.sources or cfg.data.weights):
        check_paths(cfg, ["data.root"])  # some source's tokens come from its shards' manifest
    sources = resolve_sources(cfg.data.root, cfg.data.sources, cfg.data.weights or given)
    available = []
    for source in sources:
        if source in given:
            available.append(given[source])
        else:  # from the manifest of the source's token shards (training split)
            manifest = Manifest.load(Path(cfg.data.root) / source)
            available.append(sum(s.tokens for s in manifest.shards if s.split == "train"))
    weights = [cfg.data.weights[s] for s in sources] if cfg.data.weights else [float(a) for a in available]
    budget = int(total) if total else cfg.train.steps * cfg.train.global_batch_tokens
    print(f"{config}: {budget:,} training tokens ({'--total' if total else budget_text(cfg)})\n")
    print(format_plan(plan(sources, weights, available, budget)))


def cmd_memory(config: str, overrides: list[str], gpus: int, gpu: str, fewest: bool) -> int:
    """Print the memory per GPU of a configuration, or the fewest GPUs it fits on."""
    from pretrain.memory import (
        GPU_MEMORY_GB,
        fewest_gpus,
        fewest_sharded,
        format_plan,
        strategy_name,
        why_not,
        with_train,
    )

    cfg = load_config(config, overrides)
    try:
        gpu_gb = GPU_MEMORY_GB[gpu] if gpu in GPU_MEMORY_GB else float(gpu)
    except ValueError:
        raise ConfigError(f"--gpu {gpu}: one of {', '.join(GPU_MEMORY_GB)} or a size in GB") from None
    if fewest:
        n = fewest_gpus(cfg, gpu_gb)
        if n is None:
            print(f"{cfg.name} does not fit on any number of {gpu_gb:g} GB GPUs under {strategy_name(cfg)}:")
            print(f"  {why_not(cfg, gpu_gb)}")
            options = [
                (" ".join(f"train.{k}={v}" for k, v in c.items()), c, count) for c, count in fewest_sharded(cfg, gpu_gb)
            ]
            for text, _, count in options:
                print(f"  with {text}: " + (f"fits on {count} GPUs" if count else "does not fit either"))
            fitting = [(count, text, changes) for text, changes, count in options if count]
            if not fitting:
                print("try train.activation_checkpointing=full, a smaller train.micro_batch_size or train.offload_*")
                return 1
            n, text, changes = min(fitting, key=lambda option: option[0])
            cfg = with_train(cfg, **changes)
            print(f"\nadd {text} to the command line (or to the experiment's train section):")
        gpus = n
        print(f"fewest GPUs of {gpu_gb:g} GB (multiples of 8): {n}")
    print(format_plan(cfg, gpus, gpu_gb))
    return 0


def cmd_layout(args: argparse.Namespace) -> int:
    """Every layout of a config on a cluster, predicted step time and cost, best first; or calibrate."""
    from dataclasses import replace

    from pretrain.layout import format_table, get_kind, kind_for_precision, plan_layouts

    if args.calibrate:
        from pretrain.calibrate import calibrate

        print(calibrate(Path(args.output), args.threads))
        return 0
    if args.config is None:
        raise ConfigError("layout: give a config (or --calibrate)")
    cfg = load_config(args.config, args.overrides)
    kind = kind_for_precision(get_kind(args.gpu, args.kinds), cfg)
    if args.nodes_of:
        kind = replace(kind, gpus_per_node=args.nodes_of)
    if args.gpus < 1 or (args.nodes_of is not None and args.nodes_of < 1):
        raise ConfigError(f"--gpus {args.gpus} --nodes-of {args.nodes_of}: each at least 1")
    predictions = plan_layouts(cfg, args.gpus, kind)
    if args.json:
        print(
            json.dumps(
                {
                    "config": args.config,
                    "gpus": args.gpus,
                    "gpu": kind.name,
                    "layouts": [p.as_json() for p in predictions],
                },
                indent=2,
            )
        )
    else:
        print(format_table(cfg, args.gpus, kind, predictions, args.top))
    return 0 if any(p.fits for p in predictions) else 1


def check_not_a_part(config: str, overrides: list[str]) -> None:
    """Refuse to train a part of an experiment (a file of `configs/model/`, `configs/data/`, ...: no `defaults`, no
    `train` section) without a budget: everything it leaves out would take the schema's defaults, a 1T-token run on
    the default data. One line naming the file and the experiments that use it."""
    from omegaconf import OmegaConf

    source = config_source(config)
    content = OmegaConf.to_container(OmegaConf.load(source)) or {}
    budget = any(o.split("=", 1)[0].strip() in ("train.steps", "train.tokens") for o in overrides)
    if not isinstance(content, dict) or "defaults" in content or "train" in content or budget:
        return
    part = f"{source.parent.name}/{source.stem}"
    users = sorted(
        path.stem
        for path in (CONFIGS_DIR / "experiments").glob("*.yaml")
        if part in (OmegaConf.load(path).get("defaults") or [])
    )
    use = f"one that uses it ({' or '.join(users)})" if users else "one of configs/experiments/"
    raise CommandLineError(
        f"{source} sets only {', '.join(f'{key}.*' for key in content)}: a run of it would take the defaults of "
        f"everything else (train.steps={TrainConfig.steps}, train.global_batch_tokens="
        f"{TrainConfig.global_batch_tokens}). Train an experiment, {use}: python -m pretrain train NAME; or give "
        f"train.steps=N or train.tokens=T"
    )


def cmd_train(config: str, overrides: list[str]) -> None:
    """Say which config file is read, train, then draw the plot and say where everything went."""
    from pretrain.plot import plot_metrics
    from pretrain.trainer import train

    cfg = load_config(config, overrides)
    check_not_a_part(config, overrides)
    check_launch(cfg)
    check_paths(cfg, ["data.tokenizer", "data.root", "train.init_from"])
    if launched_rank() == 0:
        print(f"read {config_source(config)}", flush=True)
    summary = train(cfg)
    if summary.get("already_finished"):  # the trainer said so, with the last logged loss
        return
    if summary["rank"] == 0 and Path(summary["metrics"]).is_file():
        plot = plot_metrics(Path(summary["metrics"]), Path(summary["run_dir"]) / "plot.png")
        tps, mfu = summary["tokens_per_sec_per_gpu"], summary["mfu"]
        print(
            f"\ndone: step {summary['step']}, loss {summary['loss']:.4f}"
            + (f", {tps:,.0f} tokens/sec/GPU" if tps else "")
            + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ", MFU n/a (no known peak for this device)")
        )
        if summary.get("predicted_tokens_per_sec_per_gpu") and tps:
            predicted = summary["predicted_tokens_per_sec_per_gpu"]
            print(
                f"throughput:  measured {tps:,.0f} vs predicted {predicted:,.0f} tokens/sec/GPU "
                f"({100 * (tps / predicted - 1):+.0f}%; layout planner, kind {summary['gpu_kind']})"
            )
        print(f"run folder:  {summary['run_dir']}")
        print(f"checkpoint:  {summary['checkpoint']}")
        print(f"metrics:     {summary['metrics']}")
        print(f"plot:        {plot}")
        print(f"wandb:       {summary['wandb']}")


def cmd_generate(checkpoint: Path, tokenizer: Path | None, prompts: list[str], opts: argparse.Namespace) -> None:
    """Print a continuation of each prompt."""
    import sentencepiece as spm
    import torch

    from pretrain.generate import (
        continuation_text,
        find_tokenizer,
        load_for_inference,
        sample,
        virtual_positions,
        whitespace_note,
    )
    from pretrain.quantize import nf4_bytes, nf4_weights, quantize_nf4

    device = torch.device(opts.device if opts.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    path = find_tokenizer(checkpoint, tokenizer)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except RuntimeError:  # sentencepiece's error for a file it cannot parse
        what = f"--tokenizer {path}" if tokenizer is not None else f"{checkpoint}: its tokenizer {path}"
        raise ConfigError(f"{what}: not a SentencePiece model") from None
    model = load_for_inference(checkpoint, device)
    if virtual_positions(model):
        print(f"--- {virtual_positions(model)} virtual positions of its adapter in front: no key/value cache")
    if opts.quantize == "nf4" and nf4_weights(model):  # torchao is imported only with --quantize nf4
        print("--- the base is NF4 already (a peft.quantize=nf4 run)")
    elif opts.quantize == "nf4":  # QLoRA's base: the block linears in 4 bits, a LoRA adapter on top as it was
        sizes = {name: p.nbytes for name, p in model.named_parameters()}
        names = quantize_nf4(model)
        before, after = sum(sizes[name] for name in names) / 2**20, nf4_bytes(model) / 2**20
        print(f"--- {len(names)} block weights quantized to NF4: {before:.1f} MiB -> {after:.1f} MiB")
    if sp.get_piece_size() > model.args.vocab_size:
        raise ConfigError(
            f"the tokenizer has {sp.get_piece_size()} pieces, the model {model.args.vocab_size}: not its tokenizer"
        )
    temperature, top_p = opts.temperature, opts.top_p
    for i, prompt in enumerate(prompts):
        ids, seed = [sp.bos_id(), *sp.encode(prompt)], opts.seed + i
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            new = sample(model, ids, opts.max_new_tokens, temperature, top_p, seed, sp.eos_id(), not opts.no_cache)
        how = "greedy" if temperature == 0 else f"temperature {temperature}, top-p {top_p}, seed {seed}"
        text = continuation_text(sp.decode, ids, new)
        end = ", end of text" if new and new[-1] == sp.eos_id() else ""
        print(f"--- {prompt!r} ({len(new)} new tokens) {how}{end}\n{prompt}{text}")
        note = whitespace_note(text)
        if note:
            greedy = "; greedy decoding repeats the likeliest token, --temperature 0.8 samples"
            print(f"--- note: {note}: the model's prediction, not a decoding error{greedy if how == 'greedy' else ''}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m pretrain` and `llama-pretrain`."""
    from data_pipeline.confighelp import config_help

    parser = argparse.ArgumentParser(
        prog="python -m pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    keys = config_help(ExperimentConfig)

    def with_config(name: str, text: str) -> argparse.ArgumentParser:
        """A subcommand that takes a config and overrides: its --help lists every config key."""
        return sub.add_parser(
            name, help=text, description=text, epilog=keys, formatter_class=argparse.RawDescriptionHelpFormatter
        )

    p = with_config("train", "train (or resume) an experiment")
    p.add_argument("config", help="an experiment YAML, e.g. configs/experiments/debug.yaml")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p = with_config("config", "print the resolved config: defaults, YAML and overrides merged (YAML)")
    p.add_argument("config", help="a YAML or a preset name such as llama1-7b (its experiment config)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p = with_config("info", "parameters, FLOPs and token budget of a config")
    p.add_argument("config", help="a YAML or a preset name such as llama1-7b (its experiment config)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--json", action="store_true")
    p.add_argument("--gpus", type=int, help="with --gpu: predicted days and GPU-hours on this many GPUs")
    p.add_argument("--gpu", help="a GPU kind of configs/gpus.yaml (a100-40gb, a100-80gb, h100-80gb, h200)")
    p.add_argument("--kinds", help="a YAML of more GPU kinds (configs/gpus.yaml's layout), e.g. a calibration")
    p = with_config("layout", "predicted step time, tokens/sec/GPU, MFU, days and GPU-hours of every layout")
    p.add_argument("config", nargs="?", help="an experiment YAML or a preset name such as llama1-65b")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--gpus", type=int, default=8, help="GPUs in all (default 8)")
    p.add_argument("--gpu", default="a100-80gb", help="a GPU kind of configs/gpus.yaml or of --kinds")
    p.add_argument("--nodes-of", type=int, help="GPUs per node (default: the kind's, 8)")
    p.add_argument("--kinds", help="a YAML of more GPU kinds (configs/gpus.yaml's layout), e.g. a calibration")
    p.add_argument("--json", action="store_true", help='{"layouts": [...]}, best first')
    p.add_argument("--top", type=int, default=15, help="rows of the table (default 15)")
    p.add_argument("--calibrate", action="store_true", help="measure this CPU as kinds cpu, cpu-2p, cpu-4p")
    p.add_argument("--output", default="runs/kinds-cpu.yaml", help="with --calibrate: the YAML to write")
    p.add_argument("--threads", type=int, help="with --calibrate: intra-op threads (default: all usable CPUs)")
    p = with_config("plan", "tokens drawn and epochs per source for the training budget")
    p.add_argument("config", help="an experiment YAML")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument(
        "--tokens",
        nargs="*",
        default=[],
        metavar="SOURCE=COUNT",
        help="tokens available per source (default: from the shards' manifests)",
    )
    p.add_argument("--total", type=float, help="token budget (default: train.steps x train.global_batch_tokens)")
    p = sub.add_parser("export-hf", help="a checkpoint -> a Hugging Face LlamaForCausalLM folder")
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder of any strategy")
    p.add_argument("output", type=Path, help="the folder to write")
    p.add_argument("--tokenizer", type=Path, help="our SentencePiece model, to ship as the tokenizer")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--merge", action="store_true", help="a LoRA run: its adapter folded into the weights")
    p = sub.add_parser("export-peft", help="the adapter of a peft.method run -> a Hugging Face PEFT adapter folder")
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder of a run with peft.method=lora|prompt_tuning")
    p.add_argument("output", type=Path, help="the folder to write (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", help="recorded as base_model_name_or_path, e.g. the export-hf folder of the checkpoint")
    p = sub.add_parser("import", help="a Hugging Face LLaMA folder or Meta's consolidated.*.pth -> our weights")
    p.add_argument(
        "source", type=Path, help="a folder with config.json + safetensors, or params.json + consolidated.*.pth"
    )
    p.add_argument("output", type=Path, help="the folder to write; start a run from it with train.init_from=OUTPUT")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--max-seq-len", type=int, default=2048, help="Meta's params.json has none (LLaMA-2: 4096)")
    p = sub.add_parser("generate", help="sample a continuation of prompts from any checkpoint")
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder of any strategy, or an import folder")
    p.add_argument("prompts", nargs="+", help="text to continue")
    p.add_argument("--tokenizer", type=Path, help="default: the folder's tokenizer.model, else the run's")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8: sampled, seeded)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling when temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="prompt i draws with seed + i")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence per token (to check)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--quantize", choices=["none", "nf4"], default="none", help="nf4: the block linears in 4 bits (QLoRA's base)"
    )
    p = with_config("memory", "memory per GPU (parameters, gradients, optimizer, activations); does it fit")
    p.add_argument("config", help="an experiment YAML; strategy, ZeRO stage, checkpointing from train.*")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--gpus", type=int, default=8, help="world size (default 8)")
    p.add_argument("--gpu", default="a100-80gb", help="a100-40gb, a100-80gb, h100-80gb, h200 or GB")
    p.add_argument("--fewest", action="store_true", help="find the fewest GPUs (multiples of 8) it fits on")
    p = sub.add_parser("plot", help="draw loss and throughput of a run to a PNG")
    p.add_argument("run", type=Path, help="a run folder or its metrics.jsonl")
    p.add_argument("-o", "--output", type=Path, help="PNG path (default: <run>/plot.png)")
    p = sub.add_parser("consolidate", help="one file of full tensors with Meta's names from any checkpoint")
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder, e.g. runs/x/checkpoints/step-00001000")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: <run>/consolidated/<step>.pth)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    from pretrain import dashboard  # no wandb import until the command runs

    dashboard.add_parser(sub)
    from pretrain import lm_eval  # no torch or lm-eval import until the command runs

    lm_eval.add_parser(sub)
    p = sub.add_parser(
        "evaluate",
        help="held-out loss and perplexity per source of a checkpoint",
        description="Held-out loss and perplexity per source (and blended by data.weights) of a checkpoint of any "
        "strategy, on the data of its run's config (key=value overrides on top, e.g. data.root=...). Under torchrun "
        "each rank scores its own slice.",
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint folder, e.g. runs/debug/checkpoints/step-00000160")
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides of the checkpoint's config: data.*, train.eval_batches, train.micro_batch_size, "
        "train.loss_chunk_tokens, train.device, train.precision, train.reshard_after_forward (the model and the run "
        "are the checkpoint's)",
    )
    p.add_argument("--sources", help="comma-separated sources (default: all of the run's)")
    p.add_argument(
        "--batches",
        type=int,
        help="micro-batches per source in total, shared out between the ranks (default: train.eval_batches)",
    )
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args, extra = parser.parse_known_args(argv)  # overrides after an option come back here: taken in order
    try:
        taking = hasattr(args, "overrides")
        stray = [token for token in extra if not (taking and "=" in token and not token.startswith("-"))]
        if stray:
            what = "neither a key=value override nor an option" if taking else "not an option"
            raise CommandLineError(
                f"{args.command}: '{stray[0]}' is {what} of it (python -m pretrain {args.command} --help)"
            )
        if extra:
            args.overrides = [*args.overrides, *extra]
        if args.command in READS_CHECKPOINT:
            from pretrain.checkpoint import verify_checkpoint

            # under torchrun (`evaluate`, `lm-eval`) each rank checks a share; a rank that refuses ends the launch
            verify_checkpoint(args.checkpoint, rank=launched_rank(), world_size=int(os.environ.get("WORLD_SIZE", "1")))
        if args.command == "config":
            cmd_config(args.config, args.overrides, args.json)
        elif args.command == "info":
            cmd_info(args.config, args.overrides, args.json, args.gpus, args.gpu, args.kinds)
        elif args.command == "layout":
            return cmd_layout(args)
        elif args.command == "plan":
            cmd_plan(args.config, args.overrides, args.tokens, args.total)
        elif args.command == "train":
            cmd_train(args.config, args.overrides)
        elif args.command == "export-hf":
            from pretrain.consolidate import checkpoint_config
            from pretrain.export import export_hf

            if args.tokenizer is not None and not args.tokenizer.is_file():
                raise FileNotFoundError(path_not_found(f"--tokenizer {args.tokenizer}", args.tokenizer))
            print(export_hf(args.checkpoint, args.output, args.tokenizer, args.dtype, merge=args.merge))
            method = checkpoint_config(args.checkpoint).get("peft", {}).get("method", "none")
            if method != "none" and not args.merge:
                print(f"note: the base weights only; its {method} adapter: export-peft (LoRA: or export-hf --merge)")
        elif args.command == "export-peft":
            from pretrain.adapters import export_peft

            print(export_peft(args.checkpoint, args.output, args.base))
        elif args.command == "import":
            from pretrain.convert import import_weights

            print(import_weights(args.source, args.output, args.dtype, args.max_seq_len))
        elif args.command == "generate":
            cmd_generate(args.checkpoint, args.tokenizer, args.prompts, args)
        elif args.command == "memory":
            return cmd_memory(args.config, args.overrides, args.gpus, args.gpu, args.fewest)
        elif args.command == "dashboard":
            dashboard.main(args)
        elif args.command == "evaluate":
            from pretrain.evaluation import main as evaluate_main

            evaluate_main(args)
        elif args.command == "lm-eval":
            lm_eval.main(args)
        elif args.command == "consolidate":
            from pretrain.consolidate import consolidate

            print(consolidate(args.checkpoint, args.output, args.dtype))
        else:
            from pretrain.plot import plot_metrics

            metrics = args.run if args.run.suffix == ".jsonl" else args.run / "metrics.jsonl"
            print(plot_metrics(metrics, args.output or metrics.parent / "plot.png"))
    except user_errors() as e:
        if not isinstance(e, CommandLineError) or launched_rank() == 0:  # the same on every rank: said once
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a training run saves on the first Ctrl-C and only stops here on a second one
        print(f"interrupted (Ctrl-C): {args.command} stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
