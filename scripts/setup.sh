#!/usr/bin/env bash
# Set up (or update) .venv with asyndgan and its test tools. Idempotent; safe to run before every command.
# Where no NVIDIA GPU is present, installs a CPU build of PyTorch (a plain `torch` requirement would pull a
# multi-GB CUDA build); with a GPU, the default (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install "torch>=2.2"
  elif ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    $PIP install "torch==2.13.0"   # a CPU wheel provided on this machine's disk
  else
    $PIP install "torch>=2.2" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$PIP install -e ".[all,dev]"
# Flower, in its own environment, for the bandwidth benchmark's baselines (and its test)
./scripts/setup-flower.sh
# Docker engine, compose and debootstrap for the container test (installed only as root on Debian, when missing)
./scripts/setup-docker.sh
.venv/bin/python -c "import asyndgan.central_server, asyndgan.site_agent, torch; print('asyndgan ready; torch', torch.__version__)"
