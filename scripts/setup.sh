#!/usr/bin/env bash
# Create .venv and install lmforge with its dev extra. Safe to run again: it only reinstalls when
# pyproject.toml changed. Without a GPU it installs PyTorch's CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV=".venv"
STAMP="$VENV/.lmforge-installed"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
want="$(sha256sum pyproject.toml | cut -d' ' -f1) torch-$TORCH_VERSION"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

"${PIP[@]}" install -q --upgrade pip setuptools wheel
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing torch $TORCH_VERSION (CUDA build)"
    "${PIP[@]}" install -q "torch==$TORCH_VERSION"
  elif "${PIP[@]}" install -q --no-index --no-deps "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
    echo "[setup] no GPU: installed torch $TORCH_VERSION+cpu from a local wheel"
  else
    echo "[setup] no GPU: installing torch $TORCH_VERSION CPU build from the PyTorch CPU index"
    "${PIP[@]}" install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi
echo "[setup] installing lmforge[dev] (editable)"
"${PIP[@]}" install -q -e ".[dev]"
echo "$want" > "$STAMP"
