#!/usr/bin/env bash
# Create .venv and install the project into it; `--dev` adds the test dependencies.
# torch is installed first and pinned (TORCH_SPEC to change it): on a CPU machine this is a CPU build
# from local disk, where a plain `torch` requirement would pull a multi-GB CUDA build.
# A second run with the same setup.py and torch pin does nothing (it works offline); delete
# .venv/.llama-setup to install again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
mode=base
[ "${1:-}" = "--dev" ] && mode=dev
want="$(sha256sum setup.py | cut -c1-16) ${TORCH_SPEC:-torch==2.13.0}"
stamp=.venv/.llama-setup
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && { grep -qxF "$want dev" "$stamp" || grep -qxF "$want $mode" "$stamp"; }; then
  echo "setup: .venv is up to date ($mode; delete $stamp to install again)"
  exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
if [ "$mode" = dev ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
echo "$want $mode" > "$stamp"
