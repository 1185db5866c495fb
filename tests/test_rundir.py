"""RunDir is the one reader of a run's settings, stack and checkpoints: each unreadable or inconsistent file is an
error that names it (train's resume, the distributed resume, export and the benches all read through it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgens.checkpoint import save_checkpoint
from edgens.config import TrainConfig
from edgens.errors import DataNotFoundError, RunDirectoryError
from edgens.presets import preset_spec
from edgens.rundir import RunDir
from edgens.train import resume


def _run(tmp_path: Path, preset: str = "mlp-16x64", n_members: int = 4) -> tuple[RunDir, dict]:
    """A run directory with config.json and a last checkpoint holding the same stack (written by hand)."""
    spec = preset_spec(preset, (1, 28, 28), 10, n_members)
    config = {"config": TrainConfig(preset=preset, n_members=n_members).to_dict(), "stack": spec.to_dict()}
    run = RunDir(tmp_path / "run")
    run.create(config)
    save_checkpoint(run.last_checkpoint, {"spec": spec.to_dict(), "model": {}, "epoch": 1})
    return run, config


def test_settings_stack_and_checkpoint_read_back(tmp_path: Path) -> None:
    run, config = _run(tmp_path)
    assert run.train_config() == TrainConfig.from_dict(config["config"])
    spec = run.stack_spec(check_preset=True)
    assert (spec.kind, spec.n_members, spec.options["hidden"]) == ("mlp", 4, (64,))
    assert run.checkpoint("last")["epoch"] == 1


def test_unreadable_config_names_the_file(tmp_path: Path) -> None:
    run, config = _run(tmp_path)
    del config["stack"]
    run.config_path.write_text(json.dumps(config))
    with pytest.raises(RunDirectoryError, match=r"config.json: the stack description is unreadable"):
        run.stack_spec()
    config["config"]["lam"] = 2.0
    run.config_path.write_text(json.dumps(config))
    with pytest.raises(RunDirectoryError, match=r"config.json: the training settings are unreadable \(lam must"):
        run.train_config()
    run.config_path.write_text("{not json")
    with pytest.raises(RunDirectoryError, match="config.json is not valid JSON"):
        run.train_config()
    run.config_path.unlink()
    with pytest.raises(DataNotFoundError, match="config.json is missing"):
        run.stack_spec()


def test_a_checkpoint_of_another_stack_is_refused(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    other = preset_spec("mlp-16x64", (1, 28, 28), 10, 5)
    save_checkpoint(run.last_checkpoint, {"spec": other.to_dict(), "model": {}, "epoch": 1})
    with pytest.raises(RunDirectoryError, match="last.pt holds a mlp stack of 5 members that differs from config"):
        run.checkpoint("last")
    with pytest.raises(RunDirectoryError, match="last.pt holds"):
        resume(run.path)  # train's resume reads through the same check
    run.last_checkpoint.write_bytes(b"truncated")
    with pytest.raises(RunDirectoryError, match="last.pt is not a readable checkpoint"):
        run.checkpoint("last")
    with pytest.raises(DataNotFoundError, match="best.pt is missing"):
        run.checkpoint("best")


def test_a_stack_that_is_not_its_preset(tmp_path: Path) -> None:
    run, config = _run(tmp_path)
    config["config"]["preset"] = "mlp-64x16"
    run.config_path.write_text(json.dumps(config))
    run.stack_spec()  # readable as it is
    with pytest.raises(RunDirectoryError, match="is not preset 'mlp-64x16'"):
        run.stack_spec(check_preset=True)


def test_damaged_outputs_are_one_error_that_says_how_to_rewrite_them(tmp_path: Path) -> None:
    import numpy as np

    run, _ = _run(tmp_path)
    run.write_outputs("val", np.zeros((4, 10, 10), np.float32), np.zeros(10, np.int64))
    eta, y = run.outputs("val")
    assert eta.shape == (4, 10, 10) and y.shape == (10,)
    path = run.output_path("val", "eta")
    path.write_bytes(path.read_bytes()[:300])  # a crash mid-copy, a full disk
    for mmap in (False, True):
        with pytest.raises(RunDirectoryError, match=r"val_eta.npy: not a readable numpy file .* delete .*summary.json "
                                                    r"and run `edgens train --resume"):
            run.outputs("val", mmap=mmap)
    run.write_outputs("val", np.zeros((4, 9, 10), np.float32), np.zeros(10, np.int64))
    with pytest.raises(RunDirectoryError, match=r"shape \(4, 9, 10\) does not match the \(10,\) targets"):
        run.outputs("val")
    run.output_path("val", "y").unlink()
    with pytest.raises(DataNotFoundError, match="val_y.npy: no such file"):
        run.outputs("val")


def test_a_damaged_metrics_line_names_the_file_and_line(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    run.write_metrics([{"epoch": 1}, {"epoch": 2}])
    assert [r["epoch"] for r in run.metrics()] == [1, 2]
    run.metrics_path.write_text('{"epoch": 1}\n{"epo')
    with pytest.raises(RunDirectoryError, match=r"metrics.jsonl, line 2: not valid JSON"):
        run.metrics()
    run.config_path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(RunDirectoryError, match="config.json is not valid JSON"):
        run.config()
