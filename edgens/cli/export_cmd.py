"""``edgens export``: a trained run -> a deployment bundle (or TensorRT engines added to an existing bundle)."""

from __future__ import annotations

import json

import click


@click.command(context_settings={"max_content_width": 100})
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Bundle directory to create.")
@click.option("--stack-size", type=click.IntRange(min=1), default=None,
              help="Members per general stack [a schedule of 12 stacks: M/16 members over the first half of the "
                   "members, M/8 after]. M (all members) gives one stack.")
@click.option("--prefix-stacks", default="0.1,0.25,0.5,1", show_default=True, metavar="FRACTIONS",
              help="Comma-separated fractions of the members that also get one graph of the first members (rounded "
                   "up to a general stack's end), so budgets covering them run one call; 'none' for none.")
@click.option("--order", type=click.Choice(["auto", "greedy", "index"]), default="auto", show_default=True,
              help="Member order: greedy forward selection on validation outputs, or by index; auto: by index for "
                   "runs trained with --anytime-weight (their prefixes are trained), else greedy.")
@click.option("--specialist-size", type=click.IntRange(min=0), default=20, show_default=True,
              help="Members per one-vs-rest specialist (capped at M / 2; 0: none).")
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True, help="ONNX opset.")
@click.option("--tensorrt", is_flag=True, help="Also build TensorRT engines (needs tensorrt and a GPU).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Stacks' precision [fp32]: fp16 graphs (for GPUs) or int8 (static QDQ quantization calibrated on "
                   "validation inputs; a stack losing more than --precision-tolerance stays fp32); TensorRT engines "
                   "are built in the same precision.")
@click.option("--precision-tolerance", type=click.FloatRange(min=0, max=1), default=0.005, show_default=True,
              help="Largest rise of a quantized stack's own validation error (0.005 = 0.5 points).")
@click.option("--fp16", "engine_precision", flag_value="fp16", help="With --add-tensorrt: FP16 engines.")
@click.option("--int8", "engine_precision", flag_value="int8",
              help="With --add-tensorrt: INT8 engines (TensorRT 10, calibrated).")
@click.option("--dla-core", type=click.IntRange(min=0), default=None,
              help="With --add-tensorrt: build the engines for this DLA core (AGX Orin, Orin NX: 0 or 1), with GPU "
                   "fallback for layers the DLA cannot run; needs --fp16 or --int8.")
@click.option("--dla-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="With --dla-core: the engines' one batch size (the DLA has no dynamic shapes).")
@click.option("--add-tensorrt", "add_to", type=click.Path(file_okay=False), default=None,
              help="Instead of exporting: build engines for this existing bundle on this device.")
@click.option("--checksums/--no-checksums", default=True, show_default=True,
              help="Write checked graphs (MLP stacks; one-hidden-layer MLPs in fp16 too): the runtime catches a "
                   "corrupted weight in any stack a call runs, at every budget. int8 and DenseNet stacks stay "
                   "unchecked; CNN stacks too unless --checksum-convolutions.")
@click.option("--checksum-convolutions", is_flag=True,
              help="Also write checked graphs for CNN stacks (fp32): every convolution checked, at 1.3-1.7x the "
                   "plain graph's time on onnxruntime's CPU provider.")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export(run_dir: str | None, out: str | None, stack_size: int | None, prefix_stacks: str, order: str,
           specialist_size: int, opset: int, tensorrt: bool, precision: str | None, precision_tolerance: float,
           engine_precision: str | None, dla_core: int | None, dla_batch: int, add_to: str | None, checksums: bool,
           checksum_convolutions: bool,
           force: bool, as_json: bool) -> None:
    """Export RUN_DIR as a deployment bundle of member stacks (ONNX, optionally TensorRT) plus a manifest.

    Members are ordered for anytime use, cut into stacks, and each class gets a specialist sub-ensemble. Every
    stack is checked against torch on real validation inputs before the bundle is moved into place; a crash or
    Ctrl-C leaves no partial bundle.

    \b
    Examples:
      edgens export runs/default -o bundle
      edgens export runs/default -o bundle --precision int8
      edgens export runs/default -o bundle --tensorrt --precision fp16
      edgens export --add-tensorrt bundle --fp16      # on the target device
      edgens export --add-tensorrt bundle --fp16 --dla-core 0   # on a Jetson's DLA core 0
    """
    from edgens.cli.progress import StageProgress

    if precision is not None and engine_precision is not None and precision != engine_precision:
        raise click.UsageError(f"--precision {precision} and --{engine_precision} disagree; give one")
    precision = precision or engine_precision or "fp32"
    if dla_core is not None and add_to is None:
        raise click.UsageError("--dla-core builds engines on the device: give it with --add-tensorrt BUNDLE")
    if dla_core is not None and precision == "fp32":
        raise click.UsageError("the DLA runs FP16 and INT8 only: give --fp16 or --int8 with --dla-core")
    progress = StageProgress(quiet=as_json)
    if add_to is not None:
        if run_dir is not None or out is not None:
            raise click.UsageError("--add-tensorrt BUNDLE takes no RUN_DIR or --out")
        from edgens.export import add_tensorrt

        try:
            manifest = add_tensorrt(add_to, precision, progress, dla_core=dla_core, dla_batch=dla_batch)
        finally:  # an error or Ctrl-C must not print after a half-drawn bar
            progress.close()
        engines = [e.to_dict() for s in manifest.stacks for e in s.engines]
        click.echo(json.dumps({"bundle": add_to, "engines": engines}, indent=2) if as_json else
                   f"{add_to}: {len(engines)} TensorRT engines recorded")
        return
    if run_dir is None or out is None:
        raise click.UsageError("give RUN_DIR and -o/--out BUNDLE (or --add-tensorrt BUNDLE)")
    from edgens.export import ExportOptions, export_bundle

    options = ExportOptions(stack_size=stack_size, prefix_stacks=_fractions(prefix_stacks), order=order,
                            specialist_size=specialist_size, opset=opset, tensorrt=tensorrt, precision=precision,
                            precision_tolerance=precision_tolerance, checksums=checksums,
                            checksum_convolutions=checksum_convolutions, force=force)
    try:
        report = export_bundle(run_dir, out, options, progress)
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    manifest = report.manifest
    worst = max(report.parity, key=lambda r: r.max_abs_diff)
    prefixes = ", ".join(str(len(stack.members)) for stack in manifest.prefix_stacks) or "none"
    sizes = sorted({len(stack.members) for stack in manifest.general_stacks})
    size = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    click.echo(f"{out}: {len(manifest.general_stacks)} general stacks of {size} "
               f"members, prefix stacks of {prefixes} members, {len(manifest.specialists)} specialists, "
               f"{report.bytes / 1e6:.1f} MB, {report.seconds:.0f} s")
    kept = [stack for stack in manifest.stacks if stack.precision_note]
    if precision != "fp32":
        click.echo(f"precision: {len(manifest.stacks) - len(kept)} of {len(manifest.stacks)} stacks in {precision}"
                   + (f"; kept fp32: {'; '.join(f'{s.name} ({s.precision_note})' for s in kept)}" if kept else ""))
    click.echo(f"parity: every stack matches torch on validation inputs (largest difference {worst.max_abs_diff:.1e}"
               f" in {worst.name})")
    curve = manifest.curves
    tenth = max(1, len(manifest.order) // 10)
    click.echo(f"validation error: all members {100 * manifest.metrics.val.error:.2f}%, first {tenth} in "
               f"{manifest.order_method} order {100 * curve.order_val_error[tenth - 1]:.2f}% (random "
               f"{100 * curve.random_val_error[tenth - 1]:.2f}%)")


def _fractions(text: str) -> tuple[float, ...]:
    """``--prefix-stacks``: comma-separated fractions in (0, 1], or ``none``."""
    if text.strip().lower() in ("none", ""):
        return ()
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated fractions in (0, 1] or 'none', got {text!r}",
                                 param_hint="--prefix-stacks") from None
    if not all(0 < value <= 1 for value in values):
        raise click.BadParameter(f"expected fractions in (0, 1], got {text!r}", param_hint="--prefix-stacks")
    return values
