#!/usr/bin/env bash
# Set up (scripts/setup.sh, scripts/install_perf_analyzer.sh), lint (ruff, with the rules in pyproject.toml), run the whole test suite (GPU and
# TensorRT tests skip themselves without them), then check the device install on its own
# (scripts/check_device_install.sh: a fresh venv with only edgens[runtime]), and again at the lowest versions it
# declares (scripts/check_floors.sh, which also checks the code for Python 3.10).
# Arguments go to pytest; with arguments (a selection of tests) the device install check is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# perf_analyzer (Triton's load generator) in a venv of its own, for tests/serve/test_perf_analyzer.py, which must
# then run rather than skip
EDGENS_PERF_ANALYZER=$(bash scripts/install_perf_analyzer.sh | tail -1)
export EDGENS_PERF_ANALYZER EDGENS_REQUIRE_PERF_ANALYZER=1
python3 -m ruff check .
python3 -m pytest -q "$@"
if [ "$#" = 0 ]; then
  bash scripts/check_device_install.sh
  bash scripts/check_floors.sh   # the device install at its declared floors, and Python 3.10 (vermin)
fi
