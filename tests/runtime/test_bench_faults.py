"""`edgens bench faults` on a real (synthetic-weight) bundle, torch blocked: its accuracies are checked against numpy
evaluations of the corrupted ONNX graphs and of the survivors' mean."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from bundle_factory import SyntheticBundle, make_bundle, make_data
from click.testing import CliRunner
from onnx import numpy_helper

from edgens.cli import cli
from edgens.runtime.faults import BitFault, apply_bit_faults


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    return make_bundle(tmp_path_factory.mktemp("bench-faults") / "bundle", n_members=16, per_stack=4, hidden=8,
                       prefixes=[8, 16], outliers=True, self_test=True)


def _graph_eta(model: bytes, x: np.ndarray, members: int) -> np.ndarray:
    """The factory's stack graph evaluated in numpy (float64) from the initializers the onnx package reads."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx.load_from_string(model).graph.initializer}
    h = np.maximum(x @ w["w1"] + w["b1"], 0.0).reshape(len(x), members, -1).transpose(1, 0, 2)
    return h @ w["w2"] + w["b2"]


def test_faults_bench_end_to_end(guarded: SyntheticBundle, tmp_path: Path) -> None:
    x, y = make_data(256, seed=31)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["bench", "faults", str(guarded.path), "--data", str(tmp_path / "test.npz"),
                                      "--draws", "4", "--random-draws", "2", "--sweep-draws", "1",
                                      "--sweep-examples", "64", "--shuffles", "1", "--cost-rounds", "1",
                                      "--out", str(out), "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "faults.json").read_text())
    assert (out / "faults.md").is_file()
    if importlib.util.find_spec("matplotlib"):  # the plots extra (not in the device install the floors check runs)
        assert (out / "faults.png").stat().st_size > 10_000
    bundle = data["bundles"][0]
    assert set(bundle) >= {"clean", "harmful", "random", "self_test", "sweep", "thresholds"}
    assert len(bundle["sweep"]["by_bit"]) == 32 and set(bundle["sweep"]["by_flips"]) == {"1", "4", "16", "64"}
    # left-out baselines: the accuracy of the mean over every member outside the group, in numpy
    xn = guarded.normalise(x)
    groups = {s.name: s.members for s in guarded.manifest.general_stacks}
    draws = [d for part in bundle["harmful"].values() for d in part["draws"]]
    assert all(d["group"] in groups for d in draws)
    for draw in draws:
        others = [m for m in guarded.order if m not in groups[draw["group"]]]
        want = float((guarded.expected_eta(x, others).argmax(1) == y).mean())
        assert draw["left_out_accuracy"] == pytest.approx(want, abs=1e-5)  # JSON keeps 6 digits
    checked = 0
    for draw in bundle["harmful"]["all"]["draws"]:
        assert draw["stack"] == "prefix-0016" and draw["bit"] in range(23, 31)
        off = draw["mean, detection off"]
        if off["loud_calls"]:
            continue  # onnxruntime overflowed to inf and the runtime fell back: numpy in float64 would not
        model = apply_bit_faults((guarded.path / "stacks/prefix-0016.onnx").read_bytes(),
                                 [BitFault(draw["tensor"], draw["index"], draw["bit"])])
        eta = _graph_eta(model, xn, 16).mean(axis=0)
        assert off["accuracy"] == pytest.approx(float((eta.argmax(1) == y).mean()), abs=1 / len(y))
        checked += 1
    assert checked >= 1
