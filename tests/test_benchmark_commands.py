"""benchmarks/regenerate.py names commands that exist: every step's script is there and accepts every option the
step passes it, at every scale (a renamed option would otherwise surface only in a long regeneration run)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import regenerate  # noqa: E402


@pytest.mark.parametrize("step", regenerate.STEPS, ids=[s.name for s in regenerate.STEPS])
def test_every_step_names_a_command_that_takes_its_options(step: regenerate.Step, tmp_path: Path) -> None:
    paths = regenerate.paths_for(tmp_path / "runs", tmp_path / "out", None, None)
    options: set[str] = set()
    for scale in regenerate.SCALES:
        argv = step.argv({**paths, "epochs": "1"}, scale)
        assert "{" not in " ".join(argv), argv  # every placeholder filled
        options |= {word for word in argv if word.startswith("--")}
    argv = step.argv({**paths, "epochs": "1"}, "quick")
    command = argv[:argv.index("-m") + 4] if "-m" in argv else argv[:2]  # the script, or edgens and its subcommand
    if "-m" not in argv:
        assert (ROOT / argv[1]).exists(), argv[1]
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert shown.returncode == 0, shown.stderr[-1000:]
    for option in options:
        assert re.search(rf"{re.escape(option)}\b", shown.stdout), f"{step.name}: {option} is not an option"
