#!/usr/bin/env bash
# Install Triton's load generator perf_analyzer in a venv of its own (it is a C++ binary shipped inside the
# tritonclient wheel; it must not change the project's own tritonclient). Prints the binary's path.
#
# tritonclient 2.51.0 is the newest wheel whose perf_analyzer needs only glibc 2.34 (Debian 12 has 2.36). The binary
# links libb64 (Debian's libb64-0d) and libcudart.so.12 even without a GPU: the CUDA runtime comes from PyPI's
# nvidia-cuda-runtime-cu12 and is found through LD_LIBRARY_PATH (bin/perf_analyzer below is a wrapper that sets it).
# Idempotent. EDGENS_PERF_VENV (default /opt/edgens-perf-analyzer) says where.
set -euo pipefail
VENV=${EDGENS_PERF_VENV:-/opt/edgens-perf-analyzer}
PYTHON=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
if ! ldconfig -p 2>/dev/null | grep -q 'libb64.so.0d'; then
  if ! $SUDO apt-get install -y -qq libb64-0d >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libb64-0d >/dev/null
  fi
fi
if [ ! -x "$VENV/bin/perf_analyzer.real" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q 'tritonclient==2.51.0' 'nvidia-cuda-runtime-cu12>=12.0,<13'
  mv "$VENV/bin/perf_analyzer" "$VENV/bin/perf_analyzer.real"
  cudart=$("$VENV/bin/python" -c "import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], 'lib'))")
  cat > "$VENV/bin/perf_analyzer" <<WRAPPER
#!/bin/sh
LD_LIBRARY_PATH="$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$VENV/bin/perf_analyzer.real" "\$@"
WRAPPER
  chmod +x "$VENV/bin/perf_analyzer"
fi
"$VENV/bin/perf_analyzer" --version >/dev/null 2>&1 || { echo "perf_analyzer in $VENV does not run" >&2; exit 1; }
echo "$VENV/bin/perf_analyzer"
