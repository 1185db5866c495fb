#!/usr/bin/env bash
# Run the timing-dependent tests N times in a row (default 20) while a busy loop keeps every core loaded, and stop at
# the first failure: a test that waits on sleeps or tight wall-clock margins fails here long before CI meets it.
#
#     bash scripts/stress_timing_tests.sh [N] [pytest selection...]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-20}
shift || true
selection=("$@")
if [ ${#selection[@]} = 0 ]; then
  selection=(tests/runtime/test_anytime.py tests/runtime/test_batching.py tests/runtime/test_threads.py
             tests/runtime/test_faults.py tests/runtime/test_lanes.py tests/runtime/test_silent_faults.py
             "tests/runtime/test_device.py::test_latency_calls_racing_power_mode_changes_never_fail_and_end_on_the_new_table"
             tests/serve/test_lifecycle.py tests/serve/test_absurd_inputs.py tests/test_interruptions.py::test_an_interrupt_in_a_finalizer_is_remembered_not_printed)
fi
cores=$(nproc)
pids=()
for _ in $(seq "$cores"); do
  python3 -c "while True: pass" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for i in $(seq "$rounds"); do
  if ! python3 -m pytest -q -p no:cacheprovider -x "${selection[@]}" > /tmp/edgens-stress.log 2>&1; then
    echo "round $i of $rounds failed under load:"
    tail -40 /tmp/edgens-stress.log
    exit 1
  fi
  echo "round $i of $rounds: $(tail -1 /tmp/edgens-stress.log)"
done
echo "all $rounds rounds passed with $cores busy loops"
