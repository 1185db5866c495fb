"""``edgens profile``: measure every stack of a bundle on this device and store the latency table in the bundle.

Only click and the standard library are imported here; the runtime and tqdm are imported when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgens.cli.infer_cmd import BACKEND_CHOICES


def describe_clocks(clocks: dict | None) -> str:
    """``clocks: CPU 730-1344 of 1344 MHz, GPU 306 of 918 MHz (not pinned: sudo jetson_clocks ...)``."""
    from edgens.runtime.device_info import Clocks

    if not clocks or not clocks.get("cpu_mhz"):
        return "clocks not readable"
    read = Clocks.from_dict(clocks)
    parts = [f"CPU {min(read.cpu_mhz):.0f}-{max(read.cpu_mhz):.0f} of {max(read.cpu_max_mhz):.0f} MHz"]
    if read.gpu_mhz is not None:
        parts.append(f"GPU {read.gpu_mhz:.0f} of {read.gpu_max_mhz:.0f} MHz")
    hint = "" if read.pinned else " (not pinned: `sudo jetson_clocks` gives steadier latencies)"
    return "clocks as it ended: " + ", ".join(parts) + hint


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]``.

    Raises:
        click.BadParameter: not a comma-separated list of integers >= 1.
    """
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"expected comma-separated batch sizes >= 1 such as 1,8,64, got {text!r}",
                                 param_hint="--batch-sizes")
    return sorted(set(sizes))


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--batch-sizes", default="1,8,64", show_default=True, help="Comma-separated batch sizes to measure.")
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs each.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(min=1),
              help="onnxruntime threads per general stack's session (default: the cores per lane).")
@click.option("--lanes", type=click.IntRange(min=1),
              help="Parallel lanes to measure (default: one per core, at most 4).")
@click.option("--accelerators", metavar="gpu,dla0,dla1",
              help="tensorrt backend: run the general stacks in turn on these (a Jetson's GPU and DLA cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON instead of text.")
def profile(bundle: Path, backend: str, batch_sizes: str, repeats: int, warmup: int, threads: int | None,
            lanes: int | None, accelerators: str | None, as_json: bool) -> None:
    """Measure each stack of BUNDLE on this device (median and p90 latency) and save BUNDLE/latency.json.

    The table is kept per backend, providers, device and power mode (a Jetson's nvpmodel mode, recorded with the
    clocks); profiling again replaces the matching table. Budgets given in milliseconds (`edgens infer
    --latency-ms`) use the table of the device's current mode only: profile once in each mode you run in. With two
    or more lanes it also times every general stack run one after another and on the lanes, which shows what
    parallel lanes achieve on this device.
    """
    from tqdm import tqdm

    from edgens.fileio import check_writable
    from edgens.runtime import Predictor, profile_stacks, save_latency_table
    from edgens.runtime.latency import LATENCY_FILE

    sizes = parse_batch_sizes(batch_sizes)
    options = {key: value for key, value in (("threads", threads), ("accelerators", accelerators)) if value}
    with Predictor.load(bundle, backend, lanes=lanes, **options) as predictor:
        check_writable(bundle / LATENCY_FILE)  # before the measurement, not after it
        total = (len(predictor.runners) + len(predictor.pool.lean_runners)) * len(sizes)  # lean twins too
        with tqdm(total=total, desc="profiling", unit="stack", disable=None, leave=False) as bar:
            def advance(stack: str, batch: int) -> None:
                bar.set_postfix_str(f"{stack} @ {batch}")
                bar.update()

            table = profile_stacks(predictor, sizes, warmup=warmup, repeats=repeats, on_progress=advance)
        path = save_latency_table(bundle, table)
    if as_json:
        click.echo(json.dumps({"path": str(path), **table.to_dict()}, indent=2))
        return
    click.echo(f"{table.backend} [{', '.join(table.providers)}] on {table.device}; {warmup} warm-up, {repeats} "
               f"timed runs")
    if table.power_mode is not None:
        click.echo(f"power mode {table.power_mode}; {describe_clocks(table.clocks)}")
    click.echo(f"{'stack':<20} {'batch':>6} {'median ms':>10} {'p90 ms':>10}")
    for name, rows in table.stacks.items():
        for batch, latency in sorted(rows.items()):
            click.echo(f"{name:<20} {batch:>6} {latency.median_ms:>10.4f} {latency.p90_ms:>10.4f}")
    for batch, chain in sorted(table.lanes.items()):
        click.echo(f"all general stacks at batch {batch}: {chain.in_order_ms:.4f} ms in order, {chain.lanes_ms:.4f} "
                   f"ms on {chain.lanes} lanes ({chain.speedup:.2f}x)")
    click.echo(f"wrote {path}")
