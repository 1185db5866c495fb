"""``edgens doctor``: what this device is, whether edgens can use it, and the fix for each problem.

Only click and the standard library are imported here; the doctor's modules are imported when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

MARKS = {"ok": "ok", "info": "--", "warn": "!!", "error": "XX"}


@click.command()
@click.option("--bundle", type=click.Path(path_type=Path),
              help="Also check this bundle: its TensorRT engines and latency tables, here and in this power mode.")
@click.option("--root", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Read the machine's files (/proc, /sys, /etc, /var/lib) below this folder instead of / (a copy "
                   "of a device's files, as in tests/fixtures/devices/); the Python checks stay this Python's.")
@click.option("--no-load", "no_load", is_flag=True,
              help="Do not start a session on onnxruntime's GPU providers to see whether they load.")
@click.option("--json", "as_json", is_flag=True, help="Print the facts and findings as JSON.")
def doctor(bundle: Path | None, root: Path | None, no_load: bool, as_json: bool) -> None:
    """Explain this device and whether edgens can use it: Jetson model, L4T and JetPack, power mode, clocks and
    temperature, CUDA, TensorRT and DLA cores, onnxruntime and whether its GPU provider really loads, torch; with
    --bundle, whether the bundle's engines and latency tables fit here. Every problem comes with its fix.

    Exit status: 0, or 1 when a finding is an error (edgens cannot run a bundle here as installed).
    """
    from edgens.doctor import diagnose, probe_python
    from edgens.runtime.device_info import read_system

    system = read_system(root)
    python = probe_python(load_gpu_providers=not no_load)
    findings = diagnose(system, python, bundle)
    failed = any(f.level == "error" for f in findings)
    if as_json:
        click.echo(json.dumps({"ok": not failed, "system": system.to_dict(), "python": python.to_dict(),
                               "findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        width = max(len(f.topic) for f in findings)
        for finding in findings:
            click.echo(f"{MARKS[finding.level]} {finding.topic:<{width}}  {finding.message}")
            if finding.fix and finding.level != "ok":
                click.echo(f"   {'':<{width}}  fix: {finding.fix}")
    if failed:
        raise SystemExit(1)
