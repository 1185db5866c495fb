"""The learner-collusion diagnostic: against numpy re-computations, on ensembles built to collude or not, per epoch
in a real training run (metrics.jsonl, the warning, resume), and recomputed afterwards by `edgens inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import subprocess
import sys
from edgens.collusion import run_collusion
from edgens.config import TrainConfig
from edgens.diagnostics import COLLUSION_FRACTION, COLLUSION_RATIO, collusion_diagnostics, is_colluding
from edgens.rundir import RunDir
from edgens.train import train


def _softmax(eta: np.ndarray) -> np.ndarray:
    p = np.exp(eta - eta.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _numpy_collusion(train_eta: np.ndarray, train_y: np.ndarray, val_eta: np.ndarray, val_y: np.ndarray) -> dict:
    """The same quantities, written out independently for categorical members."""
    centre = lambda a: a - a.mean(-1, keepdims=True)  # noqa: E731
    offsets = centre(train_eta - train_eta.mean(0)).mean(1, keepdims=True)
    out = {}
    for split, eta, y in (("train", train_eta, train_y), ("val", val_eta, val_y)):
        q_bar, q = _softmax(eta.mean(0)), _softmax(eta)
        diversity = (q_bar * (np.log(q_bar) - np.log(q))).sum(-1).mean()
        member_loss = -np.log(q[:, np.arange(len(y)), y]).mean()
        deviation = centre(eta - eta.mean(0))
        out[f"{split}_diversity_ratio"] = diversity / member_loss
        out[f"{split}_debiased_fraction"] = 1 - ((deviation - offsets) ** 2).sum(-1).mean() / \
            (deviation ** 2).sum(-1).mean()
        out[f"{split}_diversity"], out[f"{split}_member_loss"] = diversity, member_loss
    out["diversity_ratio_gap"] = out["train_diversity_ratio"] - out["val_diversity_ratio"]
    return out


def _ensembles(seed: int = 0, m: int = 8, n: int = 400, k: int = 10) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    truth = rng.normal(scale=2.0, size=(n, k))
    y = truth.argmax(-1)
    offsets = rng.normal(scale=4.0, size=(m, 1, k))
    offsets -= offsets.mean(0)  # cancel in the ensemble
    return y, {"colluding": truth + offsets + 0.1 * rng.normal(size=(m, n, k)),
               "independent": truth + rng.normal(size=(m, n, k))}


def test_collusion_against_numpy() -> None:
    y, ensembles = _ensembles()
    for eta in ensembles.values():
        train_eta, val_eta = eta[:, :250], eta[:, 250:] + 0.05
        got = collusion_diagnostics(torch.tensor(train_eta), torch.tensor(y[:250]), torch.tensor(val_eta),
                                    torch.tensor(y[250:]), "categorical")
        expected = _numpy_collusion(train_eta, y[:250], val_eta, y[250:])
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_offsets_that_cancel_are_found_and_the_ensemble_is_unchanged() -> None:
    y, ensembles = _ensembles(seed=1)
    colluding = collusion_diagnostics(torch.tensor(ensembles["colluding"]), torch.tensor(y),
                                      torch.tensor(ensembles["colluding"]), torch.tensor(y), "categorical")
    independent = collusion_diagnostics(torch.tensor(ensembles["independent"]), torch.tensor(y),
                                        torch.tensor(ensembles["independent"]), torch.tensor(y), "categorical")
    assert colluding["val_debiased_fraction"] > 0.99 and independent["val_debiased_fraction"] < 0.05
    assert is_colluding(colluding) and not is_colluding(independent)
    assert colluding["val_diversity_ratio"] > independent["val_diversity_ratio"]
    # gaussian members: the spread is twice the diversity (KL = (eta_j - eta_bar)^2 / 2), so the fraction is exact
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(300, 1))
    eta = truth + rng.normal(size=(6, 1, 1)) + 0.3 * rng.normal(size=(6, 300, 1))
    got = collusion_diagnostics(torch.tensor(eta), torch.tensor(truth[:, 0]), torch.tensor(eta),
                                torch.tensor(truth[:, 0]), "gaussian")
    deviation = eta - eta.mean(0)
    offsets = deviation.mean(1, keepdims=True)
    assert got["val_diversity"] == pytest.approx(0.5 * (deviation ** 2).mean(), rel=1e-5)
    assert got["val_debiased_fraction"] == pytest.approx((offsets ** 2).mean() / (deviation ** 2).mean(), rel=1e-4)
    assert 0 < COLLUSION_FRACTION < 1 and 0 < COLLUSION_RATIO < 1


def test_training_records_collusion_every_epoch_and_inspect_recomputes_it(tmp_path: Path,
                                                                         fashion_mnist_dir: Path) -> None:
    config = TrainConfig(preset="mlp-64x16", lam=1.0, epochs=2, train_limit=2000, val_size=1000,
                         data_dir=str(fashion_mnist_dir), seed=3)
    run_dir = tmp_path / "run"
    train(config, run_dir)
    records = RunDir(run_dir).metrics()
    for record in records:
        assert set(record["collusion"]) >= {"train_diversity_ratio", "val_diversity_ratio", "diversity_ratio_gap",
                                            "val_debiased_fraction"}
        assert record["colluding"] == is_colluding(record["collusion"])
        # the validation diversity is the epoch's ambiguity (same outputs, same definition)
        assert record["collusion"]["val_diversity"] == pytest.approx(record["val"]["ambiguity"], rel=1e-4)
    json.dumps(records)
    recomputed = run_collusion(run_dir)  # the best checkpoint: the last epoch's weights if it was best
    best = next(r for r in records if r["epoch"] == records[-1]["best_epoch"])
    assert recomputed["val_diversity"] == pytest.approx(best["collusion"]["val_diversity"], rel=1e-3)
    def inspect(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "edgens", "inspect", str(run_dir), *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    shown = inspect("--collusion")
    assert "collusion  last epoch: diversity/member loss" in shown and "collusion  best weights:" in shown
    assert ("learner collusion seen from epoch" in shown) == any(r["colluding"] for r in records)
    as_json = json.loads(inspect("--json", "--collusion"))
    assert as_json["collusion_best"]["val_diversity"] == pytest.approx(recomputed["val_diversity"])
