#!/usr/bin/env bash
# Set up edgens on a fresh Debian machine with Python 3.11: system data package, torch (a CPU build where there is
# no NVIDIA GPU, never a multi-GB CUDA build on a CPU-only machine), and edgens itself with its extras.
# Idempotent: run it again and it only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

# 1. Fashion-MNIST from Debian (files in /usr/share/datasets/fashion-mnist).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# 2. torch. The pinned version has a CPU wheel on this project's machines (found through pip's find-links); elsewhere,
#    without a GPU, take the CPU build from PyTorch's own index instead of PyPI's CUDA build.
TORCH_VERSION=${EDGENS_TORCH_VERSION:-2.13.0}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  local_wheel=""
  for dir in ${PIP_FIND_LINKS:-}; do
    if ls "$dir"/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then local_wheel=yes; fi
  done
  if [ -n "$local_wheel" ] || command -v nvidia-smi >/dev/null; then
    "$PYTHON" -m pip install -q "torch==$TORCH_VERSION"
  else
    "$PYTHON" -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

# 3. edgens (editable) with training/export, plots and test extras.
"$PYTHON" -m pip install -q -e ".[train,plots,serve,test]"
"$PYTHON" -c "import torch, edgens; print(f'edgens {edgens.__version__} ready (torch {torch.__version__}, CUDA: {torch.cuda.is_available()})')"
