"""Benchmarks through lm-evaluation-harness (`pip install -e '.[lm-eval]'`).

Three ways in, with the same scores:
- `python -m pretrain lm-eval CHECKPOINT --tasks ...` on our checkpoint of any strategy: our model,
  loaded in one process, behind `PretrainLM` (an lm-eval `LM`); under `torchrun --nproc-per-node N` the
  model sharded by FSDP2 over the N ranks, each scoring its slice of the documents (`load_lm_on_ranks`);
- the same command on a Hugging Face export folder (it has a `config.json`): lm-eval's own `HFLM`;
- `scores_in_training(model, cfg, strategy)`: the live model under the trainer's strategy, each rank
  scoring its own slice of the requests.

`PretrainLM` tokenizes as the export's Hugging Face tokenizer does (BOS first, as Llama's tokenizer
adds it; lm-eval's `HFLM` keeps it), so the two score the same tokens. The bundled tasks
(`pretrain/lm_eval_tasks/`, e.g. `sample_continuation`) are always on the task path.

No torch or lm-eval import at module level: `add_parser` is called for every command.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

if TYPE_CHECKING:
    import torch

    from pretrain.config import ExperimentConfig
    from pretrain.parallel import Strategy

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
INSTALL = "lm-evaluation-harness is not installed: pip install -e '.[lm-eval]'"
MAX_GEN_TOKS = 256  # as lm-eval's HFLM


def require_lm_eval() -> None:
    """Raise the one-line install hint when the optional extra is missing."""
    from pretrain.config import ConfigError

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL) from None


@functools.cache
def _lm_class() -> type:
    """`PretrainLM`, defined on first use so that importing this module does not import lm-eval."""
    import torch
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class PretrainLM(TemplateLM):
        """Our `Transformer` (plain, FSDP-sharded or a DeepSpeed engine) as an lm-eval model.

        loglikelihood, loglikelihood_rolling and greedy generate_until, `batch_size` sequences per
        forward pass, right-padded (the padding is causal-masked away). With a `strategy` of
        several ranks, lm-eval gives each rank its slice of the documents, and every rank runs the
        same number of forward passes (dummy ones once its own are done): FSDP and ZeRO-3 gather
        parameters in every forward and need all ranks there.
        """

        def __init__(
            self,
            model: torch.nn.Module,
            tokenizer: str | Path,
            max_length: int,
            device: torch.device | str = "cpu",
            batch_size: int = 8,
            strategy: Optional[Strategy] = None,
        ) -> None:
            import sentencepiece as spm

            super().__init__()
            self.model = model
            self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
            self._max_length = max_length
            self._device = torch.device(device)
            self.batch_size = batch_size
            self.strategy = strategy
            # documents split by data-parallel rank: the ranks of a tensor-parallel group score the same ones
            self._rank = strategy.data_rank if strategy else 0
            self._world_size = strategy.data_world_size if strategy else 1
            self._width = strategy.tensor_parallel if strategy else 1  # sequences split over this many ranks

        # tokens, as the export's tokenizer.json with add_bos_token (tested against it in tests/test_export.py)
        @property
        def eot_token_id(self) -> int:
            return self.sp.eos_id()

        @property
        def prefix_token_id(self) -> int:
            return self.sp.bos_id()

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def tokenizer_name(self) -> str:
            return "sentencepiece"

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
            """BOS + the pieces' ids, unless `add_special_tokens` is False."""
            ids = self.sp.encode(string)
            return ids if add_special_tokens is False else [self.sp.bos_id(), *ids]

        def tok_decode(self, ids: Sequence[int]) -> str:
            return self.sp.decode(list(ids))

        # the forward passes
        def _more(self, flag: bool) -> bool:
            """Whether any rank has `flag` (one process: `flag`)."""
            return self.strategy.any(flag) if self._world_size > 1 else flag

        @torch.no_grad()
        def _logits(self, rows: Optional[list[list[int]]]) -> Optional[torch.Tensor]:
            """Logits (batch, seq, vocab) of right-padded `rows`, on the device; None: a dummy pass."""
            width = max(map(len, rows)) if rows else 1
            width = -(-width // self._width) * self._width  # a multiple of the tensor-parallel ranks (padding)
            tokens = torch.zeros((len(rows) if rows else 1, width), dtype=torch.long)
            for i, row in enumerate(rows or []):
                tokens[i, : len(row)] = torch.tensor(row)
            context = self.strategy.autocast() if self.strategy else contextlib.nullcontext()
            with context:
                logits = self.model(tokens.to(self._device))
            return None if rows is None else logits

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            """(sum of log p(continuation | context), whether greedy decoding gives the continuation)."""
            windows = []  # (request index, input ids, continuation ids): the last max_length tokens, as HFLM
            for i, (_, context, continuation) in enumerate(requests):
                ids = (context + continuation)[-(self.max_length + 1) :]
                windows.append((i, ids[:-1], continuation))
            windows.sort(key=lambda w: -len(w[1]))  # similar lengths together: less padding
            batches = [windows[b : b + self.batch_size] for b in range(0, len(windows), self.batch_size)]
            results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
            b = 0
            while self._more(b < len(batches)):
                if b >= len(batches):
                    self._logits(None)
                else:
                    logits = self._logits([w[1] for w in batches[b]])
                    for row, (i, inputs, continuation) in zip(logits, batches[b]):
                        n = len(continuation)  # the predictions of the continuation, in fp32: (n, vocab)
                        scores = torch.log_softmax(row[len(inputs) - n : len(inputs)].float(), dim=-1)
                        target = torch.tensor(continuation, device=scores.device)
                        logprob = scores.gather(-1, target[:, None]).sum().item()
                        results[i] = (logprob, bool((scores.argmax(-1) == target).all()))
                        if requests[i][0] is not None:  # None: a window of loglikelihood_rolling
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                b += 1
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Log-likelihood of whole texts, in disjoint windows of max_length tokens (as HFLM)."""
            windows, owner = [], []
            for r, (string,) in enumerate(req.args for req in requests):
                ids = self.tok_encode(string)
                for window in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, 1):
                    windows.append((None, *make_disjoint_window(window)))
                    owner.append(r)
            totals = [0.0] * len(requests)
            for r, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
                totals[r] += logprob
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy continuations, cut at the first stop string (`until`) or end of text. Each turn of
            the loop is one question to the other ranks and one forward pass, on every rank."""
            outputs: list[str] = []
            ids: list[int] = []
            new: list[int] = []
            while self._more(len(outputs) < len(requests)):
                if len(outputs) == len(requests):
                    self._logits(None)
                    continue
                context, kwargs = requests[len(outputs)].args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", MAX_GEN_TOKS))
                if not new:
                    ids = self.tok_encode(context)[-(self.max_length - max_new) :]
                token = int(self._logits([ids + new])[0, len(ids) + len(new) - 1].argmax())  # not a padding column
                text = self.tok_decode(new + [token])
                done = token == self.eot_token_id or any(stop in text for stop in until if stop)
                if token != self.eot_token_id:
                    new.append(token)
                if done or len(new) >= max_new:
                    text = self.tok_decode(new)
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    self.cache_hook.add_partial("generate_until", requests[len(outputs)].args, text)
                    outputs.append(text)
                    new = []
            return outputs

        # ranks: lm-eval splits documents by (rank, world_size) and gathers per-document metrics with these
        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            if self._world_size == 1:
                return tensor
            return torch.cat([t.reshape(-1) for t in self._gather(tensor.detach().cpu())])

        def gather_object(self, obj: Any, dst: int = 0) -> Optional[list]:
            gathered = self._gather(obj) if self._world_size > 1 else [obj]
            return gathered if self._rank == dst else None

        def _gather(self, obj: Any) -> list:
            """`obj` of each data-parallel rank (the first of each tensor-parallel group), in order."""
            return self.strategy.gather(obj)[:: self.strategy.tensor_parallel]

        def barrier(self) -> None:
            if self.strategy is not None:
                self.strategy.barrier()

    return PretrainLM


def __getattr__(name: str) -> Any:
    if name == "PretrainLM":
        return _lm_class()
    raise AttributeError(f"module {__name__} has no attribute {name}")


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face model folder (ours have no config.json)."""
    return (Path(path) / "config.json").is_file()


def load_lm(checkpoint: str | Path, device: str = "cpu", batch_size: int = 8, tokenizer: Optional[Path] = None):
    """An lm-eval model of a checkpoint folder of any strategy (ours: `PretrainLM`, fp32), or of a
    Hugging Face folder (lm-eval's `HFLM`, fp32)."""
    require_lm_eval()
    import torch

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint folder")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if is_hf_folder(checkpoint):
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=str(checkpoint), device=device, batch_size=batch_size, dtype="float32")
    from pretrain.generate import find_tokenizer, load_for_inference

    model = load_for_inference(checkpoint, device)
    return _lm_class()(model, find_tokenizer(checkpoint, tokenizer), model.args.max_seq_len, device, batch_size)


def load_lm_on_ranks(checkpoint: Path, device: str, batch_size: int, tokenizer: Optional[Path] = None):
    """Under torchrun: a `PretrainLM` of our training checkpoint sharded by FSDP2 over the ranks, each keeping
    its shard (as `evaluate`: a 65B checkpoint is scored on the GPUs that trained it), lm-eval's documents split
    between the ranks, fp32. A QLoRA checkpoint (an NF4 base, one process's strategy only) is whole on each
    rank, the documents still split."""
    require_lm_eval()
    from pretrain.evaluation import _ranks, _sharded, checkpoint_experiment
    from pretrain.generate import find_tokenizer, load_for_inference

    overrides = ["train.precision=fp32", *(["train.device=cpu"] if device == "cpu" else [])]
    cfg = checkpoint_experiment(checkpoint, overrides)
    if cfg.peft.quantize == "none":
        strategy = _sharded(cfg, checkpoint)
        model = strategy.build_model(strategy.eval_cfg)
        if strategy.is_main:
            n = strategy.world_size
            print(f"the model sharded over {n} ranks (FSDP): each holds 1/{n} of it", file=sys.stderr, flush=True)
    else:
        strategy = _ranks(cfg)
        model = load_for_inference(checkpoint, strategy.device)
    model.eval()
    return _lm_class()(
        model, find_tokenizer(checkpoint, tokenizer), cfg.model.max_seq_len, strategy.device, batch_size, strategy
    )


@contextlib.contextmanager
def _kept_rng() -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's generators: give the caller's states back afterwards."""
    import random

    import numpy as np
    import torch

    state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


def evaluate(
    lm: Any,
    tasks: Sequence[str],
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    include_path: Optional[str | Path] = None,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
) -> Optional[dict]:
    """lm-eval's whole result (`results`, `samples` with `log_samples`, ...) of `tasks` on `lm`; the
    bundled tasks are on the path; `bootstrap_iters` 0: no standard errors. None on ranks other than 0."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    paths = [TASKS_DIR, *([Path(include_path)] if include_path else [])]
    manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if any(t not in manager.all_tasks for t in tasks):  # lm-eval's own tasks too (indexing them takes ~30 s)
        manager = TaskManager(include_path=[str(p) for p in paths])
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; bundled: {sorted(p.stem for p in TASKS_DIR.glob('*.yaml'))}"
        )
    with _kept_rng():
        return simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
        )


def scores(result: dict) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` of an lm-eval result (metrics of a filter other than `none` as `metric/filter`)."""
    out = {}
    for task, values in result["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and filt:
                metrics[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
        out[task] = metrics
    return out


def run(
    lm: Any,
    tasks: Sequence[str],
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    include_path: Optional[str | Path] = None,
    bootstrap_iters: int = 1000,
) -> dict[str, dict[str, float]]:
    """Evaluate `tasks` on `lm` (ours or HFLM); `{task: {metric: value}}` (empty on ranks other than 0)."""
    result = evaluate(lm, tasks, limit, num_fewshot, include_path, bootstrap_iters=bootstrap_iters)
    return scores(result) if result is not None else {}


def scores_in_training(model: Any, cfg: ExperimentConfig, strategy: Strategy) -> dict[str, float]:
    """The `lm_eval.*` benchmarks on the live model, as flat metrics `lm_eval/<task>/<metric>`, the
    same on every rank. Every rank must call it; each scores its slice of the documents. The model
    is put in eval mode and back."""
    require_lm_eval()
    c = cfg.lm_eval
    lm = _lm_class()(model, cfg.data.tokenizer, cfg.model.max_seq_len, strategy.device, c.batch_size, strategy)
    start, training = time.perf_counter(), model.training
    if strategy.is_main:
        print(f"lm-eval: {', '.join(c.tasks)}" + (f" (limit {c.limit})" if c.limit else ""), flush=True)
    model.eval()
    try:
        result = run(lm, c.tasks, c.limit, c.num_fewshot, c.include_path, bootstrap_iters=0)
    finally:
        model.train(training)
    result = strategy.gather(result)[0]  # rank 0's, on every rank
    flat = {f"lm_eval/{task}/{m}": v for task, metrics in result.items() for m, v in metrics.items()}
    if strategy.is_main:
        shown = ", ".join(f"{k.removeprefix('lm_eval/')} {v:.4f}" for k, v in flat.items() if "stderr" not in k)
        print(f"lm-eval: {shown} ({time.perf_counter() - start:.1f} s)", flush=True)
    return flat


def format_table(results: dict[str, dict[str, float]]) -> str:
    """One line per task and metric, with its standard error where lm-eval gives one."""
    lines = [f"{'task':<28} {'metric':<16} {'value':>8}  {'stderr':>8}"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if "_stderr" in metric:
                continue
            base, slash, filt = metric.partition("/")
            err = metrics.get(f"{base}_stderr{slash}{filt}")
            shown = f"{err:8.4f}" if err is not None and math.isfinite(err) else " " * 8
            lines.append(f"{task:<28} {metric:<16} {value:8.4f}  {shown}")
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `lm-eval` command's arguments."""
    p = subparsers.add_parser("lm-eval", help="benchmarks through lm-evaluation-harness, on a checkpoint or an export")
    p.add_argument(
        "checkpoint", type=Path, help="our checkpoint folder (any strategy), or a Hugging Face export folder"
    )
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, e.g. sample_continuation,hellaswag")
    p.add_argument("--limit", type=float, help="examples per task (a fraction when < 1)")
    p.add_argument("--num-fewshot", type=int, help="default: each task's own")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--output", type=Path, help="write the scores as JSON here")
    p.add_argument("--include-path", type=Path, help="a folder of more task YAMLs (the bundled ones are always in)")
    p.add_argument("--tokenizer", type=Path, help="our checkpoints: default the run's data.tokenizer")


def main(args: argparse.Namespace) -> None:
    """`python -m pretrain lm-eval`: print a table of scores and the time taken; write JSON with --output."""
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise ValueError("--tasks: name at least one task, e.g. --tasks sample_continuation")
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    start = time.perf_counter()
    on_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_hf_folder(args.checkpoint)
    if on_ranks:  # torchrun: the model sharded, the documents split
        lm = load_lm_on_ranks(args.checkpoint, args.device, args.batch_size, args.tokenizer)
    else:
        lm = load_lm(args.checkpoint, args.device, args.batch_size, args.tokenizer)
    main_rank = not on_ranks or lm.strategy.is_main
    kind = "Hugging Face (HFLM)" if is_hf_folder(args.checkpoint) else "ours (PretrainLM)"
    if main_rank:
        print(f"lm-eval: {', '.join(tasks)} on {args.checkpoint} [{kind}]", file=sys.stderr, flush=True)
    try:
        results = run(lm, tasks, limit, args.num_fewshot, args.include_path)
        if on_ranks:  # rank 0 aggregates (bootstrapped standard errors) while the others would already tear down
            lm.strategy.barrier()
    finally:
        if on_ranks:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not main_rank:
        return
    seconds = time.perf_counter() - start
    print(format_table(results))
    print(f"took {seconds:.1f} s")
    if args.output is not None:
        import lm_eval

        record = {
            "checkpoint": str(args.checkpoint),
            "model": "hf" if is_hf_folder(args.checkpoint) else "pretrain",
            "tasks": tasks,
            "limit": limit,
            "num_fewshot": args.num_fewshot,
            "ranks": lm.strategy.world_size if on_ranks else 1,
            "lm_eval_version": lm_eval.__version__,
            "seconds": round(seconds, 2),
            "results": results,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.output}")
