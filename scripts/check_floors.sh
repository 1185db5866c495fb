#!/usr/bin/env bash
# What the declared dependencies promise is tested: the device install (`edgens[runtime]`) at exactly the lower bound
# of every dependency it declares (a constraints file made from pyproject.toml), in a fresh venv; there, the runtime
# tests and the device-install check (scripts/check_device_install.sh, its venv pinned by the same constraints). A
# floor that fails here is raised in pyproject.toml, not worked around. Also: the code the device runs (and the
# whole package, which declares Python >= 3.10) is checked for Python 3.10 with vermin, since JetPack 6 has 3.10
# and no registry here offers it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/edgens-floors.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "== Python 3.10: vermin"
vermin -t=3.10- --no-tips --violations --eval-annotations --exclude-regex '^build/' \
    edgens/ runtime/ export/ tests/ scripts/ benchmarks/

echo "== the device install at its floors in $WORK"
"$PYTHON" - "$WORK/floors.txt" <<'EOF'
import sys
import tomllib
from packaging.requirements import Requirement

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = []
for text in [*project["dependencies"], *project["optional-dependencies"]["runtime"]]:
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": "runtime"}):
        continue  # not for this machine (e.g. a Jetson's onnxruntime comes from NVIDIA's index)
    floors = [s.version for s in requirement.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{text}: expected one lower bound (>=) to test"
    pins.append(f"{requirement.name}=={floors[0]}")
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("floors:", ", ".join(pins))
EOF
"$PYTHON" -m venv "$WORK/venv"
VENV_PY="$WORK/venv/bin/python"
# test tools only beside it (pytest, hypothesis, onnx to build the tests' bundles, jsonschema): none may move a floor
if ! "$VENV_PY" -m pip install -q -c "$WORK/floors.txt" "$ROOT[runtime]" pytest hypothesis onnx jsonschema \
        > "$WORK/pip.log" 2>&1; then
  cat "$WORK/pip.log" >&2
  exit 1
fi
"$VENV_PY" - "$WORK/floors.txt" <<'EOF'
import sys
from importlib.metadata import version
def release(text):  # "8.2" and "8.2.0" are one release
    parts = [int(part) for part in text.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return parts

for line in open(sys.argv[1]).read().split():
    name, wanted = line.split("==")
    assert release(version(name)) == release(wanted), f"{name} {version(name)} installed, the floor is {wanted}"
print("installed at the floors:", ", ".join(open(sys.argv[1]).read().split()))
EOF
"$VENV_PY" -m pytest -q -p no:cacheprovider tests/runtime
PIP_CONSTRAINT="$WORK/floors.txt" PYTHON="$PYTHON" bash scripts/check_device_install.sh
echo "floors check passed"
