#!/usr/bin/env bash
# Prepare what scripts/gpu_check.py needs on the GPU machine, which reaches no registry and has no onnx: a copy of
# Fashion-MNIST and a small finished run with its exported bundle (for the torch-CUDA vs onnxruntime-CPU parity
# check), in gpu-check/ (ignored by git, about 50 MB: under the device tool's 64 MiB carry limit). Then:
#   run(command="python scripts/gpu_check.py --data-dir gpu-check/fashion-mnist --run gpu-check/run \
#                --bundle gpu-check/bundle --out $OUT/gpu-check", carry=["gpu-check"])
set -euo pipefail
cd "$(dirname "$0")/.."
FASHION=/usr/share/datasets/fashion-mnist
rm -rf gpu-check && mkdir -p gpu-check/fashion-mnist
cp "$FASHION"/*-ubyte.gz gpu-check/fashion-mnist/
edgens train --preset mlp-16x64 --epochs 2 --train-limit 10000 --data-dir gpu-check/fashion-mnist \
  --out gpu-check/run --quiet
edgens export gpu-check/run -o gpu-check/bundle --specialist-size 0 --prefix-stacks none --json > /dev/null
rm gpu-check/run/checkpoints/last.pt  # load_run reads the best checkpoint only; the carry limit is 64 MiB
du -sh gpu-check
