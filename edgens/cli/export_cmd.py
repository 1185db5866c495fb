"""``edgens export``: a trained run -> a deployment bundle (or TensorRT engines added to an existing bundle)."""

from __future__ import annotations

import json

import click


@click.command(context_settings={"max_content_width": 100})
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Bundle directory to create.")
@click.option("--stack-size", type=click.IntRange(min=1), default=None,
              help="Members per general stack [ceil(M / 16): at most 16 stacks].")
@click.option("--order", type=click.Choice(["greedy", "index"]), default="greedy", show_default=True,
              help="Member order: greedy forward selection on validation outputs, or by index.")
@click.option("--specialist-size", type=click.IntRange(min=0), default=20, show_default=True,
              help="Members per one-vs-rest specialist (capped at M / 2; 0: none).")
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True, help="ONNX opset.")
@click.option("--tensorrt", is_flag=True, help="Also build TensorRT engines (needs tensorrt and a GPU).")
@click.option("--fp16", "precision", flag_value="fp16", help="TensorRT engines in FP16.")
@click.option("--int8", "precision", flag_value="int8", help="TensorRT engines in INT8 (TensorRT 10, calibrated).")
@click.option("--add-tensorrt", "add_to", type=click.Path(file_okay=False), default=None,
              help="Instead of exporting: build engines for this existing bundle on this device.")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export(run_dir: str | None, out: str | None, stack_size: int | None, order: str, specialist_size: int, opset: int,
           tensorrt: bool, precision: str | None, add_to: str | None, force: bool, as_json: bool) -> None:
    """Export RUN_DIR as a deployment bundle of member stacks (ONNX, optionally TensorRT) plus a manifest.

    Members are ordered for anytime use, cut into stacks, and each class gets a specialist sub-ensemble. Every
    stack is checked against torch on real validation inputs before the bundle is moved into place; a crash or
    Ctrl-C leaves no partial bundle.

    \b
    Examples:
      edgens export runs/default -o bundle
      edgens export runs/default -o bundle --tensorrt --fp16
      edgens export --add-tensorrt bundle --fp16      # on the target device
    """
    from edgens.cli.progress import StageProgress

    precision = precision or "fp32"
    progress = StageProgress(quiet=as_json)
    if add_to is not None:
        if run_dir is not None or out is not None:
            raise click.UsageError("--add-tensorrt BUNDLE takes no RUN_DIR or --out")
        from edgens.export import add_tensorrt

        try:
            manifest = add_tensorrt(add_to, precision, progress)
        finally:  # an error or Ctrl-C must not print after a half-drawn bar
            progress.close()
        engines = [e.to_dict() for s in manifest.stacks for e in s.engines]
        click.echo(json.dumps({"bundle": add_to, "engines": engines}, indent=2) if as_json else
                   f"{add_to}: {len(engines)} TensorRT engines recorded")
        return
    if run_dir is None or out is None:
        raise click.UsageError("give RUN_DIR and -o/--out BUNDLE (or --add-tensorrt BUNDLE)")
    from edgens.export import ExportOptions, export_bundle

    options = ExportOptions(stack_size=stack_size, order=order, specialist_size=specialist_size, opset=opset,
                            tensorrt=tensorrt, precision=precision, force=force)
    try:
        report = export_bundle(run_dir, out, options, progress)
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    manifest = report.manifest
    worst = max(report.parity, key=lambda r: r.max_abs_diff)
    click.echo(f"{out}: {len(manifest.general_stacks)} general stacks of {len(manifest.stacks[0].members)} "
               f"members, {len(manifest.specialists)} specialists, {report.bytes / 1e6:.1f} MB, "
               f"{report.seconds:.0f} s")
    click.echo(f"parity: every stack matches torch on validation inputs (largest difference {worst.max_abs_diff:.1e}"
               f" in {worst.name})")
    curve = manifest.curves
    tenth = max(1, len(manifest.order) // 10)
    click.echo(f"validation error: all members {100 * manifest.metrics.val.error:.2f}%, first {tenth} in "
               f"{manifest.order_method} order {100 * curve.order_val_error[tenth - 1]:.2f}% (random "
               f"{100 * curve.random_val_error[tenth - 1]:.2f}%)")
