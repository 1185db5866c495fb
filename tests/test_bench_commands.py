"""`edgens bench` on tiny real runs (Fashion-MNIST subsets): outputs checked against independent computations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgens.bench import sweep
from edgens.bench.lam_results import collect_sweep
from edgens.bench.report import write_results
from edgens.checkpoint import load_checkpoint
from edgens.cli import cli
from edgens.config import TrainConfig
from edgens.errors import RunDirectoryError
from edgens.rundir import RunDir
from edgens.train import Callbacks, bootstrap_counts

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]
PRESET = "mlp-16x64"
TINY = ["--epochs", "1", "--train-limit", "1000", "--val-size", "500", "--quiet"]


def _invoke(*args: str, code: int = 0):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    """A tiny sweep trained with the CLI: lam 0 and 1, two trials, with bagging and stacking."""
    out = tmp_path_factory.mktemp("sweep")
    _invoke("bench", "lambda", "--preset", PRESET, "--lams", "0,1", "--trials", "2", "--methods",
            "modular,bagging,stacking", "--data-dir", str(fashion_mnist_dir), "--out", str(out), "--threads", "2",
            *TINY)
    return out


def _run(sweep_dir: Path, lam: str = "0", method: str = "modular", trial: int = 0) -> Path:
    return sweep_dir / "runs" / f"{PRESET}-lam{lam}-{method}-t{trial}"


def _error(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(-1) != y).mean())


# --- bench lambda ------------------------------------------------------------------------------------------------
def test_lambda_table_matches_the_runs(sweep_dir: Path) -> None:
    data = json.loads((sweep_dir / f"lambda-{PRESET}.json").read_text())
    assert (sweep_dir / f"lambda-{PRESET}.md").is_file() and (sweep_dir / f"lambda-{PRESET}.png").stat().st_size
    keys = [(row["lam"], row["method"]) for row in data["rows"]]
    assert keys == [(0.0, "modular"), (0.0, "stacking"), (1.0, "modular"), (1.0, "stacking"), (0.0, "bagging")]
    assert data["missing"] == []
    for row in data["rows"]:
        if row["method"] == "stacking":
            continue
        errors, tenth = [], []
        for trial in range(2):
            run = RunDir(_run(sweep_dir, f"{row['lam']:g}", row["method"], trial))
            settings = run.config()["config"]
            assert (settings["seed"], settings["lam"], settings["method"]) == (trial, row["lam"], row["method"])
            eta, y = run.outputs("test")
            errors.append(_error(eta.astype(np.float64).mean(0), y))
            tenth.append(_error(eta[:round(0.1 * len(eta))].astype(np.float64).mean(0), y))  # the first 10% by id
        assert row["test_error"]["mean"] == pytest.approx(np.mean(errors), abs=1e-6)
        assert row["index_prefix_error"]["0.1"]["mean"] == pytest.approx(np.mean(tenth), abs=1e-6)
        assert row["test_error"]["se"] == pytest.approx(np.std(errors, ddof=1) / math.sqrt(2), abs=1e-6)
    markdown = (sweep_dir / f"lambda-{PRESET}.md").read_text()
    assert "| mlp-16x64 | 0 | bagging | 2 |" in markdown


def test_lambda_reuses_finished_runs(sweep_dir: Path, fashion_mnist_dir: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    summaries = sorted((sweep_dir / "runs").glob("*/summary.json"))
    assert len(summaries) == 6
    stamps = [p.stat().st_mtime_ns for p in summaries]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    import edgens.train

    monkeypatch.setattr(edgens.train, "train", no_training)
    monkeypatch.setattr(edgens.train, "resume", no_training)
    result = _invoke("bench", "lambda", "--preset", PRESET, "--lams", "0,1", "--trials", "2", "--methods",
                     "modular,bagging,stacking", "--data-dir", str(fashion_mnist_dir), "--out", str(sweep_dir),
                     "--name", "again", "--json", *TINY)
    assert "0 trained, 0 resumed, 6 reused" in result.stderr
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    first = json.loads((sweep_dir / f"lambda-{PRESET}.json").read_text())
    assert json.loads(result.stdout)["rows"] == first["rows"]


def test_interrupted_run_is_resumed_and_other_settings_are_refused(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    run = sweep.SweepRun(PRESET, 0.5, "modular", 0)
    config = sweep.run_config(run, epochs=2, train_limit=600, val_size=300, data_dir=str(fashion_mnist_dir))

    class Stop(Exception):
        pass

    def stop_after_first_epoch(record: dict) -> None:
        raise Stop

    from edgens.train import train

    with pytest.raises(Stop):
        train(config, tmp_path / run.name, Callbacks(epoch_end=stop_after_first_epoch))
    summary, status = sweep.ensure_run(tmp_path / run.name, config)
    assert status == "resumed" and summary["epochs_run"] == 2
    assert [r["epoch"] for r in RunDir(tmp_path / run.name).metrics()] == [1, 2]
    assert sweep.ensure_run(tmp_path / run.name, config)[1] == "reused"
    longer = sweep.run_config(run, epochs=3, train_limit=600, val_size=300, data_dir=str(fashion_mnist_dir))
    with pytest.raises(RunDirectoryError, match=r"epochs=2 \(expected 3\)"):
        sweep.ensure_run(tmp_path / run.name, longer)


def test_bagging_members_use_their_own_bootstrap_samples(sweep_dir: Path) -> None:
    counts = bootstrap_counts(16, 1000, seed=0)
    assert len({row.tobytes() for row in counts}) == 16 and (counts.sum(1) == 1000).all()
    bagged, independent = RunDir(_run(sweep_dir, method="bagging")), RunDir(_run(sweep_dir))
    assert bagged.config()["config"]["method"] == "bagging"
    # same seed, so the same initialisation and data order: the outputs differ only through the bootstrap weights
    a, b = bagged.outputs("test")[0], independent.outputs("test")[0]
    assert a.shape == b.shape and np.abs(a - b).mean() > 1e-2


def test_stacking_is_fitted_on_validation_outputs_only(sweep_dir: Path, tmp_path: Path) -> None:
    source = _run(sweep_dir, "1")
    copy = tmp_path / "runs" / source.name
    copy.mkdir(parents=True)
    for name in ("config.json", "summary.json", "metrics.jsonl"):
        (copy / name).write_bytes((source / name).read_bytes())
    (copy / "checkpoints").mkdir()
    (copy / "checkpoints" / "best.pt").write_bytes((source / "checkpoints" / "best.pt").read_bytes())
    for split in ("val", "test"):
        for what in ("eta", "y"):
            (copy / "outputs").mkdir(exist_ok=True)
            (copy / "outputs" / f"{split}_{what}.npy").write_bytes((source / "outputs" / f"{split}_{what}.npy")
                                                                   .read_bytes())
    before = collect_sweep(tmp_path / "runs", [PRESET], [1.0], ["stacking"], 1)["rows"][0]["trials"][0]
    test_eta, test_y = RunDir(copy).outputs("test")
    np.save(copy / "outputs" / "test_eta.npy", np.random.default_rng(0).normal(size=test_eta.shape)
            .astype(np.float32))
    after = collect_sweep(tmp_path / "runs", [PRESET], [1.0], ["stacking"], 1)["rows"][0]["trials"][0]
    assert after["combiner"] == before["combiner"] and after["val_error"] == before["val_error"]
    assert after["ensemble_error"] > 0.8 > before["ensemble_error"]  # the test score does see the new outputs


# --- bench drop ---------------------------------------------------------------------------------------------------
def test_drop_bench(sweep_dir: Path, tmp_path: Path) -> None:
    runs = [str(_run(sweep_dir, "0")), str(_run(sweep_dir, "1"))]
    result = _invoke("bench", "drop", *runs, "--repeats", "20", "--keep-probs", "1,0.5,0.1", "--out",
                     str(tmp_path), "--json", "--quiet")
    data = json.loads(result.stdout)
    assert json.loads((tmp_path / "drop.json").read_text()) == data
    assert (tmp_path / "drop.png").stat().st_size > 10_000 and "dropped at random" in (tmp_path / "drop.md").read_text()
    for run, entry in zip(runs, data["runs"]):
        eta, y = RunDir(run).outputs("test")
        m, n = eta.shape[:2]
        full = _error(eta.astype(np.float64).mean(0), y)
        curve = entry["random_drop"]
        assert len(curve["error_mean"]) == m == entry["n_members"] == 16
        assert curve["error_mean"][0] == pytest.approx(full, abs=1e-9)
        single = np.mean([_error(eta[j], y) for j in range(m)])
        assert abs(curve["error_mean"][-1] - single) < 5 * math.sqrt(0.25 / (n * 20))
        assert entry["bernoulli"]["error_mean"][0] == pytest.approx(full, abs=1e-9)
        greedy = entry["greedy"]
        assert sorted(greedy["order"]) == list(range(m))
        assert greedy["test_error"][-1] == pytest.approx(full, abs=1e-9)
        first = greedy["order"][0]
        assert greedy["test_error"][0] == pytest.approx(_error(eta[first], y), abs=1e-9)
        index = entry["index_order"]["test_error"]  # the first k members by id, recomputed here
        assert index[0] == pytest.approx(_error(eta[0], y), abs=1e-9)
        assert index[2] == pytest.approx(_error(eta[:3].mean(0), y), abs=1e-9) and index[-1] == pytest.approx(full)
        val_eta, val_y = RunDir(run).outputs("val")
        assert first == int(np.argmin([_error(val_eta[j], val_y) for j in range(m)]))  # chosen on validation


# --- bench specialists --------------------------------------------------------------------------------------------
def test_specialists_bench(sweep_dir: Path, tmp_path: Path) -> None:
    run = str(_run(sweep_dir, "1"))
    _invoke("bench", "specialists", run, "--size", "4", "--candidates", "20", "--out", str(tmp_path), "--quiet")
    data = json.loads((tmp_path / "specialists.json").read_text())
    entry = data["runs"][0]
    eta, y = RunDir(run).outputs("test")
    assert [row["name"] for row in entry["classes"]][:2] == ["T-shirt/top", "Trouser"]
    for row in entry["classes"]:
        c = row["class"]
        f1 = []
        for j in range(16):
            predicted = eta[j].argmax(-1) == c
            tp, fp, fn = np.sum(predicted & (y == c)), np.sum(predicted & (y != c)), np.sum(~predicted & (y == c))
            f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        assert row["single_mean"] == pytest.approx(np.mean(f1), abs=1e-5)
        assert len(row["greedy_members"]) == 4 and 0.0 <= row["greedy"] <= 1.0
    assert entry["gap_greedy"] == pytest.approx(entry["mean"]["greedy"] - entry["mean"]["random_subsets"], abs=1e-5)
    assert "Per class" in (tmp_path / "specialists.md").read_text() and (tmp_path / "specialists.png").is_file()


# --- bench dominance ----------------------------------------------------------------------------------------------
def test_dominance_bench(sweep_dir: Path, tmp_path: Path) -> None:
    run = _run(sweep_dir, "1")
    _invoke("bench", "dominance", str(run), "--filter-members", "2", "--out", str(tmp_path), "--quiet")
    data = json.loads((tmp_path / "dominance.json").read_text())
    entry = data["runs"][0]
    records = RunDir(run).metrics()
    np.testing.assert_allclose(entry["val_member_errors"], [r["val"]["member_errors"] for r in records], atol=1e-6)
    eta, y = RunDir(run).outputs("test")
    log_p = torch.log_softmax(torch.from_numpy(eta).double(), -1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean(-1).numpy()
    assert entry["test"]["entropy"]["std"] == pytest.approx(entropy.std(), rel=1e-4)
    assert entry["test"]["entropy"]["max"] == pytest.approx(entropy.max(), rel=1e-4)
    ensemble = np.asarray(entry["confusion"]["ensemble"])
    assert ensemble.sum() == len(y)
    assert np.trace(ensemble) == int((eta.astype(np.float64).mean(0).argmax(-1) == y).sum())
    worst = entry["confusion"]["worst"]
    assert np.trace(worst["matrix"]) == int((eta[worst["member"]].argmax(-1) == y).sum())
    # the filters shown are rows of the first layer's weight (member j owns rows [64 j, 64 j + 64))
    members = entry["filters"]["members"]
    assert entry["filters"]["shape"] == [2, 64, 1, 28, 28]
    from edgens.bench.dominance import first_layer_filters

    weight = load_checkpoint(run / "checkpoints" / "best.pt")["model"]["first.weight"].numpy()
    images = first_layer_filters(RunDir(run), members)
    np.testing.assert_array_equal(images[1].reshape(64, 784), weight[64 * members[1]:64 * members[1] + 64])
    for suffix in ("", "_confusion", "_filters"):
        assert (tmp_path / f"dominance{suffix}.png").stat().st_size > 5_000
    assert "entropy" in (tmp_path / "dominance.md").read_text()


# --- plots optional, errors, help -------------------------------------------------------------------------------------
def test_results_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgens.bench.plots import plot_drop

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    written = write_results(tmp_path, "x", {"value": 1.5, "_hidden": [1]}, "| a |\n", plot_drop)
    assert json.loads((tmp_path / "x.json").read_text()) == {"value": 1.5}
    assert (tmp_path / "x.md").read_text() == "| a |\n"
    assert written["plots"] == [] and "pip install 'edgens[plots]'" in written["plot_skipped"]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, message", [
    (["lambda", "--lams", "0,2"], r"lam values must be in [0, 1]"),
    (["lambda", "--methods", "modular,boosting"], "unknown bench method 'boosting'; expected one of: bagging"),
    (["lambda", "--preset", "mlp-9x9"], "unknown preset 'mlp-9x9'"),
    (["drop", "/nonexistent/run"], "run directory /nonexistent/run does not exist"),
    (["specialists", "--name", "../x", "/nonexistent/run"], "result name must be letters"),
])
def test_user_errors(args: list[str], message: str, tmp_path: Path) -> None:
    result = _invoke("bench", *args, "--out", str(tmp_path), code=2)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_unfinished_run_is_refused(tmp_path: Path, sweep_dir: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text((_run(sweep_dir) / "config.json").read_text())
    result = _invoke("bench", "dominance", str(tmp_path / "run"), "--out", str(tmp_path / "out"), code=2)
    assert "training has not finished" in result.stderr


def test_bench_help_is_torch_free() -> None:
    code = ("import sys\nfrom edgens.cli import main\n"
            "for args in (['bench', '--help'], ['bench', 'drop', '--help'], ['bench', 'lambda', '--help'],\n"
            "             ['bench', 'specialists', '--help'], ['bench', 'dominance', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit as exit:\n        assert exit.code == 0, args\n"
            "heavy = [m for m in ('torch', 'matplotlib', 'edgens.bench.analysis') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    assert "--keep-probs" in result.stdout and "--no-train" in result.stdout


def test_analysis_imports_without_torch() -> None:
    code = ("import sys\nimport edgens.bench.analysis, edgens.bench.drop, edgens.bench.specialists, "
            "edgens.bench.lam_results, edgens.bench.report, edgens.bench.plots\n"
            "assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


def test_sweep_plan_order_and_names() -> None:
    runs = sweep.plan_runs(["mlp-256x4"], [0.0, 0.99], ["stacking", "bagging"], 2)
    assert [r.name for r in runs] == ["mlp-256x4-lam0-modular-t0", "mlp-256x4-lam0.99-modular-t0",
                                      "mlp-256x4-lam0-bagging-t0", "mlp-256x4-lam0-modular-t1",
                                      "mlp-256x4-lam0.99-modular-t1", "mlp-256x4-lam0-bagging-t1"]
    config = sweep.run_config(runs[-1], epochs=5)
    assert isinstance(config, TrainConfig) and (config.seed, config.lam, config.method) == (1, 0.0, "bagging")


def test_tabulating_an_empty_sweep_lists_what_is_missing(tmp_path: Path) -> None:
    result = _invoke("bench", "lambda", "--preset", PRESET, "--lams", "0.5", "--trials", "2", "--no-train",
                     "--out", str(tmp_path), "--quiet")
    assert f"Not finished yet (2): {PRESET}-lam0.5-modular-t0, {PRESET}-lam0.5-modular-t1" in result.stdout
    data = json.loads((tmp_path / f"lambda-{PRESET}.json").read_text())
    assert data["rows"][0]["test_error"] == {"mean": None, "se": None, "n": 0}
    assert (tmp_path / f"lambda-{PRESET}.png").is_file()
