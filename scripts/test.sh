#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite (GPU and TensorRT tests skip themselves without them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q "$@"
