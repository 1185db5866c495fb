"""Training on real Fashion-MNIST (small subsets): accuracy, run directory, resume, errors, diagnostics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgens.checkpoint import load_checkpoint
from edgens.config import TrainConfig
from edgens.diagnostics import epoch_diagnostics, is_dominated
from edgens.errors import ConfigError, DataNotFoundError, RunDirectoryError, TrainingDivergedError
from edgens.rundir import RunDir
from edgens.train import Callbacks, bootstrap_counts, resume, train


def _small(fashion_mnist_dir: Path, **overrides) -> TrainConfig:
    settings = {"preset": "mlp-64x16", "lam": 0.95, "epochs": 2, "train_limit": 3000, "val_size": 2000,
                "data_dir": str(fashion_mnist_dir), "seed": 7}
    settings.update(overrides)
    return TrainConfig(**settings)


def test_short_training_is_far_above_chance(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    summary = train(_small(fashion_mnist_dir, epochs=3, train_limit=6000), tmp_path / "run")
    assert summary["test"]["ensemble_error"] < 0.25  # chance is 0.9
    assert summary["test"]["ensemble_error"] <= summary["test"]["median_member_error"]


def test_run_directory_contents(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    run = RunDir(tmp_path / "run")
    summary = train(_small(fashion_mnist_dir), run.path)
    config = run.config()
    assert config["config"]["lam"] == 0.95 and config["config"]["seed"] == 7
    assert config["resolved"]["lr"] == 0.02 and "per-member" in config["resolved"]["lr_convention"]
    assert config["data"]["source"]["directory"] == str(fashion_mnist_dir)
    assert {"torch", "numpy", "python", "edgens"} <= set(config["versions"])
    records = run.metrics()
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("ensemble_loss", "ensemble_error", "member_loss", "member_error", "ambiguity", "best_member_error",
                "median_member_error", "worst_member_error", "dominance_ratio", "entropy_min", "entropy_max",
                "entropy_mean", "entropy_std"):
        assert np.isfinite(records[-1]["val"][key]), key
    for key in ("loss", "ensemble_loss", "member_loss", "ambiguity", "ensemble_error"):
        assert np.isfinite(records[-1]["train"][key]), key
    # saved test outputs reproduce the summary by the paper's combination rule (mean of logits, then argmax)
    eta, y = run.outputs("test")
    assert eta.shape == (64, 10_000, 10) and eta.dtype == np.float32
    error = float((eta.mean(0).argmax(-1) != y).mean())
    assert error == pytest.approx(summary["test"]["ensemble_error"], abs=1e-6)
    member_errors = (eta.argmax(-1) != y[None]).mean(1)
    np.testing.assert_allclose(summary["test"]["member_errors"], member_errors, atol=1e-6)
    assert run.require_finished()["stack"]["n_members"] == 64
    best = load_checkpoint(run.best_checkpoint)
    assert best["epoch"] == summary["best_epoch"]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("terms", [{}, {"anytime_weight": 1.0, "fault_weight": 1.0}], ids=["paper", "budgets+faults"])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path: Path, fashion_mnist_dir: Path,
                                                             terms: dict) -> None:
    # with the random-subset term too: its masks are a function of (seed, epoch, batch), so a resume redraws them
    config = _small(fashion_mnist_dir, epochs=4, train_limit=1500, lr_milestones=(0.5,), **terms)
    full = train(config, tmp_path / "full")

    def stop_in_epoch_three(batch: int, loss: float | None) -> None:
        if len(RunDir(tmp_path / "cut").metrics()) == 2 and batch == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(config, tmp_path / "cut", Callbacks(batch_end=stop_in_epoch_three))
    assert not RunDir(tmp_path / "cut").is_finished()
    resumed = resume(tmp_path / "cut")

    for name in ("last", "best"):
        a = load_checkpoint(tmp_path / "full" / "checkpoints" / f"{name}.pt")["model"]
        b = load_checkpoint(tmp_path / "cut" / "checkpoints" / f"{name}.pt")["model"]
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    for split in ("val", "test"):
        assert resumed[split]["ensemble_error"] == full[split]["ensemble_error"]
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in RunDir(tmp_path / "full").metrics()]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in RunDir(tmp_path / "cut").metrics()]
    assert resume(tmp_path / "cut")["best_epoch"] == full["best_epoch"]  # finished: nothing retrained


def test_patience_stops_early(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    # a learning rate so small that nothing improves after the first epoch
    summary = train(_small(fashion_mnist_dir, epochs=6, patience=1, lr=1e-9, train_limit=500), tmp_path / "run")
    assert summary["stopped_early"] and summary["epochs_run"] < 6


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"lam": 1.2}, ConfigError, "unbounded below"),
    ({"lam": -0.5}, ConfigError, r"lam must be in \[0, 1\]"),
    ({"preset": "mlp-3x3"}, ConfigError, "unknown preset"),
    ({"epochs": 0}, ConfigError, "epochs: expected an integer >= 1, got 0"),
    ({"weight_decay": float("nan")}, ConfigError, "weight_decay: expected a finite number >= 0, got nan"),
    ({"momentum": float("inf")}, ConfigError, r"momentum: expected a finite number in \[0, 1\), got inf"),
    ({"lr_milestones": (0.5, float("nan"))}, ConfigError, r"lr_milestones: expected a finite number in \(0, 1\)"),
    ({"method": "bagging", "lam": 0.5}, ConfigError, "lam must be 0"),
    ({"data_dir": "/nonexistent/dir"}, DataNotFoundError, "does not exist"),
    ({"dataset": "npz:/nonexistent.npz"}, DataNotFoundError, "does not exist"),
])
def test_bad_settings_write_nothing(tmp_path: Path, fashion_mnist_dir: Path, overrides, error, message) -> None:
    with pytest.raises(error, match=message):
        train(_small(fashion_mnist_dir, **overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_is_not_overwritten(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="--resume"):
        train(_small(fashion_mnist_dir), tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_divergence_is_reported(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        train(_small(fashion_mnist_dir, lr=1e8, lam=1.0, train_limit=800), tmp_path / "run")


def test_cuda_request_without_gpu(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        train(_small(fashion_mnist_dir, device="cuda"), tmp_path / "run")


@pytest.mark.gpu
def test_training_on_gpu(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    summary = train(_small(fashion_mnist_dir, device="cuda"), tmp_path / "run")
    assert summary["device"].startswith("cuda") and summary["test"]["ensemble_error"] < 0.35


def test_bagging_bootstrap_samples_differ_per_member(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    counts = bootstrap_counts(8, 1000, seed=3)
    assert (counts.sum(1) == 1000).all()  # each member draws N examples with replacement
    assert len({row.tobytes() for row in counts}) == 8
    # about 1 - 1/e of the examples appear in a bootstrap sample
    assert 0.6 < (counts > 0).mean() < 0.66
    summary = train(_small(fashion_mnist_dir, method="bagging", lam=0.0, epochs=1, preset="mlp-16x64"),
                    tmp_path / "bag")
    assert summary["method"] == "bagging" and summary["test"]["ensemble_error"] < 0.5


def test_gaussian_regression_on_generated_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 6)).astype(np.float32)
    y = (x @ rng.normal(size=6) + 0.1 * rng.normal(size=1200)).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=y)
    config = TrainConfig(preset="mlp-16x64", n_members=4, family="gaussian", dataset=f"npz:{tmp_path / 'reg.npz'}",
                         lam=0.9, epochs=5, lr=0.01, batch_size=50)
    summary = train(config, tmp_path / "run")
    assert summary["test"]["ensemble_error"] < 0.2 * float(np.var(y))  # MSE far below predicting the mean


def test_diagnostics_against_independent_maths() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    eta = rng.normal(size=(5, 300, 4))
    eta[0, np.arange(300), y] += 6.0  # member 0 is nearly perfect, the rest guess
    d = epoch_diagnostics(torch.tensor(eta), torch.tensor(y), "categorical")
    member_err = (eta.argmax(-1) != y).mean(1)
    np.testing.assert_allclose(d["member_errors"], member_err, atol=1e-6)
    assert d["best_member_error"] == pytest.approx(member_err.min(), abs=1e-6)
    assert d["median_member_error"] == pytest.approx(np.sort(member_err)[2], abs=1e-6)
    assert d["ensemble_error"] == pytest.approx((eta.mean(0).argmax(-1) != y).mean(), abs=1e-6)
    p = np.exp(eta - eta.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1).mean(1)
    assert d["entropy_std"] == pytest.approx(entropy.std(), rel=1e-5)
    assert d["entropy_min"] == pytest.approx(entropy.min(), rel=1e-5)
    log_p = np.log(p)
    assert d["member_loss"] == pytest.approx(-log_p[:, np.arange(300), y].mean(), rel=1e-5)
    eta_bar = eta.mean(0)
    q_bar = np.exp(eta_bar - eta_bar.max(-1, keepdims=True))
    q_bar /= q_bar.sum(-1, keepdims=True)
    assert d["ensemble_loss"] == pytest.approx(-np.log(q_bar[np.arange(300), y]).mean(), rel=1e-5)
    kl = (q_bar * (np.log(q_bar) - log_p)).sum(-1)  # KL(q_bar || q_j), (members, examples)
    assert d["ambiguity"] == pytest.approx(kl.mean(), rel=1e-5)
    assert is_dominated(d, 5)
    healthy = epoch_diagnostics(torch.tensor(eta[1:]), torch.tensor(y), "categorical")
    assert not is_dominated(healthy, 4)


def test_module_dominance_warning_is_recorded(tmp_path: Path, fashion_mnist_dir: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    # lam = 1 with a large rate on tiny members: the paper's failure mode shows within an epoch or two; whether it
    # does is data-dependent, so check the bookkeeping is consistent with the recorded ratios.
    summary_dir = tmp_path / "run"
    train(_small(fashion_mnist_dir, lam=1.0, preset="mlp-16x64", epochs=2, train_limit=1000), summary_dir)
    records = RunDir(summary_dir).metrics()
    for record in records:
        assert record["dominance"] == (record["val"]["dominance_ratio"] <= 0.5)
    assert any("module dominance" in m for m in caplog.messages) == any(r["dominance"] for r in records)
    json.dumps(records)  # metrics are plain JSON


def test_diagnostics_of_more_members_than_one_chunk() -> None:
    from edgens.diagnostics import MEMBER_CHUNK

    rng = np.random.default_rng(1)
    m, n, k = 2 * MEMBER_CHUNK + 5, 200, 10
    y = rng.integers(0, k, n)
    eta = rng.normal(scale=3.0, size=(m, n, k))
    d = epoch_diagnostics(torch.tensor(eta), torch.tensor(y), "categorical")
    p = np.exp(eta - eta.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q_bar = np.exp(eta.mean(0) - eta.mean(0).max(-1, keepdims=True))
    q_bar /= q_bar.sum(-1, keepdims=True)
    np.testing.assert_allclose(d["member_errors"], (eta.argmax(-1) != y).mean(1), atol=1e-6)
    assert d["member_loss"] == pytest.approx(-np.log(p[:, np.arange(n), y]).mean(), rel=1e-6)
    assert d["ambiguity"] == pytest.approx((q_bar * (np.log(q_bar) - np.log(p))).sum(-1).mean(), rel=1e-6)
    assert d["entropy_mean"] == pytest.approx(-(p * np.log(p)).sum(-1).mean(), rel=1e-6)
