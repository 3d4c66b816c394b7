#!/usr/bin/env bash
# Creates .venv (once) and installs wanx with its test extras.
# torch is pinned and installed first: on CPU machines that pin resolves to the CPU wheel,
# whereas a loose spec would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -e ".[test,train]"
