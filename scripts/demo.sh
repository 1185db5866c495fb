#!/usr/bin/env bash
# The main job: set up, train the default ensemble (mlp-256x4, lam 0.99, Fashion-MNIST, 30 epochs) and print its
# test accuracy. Extra arguments go to `edgens train` (e.g. --epochs 5 for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/default}
if [ -f "$RUN/summary.json" ]; then
  echo "$RUN is already trained"
elif [ -f "$RUN/config.json" ]; then
  edgens train --resume "$RUN"
else
  edgens train --out "$RUN" "$@"
fi
edgens inspect "$RUN"
