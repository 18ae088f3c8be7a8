#!/usr/bin/env bash
# Time the main job from a fresh clone: `bash scripts/quickstart.sh` (setup + tokenize + train).
# Writes bench/results/<date>-main-job-<host kind>.md with the wall time and the run's final figures.
#   bash bench/main_job.sh [extra train overrides]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
git clone -q "$repo" "$work/clone"
cd "$work/clone"
start=$(date +%s)
bash scripts/quickstart.sh "$@" 2>&1 | tee "$work/log.txt"
wall=$(( $(date +%s) - start ))
device=$(.venv/bin/python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU, {__import__(\"os\").cpu_count()} cores')")
out="$repo/bench/results/$(date +%F)-main-job.md"
{
  echo "# Main job from a fresh clone ($(date +%F))"
  echo
  echo "- command: \`bash scripts/quickstart.sh $*\` in a fresh \`git clone\` (commit $(git rev-parse --short HEAD))"
  echo "- device: $device; torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
  echo "- wall time, setup included: ${wall} s"
  echo
  echo '```'
  grep -E "^step|^done|^tokenizer|^stackexchange|^source|^[a-z_]+ +[0-9]" "$work/log.txt" | tail -40
  echo '```'
} > "$out"
echo "wrote $out"
rm -rf "$work"
