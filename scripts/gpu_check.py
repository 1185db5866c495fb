"""The project's GPU checks, as one script for a machine with a CUDA GPU (DEVELOPERS.md: run it when a session has
the GPU machine; that machine has torch with CUDA, onnx and onnxruntime for the CPU, but no registry, TensorRT or
onnxruntime-gpu, and not Fashion-MNIST, so the data and a small run are prepared here and carried):

    # here (CPU machine): the data and a small exported run for the parity check
    bash scripts/gpu_check_prepare.sh            # -> gpu-check/ (ignored by git; carried to the device)
    # on the GPU machine, from the repository root:
    python scripts/gpu_check.py --data-dir gpu-check/fashion-mnist --run gpu-check/run --bundle gpu-check/bundle \
        --out "$OUT/gpu-check"

It checks, and writes ``report.json`` with what ran, what was skipped and why:

1. training: ``edgens train`` on CUDA (the default preset, mlp-256x4 at lam 0.99, a few epochs) and the same on the
   CPU; the two test errors must agree within ``--tolerance`` (runs on two devices differ in rounding, not in what
   they learn);
2. parity: every stack of a bundle, its members run by torch on CUDA against the bundle's ONNX graph run by
   onnxruntime on the CPU (largest absolute difference of the natural parameters, and argmax agreement): the
   carried ``--run``/``--bundle``, else the CUDA training run of check 1, exported here with ``edgens export``;
3. step time: one training step (forward, modular loss, backward, SGD) of the default preset on the GPU against the
   CPU, medians of interleaved repeats.

``--device cpu`` runs the same checks with the CPU standing in for the GPU (to test this script where there is no
GPU; the numbers then say nothing about CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # edgens from this checkout, installed or not (the GPU machine)
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _train(device: str, out: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "edgens", "train", "--preset", args.preset, "--lam", "0.99", "--epochs",
               str(args.epochs), "--device", device, "--out", str(out), "--json", "--quiet"]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if args.train_limit:
        command += ["--train-limit", str(args.train_limit)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=CHILD_ENV)
    if done.returncode != 0:
        raise RuntimeError(f"edgens train on {device} failed: {done.stderr.strip()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"device": device, "seconds": round(time.perf_counter() - start, 1),
            "test_error": summary["test"]["ensemble_error"], "command": " ".join(command)}


def check_training(args: argparse.Namespace, out: Path) -> dict:
    for name in ("train-gpu", "train-cpu"):  # this script's own runs from an earlier try
        shutil.rmtree(out / name, ignore_errors=True)
    gpu = _train(args.device, out / "train-gpu", args)
    cpu = _train("cpu", out / "train-cpu", args)
    difference = abs(gpu["test_error"] - cpu["test_error"])
    return {"gpu": gpu, "cpu": cpu, "test_error_difference": difference, "tolerance": args.tolerance,
            "passed": difference <= args.tolerance}


def check_parity(args: argparse.Namespace) -> dict:
    from edgens.export.run_model import load_run
    from edgens.runtime import load_manifest
    from edgens.runtime.backends.onnxruntime import load_session
    from edgens.runtime.inputs import InputPreparer

    loaded = load_run(args.run)
    manifest = load_manifest(args.bundle)
    x_raw = loaded.dataset.test_x[:args.parity_examples]
    x = InputPreparer(manifest.input, manifest.preprocessing)(x_raw)
    device = torch.device(args.device)
    model = loaded.stack.to(device).eval()
    with torch.no_grad():
        torch_eta = model(torch.from_numpy(x).to(device)).float().cpu().numpy()  # (M, B, K), members by id
    stacks = []
    for stack in manifest.stacks:
        session = load_session(Path(args.bundle) / stack.file)
        onnx_eta = session.run(None, {stack.input_name: x})[0]
        ours = torch_eta[list(stack.members)]
        stacks.append({"stack": stack.name, "precision": stack.precision,
                       "max_abs_difference": float(np.abs(ours - onnx_eta).max()),
                       "argmax_agreement": float((ours.argmax(-1) == onnx_eta.argmax(-1)).mean())})
    worst = max(s["max_abs_difference"] for s in stacks if s["precision"] == "fp32")
    return {"examples": len(x), "stacks": stacks, "max_abs_difference_fp32": worst,
            "tolerance": args.parity_tolerance, "passed": worst <= args.parity_tolerance}


def check_step_time(args: argparse.Namespace) -> dict:
    from train_step import make_step

    from edgens.presets import create_stack

    def timer(device: torch.device):
        torch.manual_seed(0)
        model = create_stack(args.preset, (1, 28, 28), 10).to(device)
        x = torch.randn(args.batch, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        step = make_step(model, model.n_members, x, y)
        for _ in range(3):
            step()

        def timed() -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - start) / args.steps * 1e3
        return timed

    gpu, cpu = timer(torch.device(args.device)), timer(torch.device("cpu"))
    times: dict[str, list[float]] = {"gpu": [], "cpu": []}
    for i in range(args.repeats):  # interleaved, alternating which goes first
        for name, fn in (("gpu", gpu), ("cpu", cpu))[::1 if i % 2 else -1]:
            times[name].append(fn())
    gpu_ms, cpu_ms = statistics.median(times["gpu"]), statistics.median(times["cpu"])
    return {"preset": args.preset, "batch": args.batch, "gpu_step_ms": gpu_ms, "cpu_step_ms": cpu_ms,
            "cpu_over_gpu": cpu_ms / gpu_ms, "cpu_threads": torch.get_num_threads(), "repeats": args.repeats}


def _export_trained(args: argparse.Namespace) -> bool:
    """Export the CUDA training run of the training check for the parity check; False if there is none."""
    import importlib.util

    run = args.out / "train-gpu"
    if not (run / "summary.json").is_file() or importlib.util.find_spec("onnx") is None:
        return False
    bundle = args.out / "bundle-gpu"
    shutil.rmtree(bundle, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "edgens", "export", str(run), "-o", str(bundle), "--json"],
                          capture_output=True, text=True, timeout=args.timeout, env=CHILD_ENV)
    if done.returncode != 0:
        print(f"gpu_check: edgens export failed: {done.stderr.strip()[-1000:]}", file=sys.stderr)
        return False
    args.run, args.bundle = run, bundle
    return True


def environment(device: str) -> dict:
    import importlib.util

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(), "device": device,
            "tensorrt": importlib.util.find_spec("tensorrt") is not None,
            "onnx": importlib.util.find_spec("onnx") is not None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        import onnxruntime as ort

        info["onnxruntime"], info["onnxruntime_providers"] = ort.__version__, ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for the runs and report.json.")
    parser.add_argument("--device", default="cuda", help="The GPU (cuda, cuda:1), or cpu to test this script.")
    parser.add_argument("--preset", default="mlp-256x4")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, help="Train on this many examples (a quicker check).")
    parser.add_argument("--data-dir", help="Where Fashion-MNIST is (the GPU machine has no registry).")
    parser.add_argument("--tolerance", type=float, default=0.015, help="Largest test-error difference, CUDA vs CPU.")
    parser.add_argument("--run", type=Path, help="A finished run for the parity check ...")
    parser.add_argument("--bundle", type=Path, help="... and its exported bundle.")
    parser.add_argument("--parity-examples", type=int, default=512)
    parser.add_argument("--parity-tolerance", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", default="", help="Comma-separated checks to skip: training, parity, step_time.")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds each training run may take.")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU; use --device cpu to test the script", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment(args.device), "checks": {}, "skipped": {}}
    checks = {"training": lambda: check_training(args, args.out), "parity": lambda: check_parity(args),
              "step_time": lambda: check_step_time(args)}
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    for name, check in checks.items():
        if name in skip:
            report["skipped"][name] = "--skip"
        elif name == "parity" and (args.run is None or args.bundle is None) and not _export_trained(args):
            report["skipped"][name] = "no --run and --bundle, and no CUDA training run to export (or no onnx)"
        else:
            start = time.perf_counter()
            try:
                report["checks"][name] = {**check(), "seconds": round(time.perf_counter() - start, 1)}
            except Exception as err:  # noqa: BLE001 - recorded, and the other checks still run
                report["checks"][name] = {"passed": False, "error": f"{type(err).__name__}: {err}"}
        print(f"gpu_check: {name}: {json.dumps(report['checks'].get(name) or report['skipped'][name])[:400]}",
              flush=True)
    report["skipped"].setdefault("tensorrt", "not on this machine" if not report["environment"]["tensorrt"] else "")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    failed = [name for name, result in report["checks"].items() if result.get("passed") is False]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'passed'}; report in {args.out / 'report.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
