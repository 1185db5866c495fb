"""``export_bundle``: turn a finished run into a deployment bundle (docs/bundle-format.md).

Steps: load and cross-check the run; order the members for anytime use (greedy forward selection on validation
outputs, or by index); cut the order into general stacks (a schedule, or equal stacks) and add prefix stacks of the
first members; select a specialist sub-ensemble per class; export every stack to ONNX and check it against torch on
real validation inputs; optionally convert the stacks to int8 or fp16, each checked against its fp32 graph
(:mod:`edgens.export.precision`); fit the silent-fault detection thresholds and store the self-test's expected
outputs (:mod:`edgens.export.silent_faults`); optionally build TensorRT engines; write the manifest. Everything is
written into a temporary directory next to the destination and renamed into place at the end, so a crash or Ctrl-C
never leaves a half bundle.
"""

from __future__ import annotations

import copy
import functools
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
from edgens.export.onnx_export import (DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, ParityReport, check_parity,
                                       export_checked_stack, export_stack)
from edgens.export.run_model import LoadedRun, load_run
from edgens.export.silent_faults import fit_outliers, write_self_test
from edgens.fileio import (check_can_create, make_directory, remove_stale_temporaries, sha256_file,
                           temporary_path)
from edgens.interrupts import raise_if_interrupted
from edgens.stacks import MemberStack
from edgens.runtime.bundle import (PRECISIONS, CalibrationInfo, Curves, InputSpec, Manifest, MemberInfo, Metrics,
                                     Preprocessing,
                                     SpecialistInfo, SplitMetrics, StackInfo, TrainingInfo, write_manifest)

log = logging.getLogger(__name__)

# The default schedule of general stacks: where they end, as fractions of the members. Steps of 1/16 over the first
# half, where the anytime curve still rises and deadlines stop (the first stack is what a deadline shorter than any
# stack gets: a smaller one measured 1 point less accurate, 13 vs 16 of 256 members; steps of 1/8 from a quarter on
# lost 0.2 points at a 0.75 ms deadline), steps of 1/8 after it, where the curve is flat and fewer calls cost less.
DEFAULT_SCHEDULE = (*(k / 16 for k in range(1, 9)), 10 / 16, 12 / 16, 14 / 16, 1.0)
DEFAULT_PREFIX_STACKS = (0.1, 0.25, 0.5, 1.0)
PARITY_EXAMPLES = 512
CALIBRATION_EXAMPLES = 1000
CALIBRATION_FILE = "calibration.npz"
ORDERS = ("auto", "greedy", "index")

Progress = Callable[[str, int, int], None]


@dataclass
class ExportOptions:
    """Settings of ``edgens export``.

    Attributes:
        stack_size: members per general stack (all stacks equal but the last). None: the schedule
            :data:`DEFAULT_SCHEDULE` (12 stacks: 8 of M/16 members, then 4 of M/8).
            Larger than M: one stack of all M members (with a warning), which is what such a size asks for.
        prefix_stacks: fractions of the members for which to add a prefix stack (one graph of the first members,
            run as one call by budgets that cover them); each is rounded up to the end of a general stack, and one
            that is a single general stack is not added. Default :data:`DEFAULT_PREFIX_STACKS`: 10%, 25%, 50% and
            all members, so that those budgets cost one graph's call (the bundle holds about twice the weights).
            Empty: none.
        order: ``greedy`` (forward selection on validation outputs), ``index``, or ``auto``: the trained order
            for a run trained with the anytime term, whose loss made the prefixes of that order strong ensembles
            (the manifest says ``trained``; ``trained-greedy`` when greedy selection inside each trained prefix
            measured better on validation), else ``greedy``.
        specialist_size: members per specialist; capped at M // 2 (a larger "specialist" is just the ensemble);
            0 disables specialists.
        opset: ONNX opset (>= 17).
        tensorrt: also build TensorRT engines (needs tensorrt and a GPU).
        precision: ``fp32``, ``fp16`` (float16 graphs, for GPUs) or ``int8`` (static QDQ quantization calibrated on
            validation inputs) for the ONNX stacks, and the TensorRT engines' precision.
        precision_tolerance: a quantized stack whose own validation error rises by more than this (a fraction:
            0.005 = 0.5 points) over its fp32 graph's is refused and kept in fp32.
        checksums: write checked graphs (:mod:`edgens.export.checksums`: the runtime then catches a corrupted weight
            on every call, at every budget) for the stacks whose kind has a checked form; int8 stacks stay
            unchecked (quantization breaks the sums' exactness).
        checksum_convolutions: also write checked graphs for CNN stacks. Off by default: their checks cost
            1.3-1.7x the plain graph on onnxruntime's CPU provider (benchmarks/README.md, "Checksums inside the
            stacks"), against a few percent for MLP stacks.
        force: replace an existing destination.
        random_draws: random orders averaged for the random-drop curve.
        seed: seed of random choices (random curve, best-of-random specialists).
    """

    stack_size: int | None = None
    prefix_stacks: tuple[float, ...] = DEFAULT_PREFIX_STACKS
    order: str = "auto"
    specialist_size: int = 20
    opset: int = DEFAULT_OPSET
    tensorrt: bool = False
    precision: str = "fp32"
    precision_tolerance: float = 0.005
    checksums: bool = True
    checksum_convolutions: bool = False
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
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        check_number("precision tolerance", self.precision_tolerance, low=0, high=1)
        self.prefix_stacks = tuple(sorted({check_number("prefix stack fraction", f, low=0, low_open=True, high=1)
                                           for f in self.prefix_stacks}))
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
                "general_stack_sizes": [len(s.members) for s in self.manifest.general_stacks],
                "prefix_stacks": [len(s.members) for s in self.manifest.prefix_stacks],
                "precision": {s.name: {"precision": s.precision, "val_error_change": s.val_error_change,
                                       "note": s.precision_note} for s in self.manifest.stacks},
                "specialists": len(self.manifest.specialists),
                "outlier_thresholds": (dict(self.manifest.outliers.thresholds) if self.manifest.outliers is not None
                                       else None),
                "self_test_examples": self.manifest.self_test.examples if self.manifest.self_test else None,
                "parity": [{"stack": r.name, "max_abs_diff": r.max_abs_diff, "ok": r.ok} for r in self.parity],
                "stage_seconds": {k: round(v, 2) for k, v in self.stages.items()},
                "val_error": self.manifest.metrics.val.error, "test_error": self.manifest.metrics.test.error}


def _raw_range(x: np.ndarray) -> tuple[float, float]:
    """The smallest and largest raw training value (chunked: the training data may be large)."""
    low, high = np.inf, -np.inf
    for start in range(0, len(x), 8192):
        chunk = x[start:start + 8192]
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    return low, high


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
                 parity_inputs: np.ndarray, flops: int, checked: bool) -> tuple[StackInfo, ParityReport]:
    relative = f"stacks/{name}.onnx"
    path = directory / relative
    substack = loaded.stack.subset(members)
    checksum = export_checked_stack(substack, path, opset) if checked else None
    if checksum is None:
        export_stack(substack, path, opset)
    report = check_parity(path, substack, parity_inputs, name=name, checksum=checksum)
    info = StackInfo(name=name, role=role, file=relative, sha256=sha256_file(path), bytes=path.stat().st_size,
                     members=list(members), flops=flops * len(members), input_name=INPUT_NAME,
                     output_name=OUTPUT_NAME, checksum=checksum)
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
    order_method = options.order
    trained_prefixes = loaded.train_config.resolved_prefixes(m)
    if order_method == "auto":
        order_method = "trained" if trained_prefixes else "greedy"
    if order_method == "greedy":
        order, order_errors = selection.greedy_order(loaded.val_eta, loaded.val_y, family)
    elif order_method == "trained":
        order, order_errors, order_method = selection.trained_order(loaded.val_eta, loaded.val_y, trained_prefixes,
                                                                    family)
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

    chunks = [order[start:end] for start, end in general_schedule(m, options.stack_size)]
    jobs = [(f"general-{i:03d}", "general", chunk) for i, chunk in enumerate(chunks)]
    jobs += [(f"prefix-{n:04d}", "prefix", order[:n]) for n in prefix_sizes(chunks, options.prefix_stacks)]
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
        checked = options.checksums and options.precision != "int8" and (
            options.checksum_convolutions or loaded.stack.kind != "cnn")
        for number, (name, role, members) in enumerate(jobs):
            raise_if_interrupted()  # a Ctrl-C that a torch finalizer swallowed stops the export here
            progress("export stacks", number, len(jobs))
            info, report = _write_stack(loaded, members, name, role, partial, options.opset, parity_inputs,
                                        flops_per_member, checked)
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
        if options.precision != "fp32":
            _convert_stacks(loaded, stacks, partial, options, progress)
            clock = _stage(stages, "precision", clock)

        calibration = _write_calibration(loaded, partial)
        # silent faults: detection thresholds and self-test outputs, from the graphs as they deploy
        val_x = loaded.dataset.normalize(loaded.dataset.val_x)
        outliers = fit_outliers(partial, stacks, val_x, family,
                                lambda done, total: progress("outlier thresholds", done, total))
        self_test = write_self_test(partial, stacks, loaded.dataset.val_x, loaded.dataset.normalize)
        clock = _stage(stages, "silent faults", clock)
        specialists = [SpecialistInfo(task=f"class-{c}", class_index=c, members=members, stack=f"specialist-{c}",
                                      selection="greedy", val_f1=scores) for c, members, scores in specialist_choices]
        data = loaded.config["data"]
        manifest = Manifest(
            family=family, n_outputs=loaded.dataset.n_outputs, class_names=loaded.dataset.class_names,
            input=InputSpec(shape=tuple(loaded.dataset.input_shape), name=INPUT_NAME, dtype="float32",
                            raw_dtype=str(loaded.dataset.val_x.dtype), raw_range=_raw_range(loaded.dataset.train_x)),
            preprocessing=Preprocessing(mean=[float(v) for v in loaded.dataset.mean],
                                        std=[float(v) for v in loaded.dataset.std]),
            members=_member_infos(loaded), order=order, order_method=order_method, stacks=stacks,
            specialists=specialists, edgens_version=__version__,
            training=TrainingInfo(preset=loaded.train_config.preset, lam=loaded.train_config.lam,
                                  dataset=data["name"], config=loaded.config),
            curves=Curves(order_val_error=order_errors, index_val_error=index_errors,
                          random_val_error=random_errors),
            metrics=Metrics(val=_split_metrics(loaded.val_eta, loaded.val_y, family),
                            test=_split_metrics(loaded.test_eta, loaded.test_y, family)),
            calibration=calibration, outliers=outliers, self_test=self_test)
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


def _convert_stacks(loaded: LoadedRun, stacks: list[StackInfo], directory: Path, options: ExportOptions,
                    progress: Progress) -> None:
    """Replace each stack's fp32 graph by one of ``options.precision`` unless that loses more validation accuracy
    than the tolerance (then the fp32 graph stays, with the reason); updates ``stacks`` in place."""
    from edgens.export.precision import check_converted, quantize_int8

    precision, family = options.precision, loaded.train_config.family
    val_x = loaded.dataset.normalize(loaded.dataset.val_x)
    for number, stack in enumerate(stacks):
        raise_if_interrupted()
        progress(f"{precision} stacks", number, len(stacks))
        fp32_path = directory / stack.file
        relative = f"stacks/{stack.name}.{precision}.onnx"
        path = directory / relative
        torch_eta, checksum = None, None
        if precision == "int8":
            quantize_int8(fp32_path, path, val_x[:PARITY_EXAMPLES], stack.input_name)
        else:
            substack = loaded.stack.subset(stack.members)
            checksum = (export_checked_stack(substack, path, options.opset, float16=True)
                        if stack.checksum is not None else None)
            if checksum is None:
                export_stack(substack, path, options.opset, float16=True)
            torch_eta = functools.partial(_torch_float16_outputs, substack, val_x)  # run only if onnxruntime cannot
        check = check_converted(fp32_path, path, val_x, loaded.dataset.val_y, family, torch_eta, stack.checksum,
                                checksum)
        stack.val_error_change = check.change
        how = "" if check.cpu_checked else " (checked in torch float16: onnxruntime has no float16 kernels here)"
        if check.change > options.precision_tolerance:
            stack.precision_note = (f"{precision} refused: its validation error rose {100 * check.change:.2f} points "
                                    f"(> {100 * options.precision_tolerance:g}){how}")
            log.warning("%s: %s; kept fp32", stack.name, stack.precision_note)
            path.unlink()
            continue
        fp32_path.unlink()
        stack.file, stack.sha256, stack.bytes = relative, sha256_file(path), path.stat().st_size
        stack.precision, stack.checksum = precision, checksum
        stack.precision_note = None if check.cpu_checked else how.strip(" ()")
        log.info("%s: %s, validation error %+.2f points%s", stack.name, precision, 100 * check.change, how)
    progress(f"{precision} stacks", len(stacks), len(stacks))


def _torch_float16_outputs(substack: MemberStack, x: np.ndarray) -> np.ndarray:
    """The stack's outputs computed in float16 by torch on this CPU (where onnxruntime cannot run a float16 graph)."""
    import torch

    model = copy.deepcopy(substack).cpu().half().eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + 512]).half()).float().numpy()
                               for i in range(0, len(x), 512)], axis=1)


def general_schedule(m: int, stack_size: int | None) -> list[tuple[int, int]]:
    """``(start, end)`` positions in the order of each general stack: equal stacks of ``stack_size`` members, or
    without one the default schedule."""
    if stack_size is None:
        ends = sorted({max(1, round(f * m)) for f in DEFAULT_SCHEDULE})
    else:
        if stack_size > m:  # a larger stack than the ensemble: the one stack of all members, as the user meant
            log.warning("stack size %d is larger than the run's %d members: exporting one stack of all %d",
                        stack_size, m, m)
            stack_size = m
        ends = list(range(stack_size, m, stack_size)) + [m]
    return list(zip([0, *ends[:-1]], ends, strict=True))


def prefix_sizes(chunks: list[list[int]], fractions: tuple[float, ...]) -> list[int]:
    """Member counts of the prefix stacks: each fraction of all members rounded up to the end of a general stack,
    without duplicates and without a prefix that is just the first general stack."""
    ends = [int(end) for end in np.cumsum([len(chunk) for chunk in chunks])]
    total = ends[-1]
    sizes = {next(end for end in ends if end >= math.ceil(f * total - 1e-9)) for f in fractions}
    return sorted(size for size in sizes if size > ends[0])


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
