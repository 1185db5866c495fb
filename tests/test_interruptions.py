"""What a crash or Ctrl-C leaves on disk, with real processes: SIGKILL leaves temporaries named after a dead
process, which the next writer of the same place removes (never a live process's); SIGINT stops train and export
promptly with exit status 130, export leaving nothing behind and training a run that resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgens.config import TrainConfig
from edgens.fileio import atomic_write_text, remove_stale_temporaries
from edgens.rundir import RunDir
from edgens.runtime import load_manifest
from edgens.train import resume, train

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_only_dead_writers_temporaries_are_removed(tmp_path: Path) -> None:
    dead, live = _dead_pid(), os.getppid()  # the parent (pytest's launcher) is alive for the whole test
    target = tmp_path / "best.pt"
    for name in (f".best.pt.{dead}.ab12.tmp", f".best.pt.{live}.cd34.tmp", f".other.pt.{dead}.ef56.tmp",
                 f".best.pt.{dead}x.tmp", "best.pt.1.tmp"):
        (tmp_path / name).write_text("debris")
    (tmp_path / f".best.pt.partial-{dead}").mkdir()
    (tmp_path / f".best.pt.partial-{dead}" / "stack.onnx").write_text("half")
    (tmp_path / f".best.pt.old-{live}").mkdir()
    removed = remove_stale_temporaries(target)
    assert sorted(p.name for p in removed) == sorted([f".best.pt.{dead}.ab12.tmp", f".best.pt.partial-{dead}"])
    assert _temporaries(tmp_path) == sorted([f".best.pt.{live}.cd34.tmp", f".best.pt.old-{live}",
                                             f".best.pt.{dead}x.tmp", f".other.pt.{dead}.ef56.tmp"])
    (tmp_path / f".other.pt.{dead}.ef56.tmp").touch()
    atomic_write_text(tmp_path / "other.pt", "new")  # writing a file cleans up after its dead writers
    assert f".other.pt.{dead}.ef56.tmp" not in _temporaries(tmp_path)
    assert (tmp_path / "other.pt").read_text() == "new"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("run") / "run"
    train(TrainConfig(preset="mlp-16x64", n_members=6, lam=0.95, epochs=2, train_limit=1500, val_size=500,
                      data_dir=str(fashion_mnist_dir), seed=3), path)
    return path


def test_resume_removes_a_killed_checkpoint_write(small_run: Path, tmp_path: Path, fashion_mnist_dir: Path) -> None:
    import shutil

    run = RunDir(tmp_path / "run")
    shutil.copytree(small_run, run.path)
    run.summary_path.unlink()  # as if killed before finishing
    debris = run.path / "checkpoints" / f".best.pt.{_dead_pid()}.x1y2.tmp"
    debris.write_bytes(b"half a checkpoint")
    resume(run.path)
    assert run.is_finished() and _temporaries(run.path / "checkpoints") == []


def _start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgens", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_during_export_then_export_again(small_run: Path, tmp_path: Path) -> None:
    process = _start("export", str(small_run), "-o", "bundle", "--specialist-size", "0", cwd=tmp_path)
    _wait_for(lambda: any((p / "stacks").is_dir() and any((p / "stacks").iterdir())
                          for p in tmp_path.glob(".bundle.partial-*")), process)
    process.kill()
    process.communicate()
    assert [p.name for p in tmp_path.iterdir()] == [f".bundle.partial-{process.pid}"]  # the dead export's debris
    done = subprocess.run([sys.executable, "-m", "edgens", "export", str(small_run), "-o", "bundle",
                           "--specialist-size", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.55, 0.8])
def test_ctrl_c_stops_export_and_leaves_nothing(small_run: Path, tmp_path: Path, fraction: float,
                                                export_seconds: float) -> None:
    process = _start("export", str(small_run), "-o", "bundle", cwd=tmp_path)
    time.sleep(fraction * export_seconds)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == 0:  # finished before the signal came: a valid outcome, but then nothing to check
        assert (tmp_path / "bundle" / "manifest.json").is_file()
        pytest.skip(f"export finished before {fraction:.0%} of its usual time")
    assert time.monotonic() - sent < 10  # promptly
    if process.returncode == -signal.SIGINT and (tmp_path / "bundle").exists():
        # after the bundle was committed, while Python shut down (its signal handlers reset): the bundle is whole
        assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
        assert load_manifest(tmp_path / "bundle").stacks
        return
    if process.returncode == -signal.SIGABRT and "site-packages/torch/" in stderr:
        # the interrupt landed inside a C++ callback of torch's ONNX exporter, which cannot carry it and aborts the
        # process (seen once, at 55%): a death like a kill, where no cleanup runs; what is left is the dead export's
        # partial bundle only, which the next export removes (test_sigkill_during_export_then_export_again)
        assert [p.name for p in tmp_path.iterdir()] in ([], [f".bundle.partial-{process.pid}"])
        return
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if process.returncode == -signal.SIGINT and last != "Error: interrupted":
        # still starting Python (importing edgens): Python's own KeyboardInterrupt, which a shell reports as 130
        assert "Traceback" in stderr and "edgens/cli/__init__.py" not in stderr, stderr[-2000:]
    else:
        # 130 from the CLI; or, when the interrupt cut into an extension's import that runs Python code from C
        # (torch's), CPython remembers it as unhandled and ends the process by SIGINT after our line and cleanup
        # (seen about once in 25 tries at ~0.4 s)
        assert process.returncode in (130, -signal.SIGINT), stderr[-2000:]
        assert last == "Error: interrupted", stderr[-2000:]
        assert "Exception ignored" not in stderr, stderr[-2000:]  # one line, as the README promises
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_in_a_finalizer_is_remembered_not_printed(capsys: pytest.CaptureFixture[str]) -> None:
    # issue 28: Ctrl-C landing in a finalizer (torch runs many) made Python print "Exception ignored in ...
    # KeyboardInterrupt" before the command's one error line
    from edgens.interrupts import raise_if_interrupted, sticky_interrupts

    class Finalised:
        def __del__(self) -> None:
            raise KeyboardInterrupt

    hook = sys.unraisablehook
    with sticky_interrupts():
        Finalised()  # collected at once: its KeyboardInterrupt cannot be raised, Python reports it as unraisable
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()  # remembered: raised again at the next safe point
    assert sys.unraisablehook is hook
    assert "Exception ignored" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def export_seconds(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    """How long an uninterrupted export of the small run takes here (the Ctrl-C moments are fractions of it)."""
    folder = tmp_path_factory.mktemp("timing")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "edgens", "export", str(small_run), "-o", "bundle"], cwd=folder,
                   check=True, capture_output=True, timeout=300)
    return time.monotonic() - started


@pytest.mark.slow
def test_ctrl_c_stops_training_and_the_run_resumes(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    args = ["train", "--preset", "mlp-16x64", "--members", "6", "--epochs", "30", "--train-limit", "3000",
            "--val-size", "500", "--data-dir", str(fashion_mnist_dir), "--seed", "4", "--out", "run", "--quiet"]
    process = _start(*args, cwd=tmp_path)
    run = RunDir(tmp_path / "run")
    _wait_for(lambda: len(run.metrics()) >= 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert f"edgens train --resume {Path('run')}" in stderr.strip().splitlines()[-1]
    assert not run.is_finished() and 2 <= len(run.metrics()) < 30
    assert _temporaries(run.path) == [] and _temporaries(run.path / "checkpoints") == []
    eta_before = len(run.metrics())
    assert eta_before >= 2 and np.isfinite(run.metrics()[-1]["val"]["ensemble_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.07, 0.19])
def test_sigkill_during_training_then_resume(tmp_path: Path, fashion_mnist_dir: Path, delay: float) -> None:
    args = ["train", "--preset", "mlp-16x64", "--members", "6", "--epochs", "8", "--train-limit", "3000",
            "--val-size", "500", "--data-dir", str(fashion_mnist_dir), "--seed", "4", "--out", "run", "--quiet"]
    process = _start(*args, cwd=tmp_path)
    run = RunDir(tmp_path / "run")
    _wait_for(lambda: len(run.metrics()) >= 1, process)
    time.sleep(delay)  # somewhere in a later epoch or its checkpoint write
    process.kill()
    process.communicate()
    assert not run.is_finished()
    summary = resume(run.path)
    assert run.is_finished() and summary["epochs_run"] == 8
    assert _temporaries(run.path) == [] and _temporaries(run.path / "checkpoints") == []
    assert [r["epoch"] for r in run.metrics()] == list(range(1, 9))
