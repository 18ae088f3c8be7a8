#!/usr/bin/env bash
# Everything a GPU must show, in one command of under 10 minutes on one GPU, into one results file
# (bench/results/<date>-gpu-check-<gpu>.md):
#   1. the GPU tests (pytest -m gpu): bf16 training with MFU, the hand-written block's flash kernels
#      against autograd;
#   2. the debug model in bf16, 20 steps under activation checkpointing none, selective and llama (and
#      fp32 none for scale): every step's loss, and each mode's largest gap to bf16 none;
#   3. a 1.1B model (TinyLlama's shapes) trained under FSDP on one GPU (torchrun, one process):
#      tokens/sec/GPU, MFU and peak memory from the trainer's own metrics;
#   4. ours against Hugging Face's LlamaForCausalLM at those shapes (bench/throughput.py);
#   5. with 2+ GPUs: the debug model under FSDP x tensor parallel 2 (NCCL, bf16), 20 steps under none and
#      llama, each step's loss against one GPU's bf16 none (on one GPU it is skipped, and says so).
#
#   bash bench/gpu_check.sh             # on a machine with a CUDA GPU
#   bash bench/gpu_check.sh --dry-run   # print the steps and exit, on any machine
#
# Without a CUDA device it stops at once, with a message, exit status 2. PYTHON (default .venv/bin/python)
# picks the interpreter; GPU_CHECK_1B adds overrides to step 3 (e.g. train.activation_checkpointing=none
# with 80 GB). Every step has a time limit; one that fails or runs out is reported and the rest still run;
# the exit status is 1 when any did.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
python=${PYTHON:-.venv/bin/python}
dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 64 ;;
esac

experiment=configs/experiments/debug.yaml
common=(train.eval_every=0 train.save_every=0 train.log_every=1 wandb.mode=disabled train.device=cuda)
parity=(train.steps=20 train.precision=bf16)
model_1b=(model.dim=2048 model.n_layers=22 model.n_heads=32 model.n_kv_heads=4 model.ffn_hidden_dim=5632
  model.vocab_size=32000 model.max_seq_len=2048)
# 32768 tokens a step: 4 micro-batches of 4 x 2048; selective checkpointing fits a 40 GB GPU (pretrain memory)
fsdp_1b=("${model_1b[@]}" data.seq_len=2048 train.global_batch_tokens=32768 train.micro_batch_size=4
  train.activation_checkpointing=selective train.steps=20 train.strategy=fsdp)
read -r -a extra_1b <<< "${GPU_CHECK_1B:-}"
throughput=(bench/throughput.py --config debug "${model_1b[@]}" --seq 2048 --micro-batch 4
  --modes "none,selective,llama" --warmup 2 --steps 8)

if [ "$dry_run" = 1 ]; then
  cat <<EOF
gpu_check (dry run): nothing is executed. On a machine with a CUDA GPU it runs, each step with a time limit:
  0. data, if data/tokens/sample is missing (60 s): $python -m data_pipeline prepare configs/pipeline/sample.yaml
  1. GPU tests (75 s):            $python -m pytest -m gpu -q tests
  2. bf16 loss parity (4 x 45 s): $python -m pretrain train $experiment ${common[*]} ${parity[*]} train.activation_checkpointing=MODE
                                  for MODE in none selective llama, and train.precision=fp32 with none
  3. 1.1B under FSDP (170 s):     $python -m torch.distributed.run --standalone --nproc_per_node 1 -m pretrain train $experiment ${common[*]} ${fsdp_1b[*]} ${extra_1b[*]}
  4. ours vs HF (110 s):          $python ${throughput[*]}
  5. with 2+ GPUs (2 x 60 s):     $python -m torch.distributed.run --standalone --nproc_per_node 2 -m pretrain train $experiment ${common[*]} ${parity[*]} train.strategy=fsdp train.tensor_parallel=2 train.activation_checkpointing=MODE
                                  for MODE in none llama (skipped on one GPU)
  -> bench/results/$(date +%F)-gpu-check-<gpu>.md
EOF
  exit 0
fi

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False with $python): this check needs a GPU." >&2
  echo "gpu_check: nothing was run; 'bash bench/gpu_check.sh --dry-run' lists what it runs." >&2
  exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sections="$work/sections.md"
: > "$sections"
failed=0
start=$(date +%s)

# run_step NAME LIMIT_S COMMAND...: run with a time limit, output to $work/NAME.log; record how it ended
run_step() {
  local name=$1 limit=$2 status=0 t0
  shift 2
  t0=$(date +%s)
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$work/$name.log" 2>&1 || status=$?
  local took=$(( $(date +%s) - t0 ))
  if [ "$status" = 0 ]; then
    echo "$name: ok in ${took} s" | tee -a "$work/steps.txt"
  else
    failed=1
    local how="exit status $status"
    [ "$status" = 124 ] && how="timed out"
    echo "$name: FAILED ($how) after ${took} s; last lines:" | tee -a "$work/steps.txt"
    tail -n 15 "$work/$name.log" | sed 's/^/    /' | tee -a "$work/steps.txt"
  fi
  return 0
}

if [ ! -d data/tokens/sample ]; then
  run_step data 60 "$python" -m data_pipeline prepare configs/pipeline/sample.yaml
fi

run_step gpu-tests 75 "$python" -m pytest -m gpu -q -p no:cacheprovider tests
{
  echo "## 1. GPU tests (pytest -m gpu)"
  echo
  echo '```'
  grep -E "passed|failed|error|skipped" "$work/gpu-tests.log" | tail -n 5
  echo '```'
  echo
} >> "$sections"

for mode in none selective llama; do
  run_step "parity-bf16-$mode" 45 "$python" -m pretrain train "$experiment" "${common[@]}" "${parity[@]}" \
    "train.activation_checkpointing=$mode" "train.run_dir=$work/parity-bf16-$mode"
done
run_step parity-fp32-none 45 "$python" -m pretrain train "$experiment" "${common[@]}" "${parity[@]}" \
  train.precision=fp32 train.activation_checkpointing=none "train.run_dir=$work/parity-fp32-none"

run_step fsdp-1b 170 "$python" -m torch.distributed.run --standalone --nproc_per_node 1 -m pretrain train \
  "$experiment" "${common[@]}" "${fsdp_1b[@]}" "${extra_1b[@]}" "train.run_dir=$work/fsdp-1b"

run_step throughput 110 "$python" "${throughput[@]}" --out "$work/throughput.md"

gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
  for mode in none llama; do
    run_step "parity-tp2-$mode" 60 "$python" -m torch.distributed.run --standalone --nproc_per_node 2 -m pretrain \
      train "$experiment" "${common[@]}" "${parity[@]}" train.strategy=fsdp train.tensor_parallel=2 \
      "train.activation_checkpointing=$mode" "train.run_dir=$work/parity-tp2-$mode"
  done
else
  echo "parity-tp2: skipped: tensor parallel needs 2 GPUs, this machine has $gpus" | tee -a "$work/steps.txt"
fi

# the report: parity and FSDP figures from the runs' metrics.jsonl, then the throughput table as written;
# exit status 3 when a parity gap is over its tolerance
report_status=0
"$python" - "$work" "$sections" "${fsdp_1b[*]} ${extra_1b[*]}" <<'EOF' || report_status=$?
import json
import sys
from pathlib import Path

work, sections, fsdp_overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]


def records(run):
    path = work / run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


lines = ["## 2. Debug model, 20 steps: bf16 loss parity across activation checkpointing", ""]
names = ["bf16-none", "bf16-selective", "bf16-llama", "fp32-none"]
names += [n for n in ("tp2-none", "tp2-llama") if (work / f"parity-{n}").is_dir()]  # with 2+ GPUs
runs = {name: {r["step"]: r["loss"] for r in records(f"parity-{name}") if "loss" in r} for name in names}
reference = runs["bf16-none"]
tolerance = {"bf16-selective": 0.05, "bf16-llama": 0.05, "fp32-none": 0.1, "tp2-none": 0.05, "tp2-llama": 0.05}
lines += ["| run | steps | first loss | last loss | largest gap to bf16 none | within |", "|---|---|---|---|---|---|"]
for name, losses in runs.items():
    if not losses:
        lines.append(f"| {name} | 0 | - | - | - | FAILED: no losses |")
        continue
    steps = sorted(losses)
    common = [s for s in steps if s in reference]
    gap = max((abs(losses[s] - reference[s]) for s in common), default=float("nan"))
    verdict = "-" if name == "bf16-none" else ("ok" if len(common) == 20 and gap <= tolerance[name] else "FAILED")
    limit = "" if name == "bf16-none" else f" (<= {tolerance[name]})"
    first, last = losses[steps[0]], losses[steps[-1]]
    lines.append(f"| {name} | {len(steps)} | {first:.4f} | {last:.4f} | {gap:.4f}{limit} | {verdict} |")
if reference:
    lines += ["", f"losses per step ({' / '.join(runs)}):", "", "```"]
    for s in sorted(reference):
        lines.append(f"{s:3d} " + " ".join(f"{runs[n].get(s, float('nan')):.4f}" for n in runs))
    lines.append("```")

lines += ["", "## 3. 1.1B parameters (TinyLlama's shapes) under FSDP on one GPU, bf16", ""]
lines += [f"overrides: `{fsdp_overrides.strip()}`", ""]
fsdp = [r for r in records("fsdp-1b") if "tokens_per_sec_per_gpu" in r]
warm = [r for r in fsdp if r["step"] > 3] or fsdp
if warm:

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    tps = median([r["tokens_per_sec_per_gpu"] for r in warm])
    per_step = fsdp[-1]["tokens_seen"] // fsdp[-1]["step"]
    mfu = [r["mfu"] for r in warm if r.get("mfu") is not None]
    lines += [
        f"- steps measured: {len(warm)} (after 3 warm-up steps), {per_step:,} tokens each",
        f"- tokens/sec/GPU (median): {tps:,.0f}",
        f"- MFU (median): {100 * median(mfu):.1f}%" if mfu else "- MFU: n/a (no peak FLOPs known for this GPU)",
        f"- step time (median): {median([r['step_time_s'] for r in warm]):.3f} s",
        *[  # the layout planner's prediction, logged by the trainer with its first line on a known GPU kind
            f"- predicted by the layout planner: {r['predicted_tokens_per_sec_per_gpu']:,.0f} tokens/sec/GPU "
            f"({r['predicted_step_time_s']:.3f} s/step); measured / predicted = "
            f"{tps / r['predicted_tokens_per_sec_per_gpu']:.2f}"
            for r in fsdp[:1]
            if r.get("predicted_tokens_per_sec_per_gpu")
        ],
        f"- peak memory: {max(r['peak_mem_gb'] for r in fsdp):.1f} GB",
        f"- loss: {fsdp[0]['loss']:.4f} at step {fsdp[0]['step']} -> {fsdp[-1]['loss']:.4f} at step {fsdp[-1]['step']}",
    ]
else:
    lines.append("FAILED: no metrics (see the steps below)")

lines += ["", "## 4. Ours vs Hugging Face at the 1.1B shapes (bench/throughput.py)", ""]
table = work / "throughput.md"
if table.is_file():  # its title one level below this section's
    lines += [f"##{line}" if line.startswith("# ") else line for line in table.read_text().splitlines()]
else:
    lines.append("FAILED: no table (see the steps below)")
with open(sections, "a") as f:
    f.write("\n".join(lines) + "\n")
sys.exit(3 if any(line.endswith("| FAILED |") or "FAILED: no losses" in line for line in lines) else 0)
EOF
if [ "$report_status" != 0 ]; then
  failed=1
  echo "report: loss parity FAILED (exit status $report_status)" >> "$work/steps.txt"
fi

gpu=$("$python" -c "import torch; print(torch.cuda.get_device_name())")
slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g')
out="bench/results/$(date +%F)-gpu-check-$slug.md"
{
  echo "# GPU check: $gpu ($(date +%F))"
  echo
  echo "- command: \`bash bench/gpu_check.sh\` at commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with local changes)')"
  echo "- torch $("$python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'); $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null | head -n 1 || echo 'nvidia-smi not found')"
  echo "- wall time: $(( $(date +%s) - start )) s; GPU_CHECK_1B='${GPU_CHECK_1B:-}'"
  echo
  cat "$sections"
  echo
  echo "## Steps"
  echo
  echo '```'
  cat "$work/steps.txt"
  echo '```'
} > "$out"
echo "wrote $out"
if [ "$failed" = 1 ]; then
  echo "gpu_check: some steps failed; see $out" >&2
  exit 1
fi
