"""benchmarks/runtime_bench.py runs end to end on a synthetic bundle (a smoke run; the numbers are the real bundle's
business) and its fault-injection results agree with the same stacks left out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_data

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_run(bundle: SyntheticBundle, tmp_path: Path) -> None:
    x, y = make_data(200, seed=21)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "runtime_bench.py"), str(bundle.path),
                             "--data", str(tmp_path / "test.npz"), "--out", str(out), "--quick", "--repeats", "10"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "runtime_bench.json").read_text())
    assert {"meta", "overhead", "latency_vs_members", "latency_budget", "deadline", "fixed_k", "early_exit",
            "faults"} <= set(results)
    assert [r["members"] for r in results["latency_vs_members"] if r["batch"] == 1] == [2, 4, 6]
    half = x[100:]  # without --val, p is fitted on the first half and accuracy measured on the second
    expected = (bundle.expected(half, [0, 1, 2, 3, 4, 5]).argmax(axis=1) == y[100:]).mean()
    assert results["fixed_k"][-1]["accuracy"] == pytest.approx(expected)
    for row in results["faults"]:
        # Stacks failing in the runtime give exactly the accuracy of leaving them out.
        assert row["runtime_accuracy"] == pytest.approx(row["left_out_accuracy"])
    assert [r.get("stacks_failing", 0) for r in results["faults"]] == [0, 0, 1, 2]
    assert results["faults"][-1]["failures_reported"] > 0
    assert "## Faults" in (out / "runtime_bench.md").read_text()
    assert results["meta"]["profiled_now"] and (bundle.path / "latency.json").is_file()
