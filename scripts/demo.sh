#!/usr/bin/env bash
# The main job: set up, train the default ensemble (mlp-256x4, lam 0.99, Fashion-MNIST, 30 epochs), export it as a
# deployment bundle, profile it on this machine, and run budgeted inference on the test set: all members, the first
# 10% of members, and a 0.5 ms deadline per batch of 64. Extra arguments go to `edgens train` (e.g. --epochs 5).
# Rerunning continues where it stopped: a finished run is not retrained, an interrupted one resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/default}
BUNDLE=${BUNDLE:-$RUN-bundle}
if [ -f "$RUN/summary.json" ]; then
  echo "$RUN is already trained"
elif [ -f "$RUN/config.json" ]; then
  edgens train --resume "$RUN"
else
  edgens train --out "$RUN" "$@"
fi
edgens inspect "$RUN"
[ -f "$BUNDLE/manifest.json" ] || edgens export "$RUN" -o "$BUNDLE"
edgens profile "$BUNDLE" --batch-sizes 1,64 >/dev/null
for budget in "" "--members 0.1" "--deadline-ms 0.5"; do
  echo "== edgens infer $BUNDLE --input fashion-mnist:test $budget"
  edgens infer "$BUNDLE" --input fashion-mnist:test $budget
done
