#!/usr/bin/env bash
# Set up (or update) .venv-flower: Flower's deployment-mode processes for the bandwidth benchmark's baselines
# (`asyndgan bench bandwidth`). A separate environment because flwr 1.42 requires protobuf < 7 and asyndgan's
# generated gRPC code protobuf >= 7: both cannot share one. Idempotent; ASYNDGAN_FLOWER_VENV to put it elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ASYNDGAN_FLOWER_VENV:-.venv-flower}
FLWR=1.42.0  # pinned: Flower's API and transport change between releases (see experiments/flower_runner.py)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install "torch>=2.2"
  elif ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    $PIP install "torch==2.13.0"
  else
    $PIP install "torch>=2.2" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# The Flower app's own needs (experiments/flower_app/pyproject.toml): the same MONAI U-Net, safetensors for the
# weights the benchmark hands over.
"$VENV/bin/python" -c "import flwr, monai, safetensors; assert flwr.__version__ == '$FLWR'" 2>/dev/null \
  || $PIP install "flwr==$FLWR" "monai>=1.6.1" "safetensors>=0.4" "numpy>=1.26"
FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 "$VENV/bin/python" -c \
  "import flwr, torch; print('Flower', flwr.__version__, 'ready in $VENV; torch', torch.__version__)"
