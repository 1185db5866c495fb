"""``export_bundle``: turn a finished run into a deployment bundle (docs/bundle-format.md).

Steps: load and cross-check the run; order the members for anytime use (greedy forward selection on validation
outputs, or by index); cut the order into general stacks; select a specialist sub-ensemble per class; export every
stack to ONNX and check it against torch on real validation inputs; optionally build TensorRT engines; write the
manifest. Everything is written into a temporary directory next to the destination and renamed into place at the
end, so a crash or Ctrl-C never leaves a half bundle.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgens import __version__, selection
from edgens.checks import check_number
from edgens.ensemble import error_rate, mean_nll
from edgens.errors import ConfigError, ExportError
from edgens.export.onnx_export import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, ParityReport, check_parity, export_stack
from edgens.export.run_model import LoadedRun, load_run
from edgens.fileio import (check_can_create, make_directory, remove_stale_temporaries, sha256_file,
                           temporary_path)
from edgens.interrupts import raise_if_interrupted
from edgens.runtime.manifest import (CalibrationInfo, Curves, InputSpec, Manifest, MemberInfo, Metrics, Preprocessing,
                                     SpecialistInfo, SplitMetrics, StackInfo, TrainingInfo, write_manifest)

log = logging.getLogger(__name__)

MAX_GENERAL_STACKS = 16  # default stack size: ceil(M / 16) members, so at most 16 general stacks
PARITY_EXAMPLES = 512
CALIBRATION_EXAMPLES = 1000
CALIBRATION_FILE = "calibration.npz"
ORDERS = ("greedy", "index")

Progress = Callable[[str, int, int], None]


@dataclass
class ExportOptions:
    """Settings of ``edgens export``.

    Attributes:
        stack_size: members per general stack; None: ceil(M / 16), i.e. at most 16 general stacks, so one stack is a
            small step of an anytime budget while per-call overhead stays bounded. Larger than M: one stack of all
            M members (with a warning), which is what such a size asks for.
        order: ``greedy`` (forward selection on validation outputs) or ``index``.
        specialist_size: members per specialist; capped at M // 2 (a larger "specialist" is just the ensemble);
            0 disables specialists.
        opset: ONNX opset (>= 17).
        tensorrt: also build TensorRT engines (needs tensorrt and a GPU).
        precision: engine precision: ``fp32``, ``fp16`` or ``int8``.
        force: replace an existing destination.
        random_draws: random orders averaged for the random-drop curve.
        seed: seed of random choices (random curve, best-of-random specialists).
    """

    stack_size: int | None = None
    order: str = "greedy"
    specialist_size: int = 20
    opset: int = DEFAULT_OPSET
    tensorrt: bool = False
    precision: str = "fp32"
    force: bool = False
    random_draws: int = 20
    seed: int = 0

    def validate(self) -> ExportOptions:
        """Check the settings.

        Raises:
            ConfigError: the first bad one.
        """
        if self.order not in ORDERS:
            raise ConfigError(f"unknown order {self.order!r}; expected one of {', '.join(ORDERS)}")
        if self.stack_size is not None:
            check_number("stack size", self.stack_size, low=1, integer=True)
        check_number("specialist size", self.specialist_size, low=0, integer=True)
        check_number("opset", self.opset, low=17, integer=True)
        check_number("random draws", self.random_draws, low=1, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        if self.precision != "fp32" and not self.tensorrt:
            raise ConfigError(f"precision {self.precision} applies to TensorRT engines: add --tensorrt")
        return self


@dataclass
class ExportReport:
    """What an export did."""

    bundle: Path
    manifest: Manifest
    parity: list[ParityReport]
    seconds: float
    bytes: int
    stages: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able summary (for ``--json``)."""
        return {"bundle": str(self.bundle), "seconds": round(self.seconds, 2), "bytes": self.bytes,
                "stacks": len(self.manifest.stacks), "general_stacks": len(self.manifest.general_stacks),
                "specialists": len(self.manifest.specialists),
                "parity": [{"stack": r.name, "max_abs_diff": r.max_abs_diff, "ok": r.ok} for r in self.parity],
                "stage_seconds": {k: round(v, 2) for k, v in self.stages.items()},
                "val_error": self.manifest.metrics.val.error, "test_error": self.manifest.metrics.test.error}


def _member_infos(loaded: LoadedRun) -> list[MemberInfo]:
    params, flops = loaded.stack.params_per_member(), loaded.stack.flops_per_member()
    family = loaded.train_config.family
    errors = error_rate(loaded.val_eta, loaded.val_y, family)
    # member by member: one float64 copy of all members' outputs would be M x N x K doubles
    nlls = [float(mean_nll(member.astype(np.float64), loaded.val_y, family)) for member in loaded.val_eta]
    return [MemberInfo(id=j, params=params, flops=flops, val_error=float(errors[j]), val_nll=nlls[j])
            for j in range(loaded.stack.n_members)]


def _specialists(loaded: LoadedRun, size: int, seed: int, progress: Progress) -> list[tuple[int, list[int], dict]]:
    """Greedy F1 specialists per class, with the paper's best-of-200-random selection and baselines for the record."""
    eta, y = loaded.val_eta, loaded.val_y
    classes = list(range(loaded.dataset.n_outputs))
    random_choice = selection.best_of_random_specialists(eta, y, classes, size, seed=seed)
    chosen = []
    for number, c in enumerate(classes):
        progress("specialists", number, len(classes))
        members, f1 = selection.greedy_specialist(eta, y, c, size)
        _, random_best, random_mean = random_choice[c]
        scores = {"greedy": f1, "best_of_random": random_best, "random_mean": random_mean,
                  "best_single": selection.best_single_member(eta, y, c)[1]}
        chosen.append((c, members, scores))
    progress("specialists", len(classes), len(classes))
    return chosen


def _write_stack(loaded: LoadedRun, members: list[int], name: str, role: str, directory: Path, opset: int,
                 parity_inputs: np.ndarray, flops: int) -> tuple[StackInfo, ParityReport]:
    relative = f"stacks/{name}.onnx"
    path = directory / relative
    substack = loaded.stack.subset(members)
    export_stack(substack, path, opset)
    report = check_parity(path, substack, parity_inputs, name=name)
    info = StackInfo(name=name, role=role, file=relative, sha256=sha256_file(path), bytes=path.stat().st_size,
                     members=list(members), flops=flops * len(members), input_name=INPUT_NAME,
                     output_name=OUTPUT_NAME)
    return info, report


def _stage(stages: dict[str, float], name: str, started: float) -> float:
    now = time.perf_counter()
    stages[name] = now - started
    return now


def export_bundle(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], options: ExportOptions | None = None,
                  progress: Progress | None = None) -> ExportReport:
    """Export a finished run as a deployment bundle at ``out``.

    Args:
        run_dir: a finished training run.
        out: the bundle directory to create.
        options: see :class:`ExportOptions`.
        progress: called with ``(stage, done, total)`` as work advances (the CLI draws bars with it).

    Returns:
        An :class:`ExportReport`; the bundle is complete and checked when this returns.

    Raises:
        ConfigError: bad options; RunDirectoryError / DataNotFoundError: an incomplete or inconsistent run;
        ExportError: the destination exists (without force), an ONNX graph does not match torch (the message reports
        every stack's max difference), or TensorRT failed; BackendUnavailableError: TensorRT asked for but missing.
    """
    options = (options or ExportOptions()).validate()
    progress = progress or (lambda stage, done, total: None)
    out = Path(out)
    if out.exists() and not options.force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    check_can_create(out)  # before minutes of work, not after
    started = time.perf_counter()
    stages: dict[str, float] = {}
    clock = started
    progress("load run", 0, 1)
    loaded = load_run(run_dir)
    family, m = loaded.train_config.family, loaded.stack.n_members
    clock = _stage(stages, "load", clock)

    progress("order", 0, 1)
    if options.order == "greedy":
        order, order_errors = selection.greedy_order(loaded.val_eta, loaded.val_y, family)
    else:
        order = list(range(m))
        order_errors = selection.prefix_errors(loaded.val_eta, loaded.val_y, order, family)
    index_errors = selection.prefix_errors(loaded.val_eta, loaded.val_y, list(range(m)), family)
    random_errors = selection.random_prefix_errors(loaded.val_eta, loaded.val_y, options.random_draws,
                                                   options.seed, family)
    progress("order", 1, 1)
    clock = _stage(stages, "order", clock)

    specialist_size = min(options.specialist_size, m // 2)
    specialist_choices = []
    if family == "categorical" and specialist_size >= 1 and loaded.dataset.n_outputs >= 2:
        specialist_choices = _specialists(loaded, specialist_size, options.seed, progress)
    elif options.specialist_size:
        log.info("no specialists: they need a categorical ensemble of at least 2 members")
    clock = _stage(stages, "specialists", clock)

    stack_size = options.stack_size or math.ceil(m / MAX_GENERAL_STACKS)
    if stack_size > m:  # a larger stack than the ensemble: the one stack of all members, as the user meant
        log.warning("stack size %d is larger than the run's %d members: exporting one stack of all %d", stack_size,
                    m, m)
        stack_size = m
    chunks = [order[i:i + stack_size] for i in range(0, m, stack_size)]
    jobs = [(f"general-{i:03d}", "general", chunk) for i, chunk in enumerate(chunks)]
    jobs += [(f"specialist-{c}", "specialist", members) for c, members, _ in specialist_choices]
    parity_inputs = loaded.dataset.normalize(loaded.dataset.val_x[:PARITY_EXAMPLES])
    flops_per_member = loaded.stack.flops_per_member()

    make_directory(out.parent)
    remove_stale_temporaries(out)  # what an export killed earlier left (a live export's work is kept)
    partial = temporary_path(out, "partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        (partial / "stacks").mkdir(parents=True)
        stacks, reports = [], []
        for number, (name, role, members) in enumerate(jobs):
            raise_if_interrupted()  # a Ctrl-C that a torch finalizer swallowed stops the export here
            progress("export stacks", number, len(jobs))
            info, report = _write_stack(loaded, members, name, role, partial, options.opset, parity_inputs,
                                        flops_per_member)
            stacks.append(info)
            reports.append(report)
            log.info("%s: %d members, max |onnxruntime - torch| = %.2e", name, len(members), report.max_abs_diff)
        progress("export stacks", len(jobs), len(jobs))
        failed = [r for r in reports if not r.ok]
        if failed:
            table = "; ".join(f"{r.name}: max diff {r.max_abs_diff:.3g}" + (f" ({', '.join(r.problems)})"
                                                                          if r.problems else "") for r in reports)
            raise ExportError(f"{len(failed)} of {len(reports)} exported stacks do not match torch; nothing was "
                              f"written. Per stack: {table}")
        clock = _stage(stages, "export", clock)

        calibration = _write_calibration(loaded, partial)
        specialists = [SpecialistInfo(task=f"class-{c}", class_index=c, members=members, stack=f"specialist-{c}",
                                      selection="greedy", val_f1=scores) for c, members, scores in specialist_choices]
        data = loaded.config["data"]
        manifest = Manifest(
            family=family, n_outputs=loaded.dataset.n_outputs, class_names=loaded.dataset.class_names,
            input=InputSpec(shape=tuple(loaded.dataset.input_shape), name=INPUT_NAME, dtype="float32",
                            raw_dtype=str(loaded.dataset.val_x.dtype)),
            preprocessing=Preprocessing(mean=[float(v) for v in loaded.dataset.mean],
                                        std=[float(v) for v in loaded.dataset.std]),
            members=_member_infos(loaded), order=order, order_method=options.order, stacks=stacks,
            specialists=specialists, edgens_version=__version__,
            training=TrainingInfo(preset=loaded.train_config.preset, lam=loaded.train_config.lam,
                                  dataset=data["name"], config=loaded.config),
            curves=Curves(order_val_error=order_errors, index_val_error=index_errors,
                          random_val_error=random_errors),
            metrics=Metrics(val=_split_metrics(loaded.val_eta, loaded.val_y, family),
                            test=_split_metrics(loaded.test_eta, loaded.test_y, family)),
            calibration=calibration)
        if options.tensorrt:
            from edgens.export.engines import add_engines

            add_engines(partial, manifest, options.precision, progress=progress, loaded=loaded)
            clock = _stage(stages, "tensorrt", clock)
        write_manifest(partial, manifest)
        raise_if_interrupted()  # never commit a bundle after a Ctrl-C
        _replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportReport(out, manifest, reports, time.perf_counter() - started, size, stages)


def _split_metrics(eta: np.ndarray, y: np.ndarray, family: str) -> SplitMetrics:
    mean = eta.mean(0, dtype=np.float64)
    return SplitMetrics(error=float(error_rate(mean, y, family)), nll=float(mean_nll(mean, y, family)))


def _write_calibration(loaded: LoadedRun, directory: Path) -> CalibrationInfo:
    """Keep some raw validation examples in the bundle: TensorRT INT8 calibration and precision checks on the device
    need real inputs, and the device may not have the data set."""
    n = min(CALIBRATION_EXAMPLES, len(loaded.dataset.val_x))
    path = directory / CALIBRATION_FILE
    np.savez(path, x=loaded.dataset.val_x[:n], y=loaded.dataset.val_y[:n])
    return CalibrationInfo(file=CALIBRATION_FILE, sha256=sha256_file(path), examples=n)


def _replace(partial: Path, out: Path) -> None:
    """Move the finished bundle into place; an existing one (with --force) is removed only after the rename."""
    if out.exists():
        old = temporary_path(out, "old")
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out)
