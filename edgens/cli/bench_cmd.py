"""``edgens bench``: measured accuracy of ensembles (lam sweeps, dropped members, specialists, dominance) and of
deployed bundles under silent faults.

Each subcommand writes NAME.json, NAME.md and NAME.png (more PNGs for dominance) into ``--out``, prints the
markdown table (or the JSON with ``--json``) on stdout, and draws progress on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

DEFAULT_OUT = "bench-results"
DEFAULT_LAMS = "0,0.5,0.8,0.9,0.95,0.99,1"
DEFAULT_KEEP_PROBS = "1,0.9,0.75,0.5,0.25,0.1,0.05,0.02,0.01"

_runs_argument = click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))


def _common(default_name: str) -> Callable:
    """--out, --name, --json and --quiet, shared by every bench."""
    def decorate(command: Callable) -> Callable:
        for option in reversed([
            click.option("--out", type=click.Path(file_okay=False), default=DEFAULT_OUT, show_default=True,
                         help="Directory for the JSON, markdown and PNG results."),
            click.option("--name", default=default_name, show_default=True,
                         help="Stem of the result files (NAME.json, NAME.md, NAME.png)."),
            click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of the table."),
            click.option("--quiet", is_flag=True, help="No progress bars."),
        ]):
            command = option(command)
        return command
    return decorate


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers for {what}, got {text!r}") from None
    if not values:
        raise click.BadParameter(f"expected at least one number for {what}, got {text!r}")
    return values


def _finish(data: dict, markdown: str, out: str, name: str, plot: Callable | None, as_json: bool) -> None:
    """Write the results and tell the user where they are."""
    from edgens.bench.report import dumps, write_results

    written = write_results(out, name, data, markdown, plot)
    if as_json:
        click.echo(dumps(data))
    else:
        click.echo(markdown)
    files = [written["json"], written["markdown"], *written["plots"]]
    click.echo(f"wrote {', '.join(files)}", err=True)
    if written["plot_skipped"]:
        click.echo(f"plots skipped: {written['plot_skipped']}", err=True)


@click.group(context_settings={"max_content_width": 100})
def bench() -> None:
    """Measure ensembles: lam sweeps, dropped members, specialists, module dominance, silent faults.

    \b
    Examples:
      edgens bench lambda --preset mlp-256x4 --lams 0,0.95,0.99,1 --epochs 30 --trials 3 --out results
      edgens bench drop results/runs/mlp-256x4-lam0-modular-t0 results/runs/mlp-256x4-lam0.99-modular-t0
      edgens bench specialists results/runs/mlp-256x4-lam0.99-modular-t0
      edgens bench dominance results/runs/mlp-256x4-lam1-modular-t0
      edgens bench faults bundle-lam0 bundle-lam0.99 bundle-lam1 --draws 200
    """


@bench.command("drop")
@_runs_argument
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Repeats of the random draws (the paper: 20).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random draws (same for every run).")
@click.option("--keep-probs", default=DEFAULT_KEEP_PROBS, show_default=True,
              help="Keep probabilities p of the Bernoulli protocol.")
@click.option("--greedy/--no-greedy", default=True, show_default=True,
              help="Also measure the greedy anytime order (chosen on validation data).")
@_common("drop")
def drop(runs: tuple[str, ...], repeats: int, seed: int, keep_probs: str, greedy: bool, out: str, name: str,
         as_json: bool, quiet: bool) -> None:
    """Test accuracy and NLL vs members dropped, for finished RUNS (e.g. lam 0, 0.99, 1).

    Members are dropped independently for each test example: d chosen at random (every d, REPEATS repeats), or each
    kept with probability p; and the first k members of the greedy anytime order.
    """
    probs = _floats(keep_probs, "--keep-probs")
    from edgens.bench.drop import drop_bench, drop_markdown
    from edgens.bench.report import check_destination
    from edgens.cli.progress import StageProgress
    from edgens.bench.plots import plot_drop

    check_destination(out, name)
    progress = StageProgress(quiet)
    try:
        data = drop_bench(runs, repeats, seed, probs, greedy, progress)
    finally:
        progress.close()
    _finish(data, drop_markdown(data), out, name, plot_drop, as_json)


@bench.command("lambda")
@click.option("--preset", "presets", multiple=True, default=("mlp-256x4",), show_default=True,
              help="Ensemble preset (repeat the option for several).")
@click.option("--lams", default=DEFAULT_LAMS, show_default=True, help="Comma-separated lam values in [0, 1].")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--trials", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs per setting; trial t uses seed SEED + t.")
@click.option("--methods", default="modular", show_default=True,
              help="Comma-separated: modular, bagging (bootstrap samples, lam 0), stacking (a combiner fitted on "
                   "the modular runs' validation outputs).")
@click.option("--runs", "runs_dir", type=click.Path(file_okay=False), default=None,
              help="Where the runs live [OUT/runs]: finished ones are reused, interrupted ones resumed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of trial 0.")
@click.option("--lr", type=float, default=None, help="Per-member learning rate [edgens train's default].")
@click.option("--train-limit", type=click.IntRange(min=1), default=None,
              help="Train on this many training examples only (quick experiments).")
@click.option("--val-size", type=click.IntRange(min=1), default=None,
              help="Validation examples held out of the training data [fashion-mnist: 10000].")
@click.option("--data", "dataset", default="fashion-mnist", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads [torch's default].")
@click.option("--stacking-l2", type=float, default=1e-3, show_default=True,
              help="Penalty pulling the stacking weights towards the plain mean.")
@click.option("--no-train", is_flag=True, help="Only tabulate the runs that have finished; train nothing.")
@_common("")
def lambda_(presets: tuple[str, ...], lams: str, epochs: int, trials: int, methods: str, runs_dir: str | None,
            seed: int, lr: float | None, train_limit: int | None, val_size: int | None, dataset: str,
            data_dir: str | None, device: str, threads: int | None, stacking_l2: float, no_train: bool, out: str,
            name: str, as_json: bool, quiet: bool) -> None:
    """Train a lam sweep and tabulate test error per (preset, lam, method): mean ± standard error over trials.

    Runs go to RUNS/<preset>-lam<lam>-<method>-t<trial>/; running the command again reuses finished runs and
    resumes interrupted ones, so an interrupted sweep continues where it stopped. Results: NAME.json, NAME.md,
    NAME.png in --out (NAME defaults to lambda-<presets>).
    """
    from edgens.bench.report import check_destination
    from edgens.bench.sweep import parse_lams, parse_methods, plan_runs, run_config
    from edgens.presets import check_preset

    for preset in presets:
        check_preset(preset)
    lam_values, method_list = parse_lams(lams), parse_methods(methods)
    name = check_destination(out, name or "lambda-" + "+".join(presets))
    runs_path = Path(runs_dir) if runs_dir else Path(out) / "runs"
    planned = plan_runs(presets, lam_values, method_list, trials)
    settings = {"lr": lr, "train_limit": train_limit, "val_size": val_size, "dataset": dataset, "data_dir": data_dir,
                "device": device}
    if not no_train:
        _train_sweep(planned, runs_path, epochs, seed, threads, quiet, settings)
    from edgens.bench.lam_results import collect_sweep, lambda_markdown
    from edgens.cli.progress import StageProgress
    from edgens.bench.plots import plot_lambda

    progress = StageProgress(quiet)
    try:
        data = collect_sweep(runs_path, presets, lam_values, method_list, trials, stacking_l2, progress,
                             expected=lambda run: run_config(run, epochs, seed, **settings))
    finally:
        progress.close()
    data["epochs"] = epochs
    _finish(data, lambda_markdown(data), out, name, plot_lambda, as_json)


def _train_sweep(planned: list, runs_path: Path, epochs: int, seed: int, threads: int | None, quiet: bool,
                 settings: dict) -> None:
    """Train, resume or reuse every planned run, one line per run on stderr."""
    from edgens.bench.sweep import run_sweep
    from edgens.cli.progress import EpochProgress

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    progress = EpochProgress(quiet=True)  # replaced by a fresh one for each run that trains
    counts = {"trained": 0, "resumed": 0, "reused": 0}

    def callbacks_for(run) -> object:
        nonlocal progress
        progress = EpochProgress(quiet)
        if not quiet:
            click.echo(f"training {run.name}", err=True)  # called only for runs that train or resume
        return progress.callbacks()

    def on_run(done: int, total: int, run, status: str) -> None:
        progress.close()
        counts[status] += 1
        if not quiet and status != "reused":
            click.echo(f"[{done}/{total}] {run.name}: {status}", err=True)

    try:
        run_sweep(runs_path, planned, epochs, seed, callbacks_for, on_run, **settings)
    except KeyboardInterrupt:
        progress.close()
        click.echo("\ninterrupted; finished runs and the last epoch are saved: run the same command again to "
                   "resume", err=True)
        sys.exit(130)
    click.echo(f"runs in {runs_path}: {counts['trained']} trained, {counts['resumed']} resumed, "
               f"{counts['reused']} reused", err=True)


@bench.command("specialists")
@_runs_argument
@click.option("--size", type=click.IntRange(min=1), default=20, show_default=True, help="Members per specialist.")
@click.option("--candidates", type=click.IntRange(min=1), default=200, show_default=True,
              help="Random subsets for the paper's best-of-random selection.")
@click.option("--seed", type=int, default=0, show_default=True)
@_common("specialists")
def specialists(runs: tuple[str, ...], size: int, candidates: int, seed: int, out: str, name: str, as_json: bool,
                quiet: bool) -> None:
    """One-vs-rest specialists of finished RUNS: mean test F1 of single members, random subsets, and subsets
    selected on validation (greedy, best of random), as in the paper's Figure 5."""
    from edgens.bench.report import check_destination
    from edgens.bench.specialists import specialists_bench, specialists_markdown
    from edgens.cli.progress import StageProgress
    from edgens.bench.plots import plot_specialists

    check_destination(out, name)
    progress = StageProgress(quiet)
    try:
        data = specialists_bench(runs, size, candidates, seed, progress)
    finally:
        progress.close()
    _finish(data, specialists_markdown(data), out, name, plot_specialists, as_json)


@bench.command("dominance")
@_runs_argument
@click.option("--filters/--no-filters", default=True, show_default=True,
              help="Show the best members' first-layer weights as images (loads the checkpoint: needs torch).")
@click.option("--filter-members", type=click.IntRange(min=1), default=8, show_default=True,
              help="How many members' first-layer weights to show.")
@_common("dominance")
def dominance(runs: tuple[str, ...], filters: bool, filter_members: int, out: str, name: str, as_json: bool,
              quiet: bool) -> None:
    """Module dominance in finished RUNS: per-member validation error over epochs (the paper's Figure 7),
    per-member entropy statistics (Table 6), confusion matrices, first-layer filters."""
    from edgens.bench.dominance import dominance_bench, dominance_markdown
    from edgens.bench.report import check_destination
    from edgens.cli.progress import StageProgress
    from edgens.bench.plots import plot_dominance

    check_destination(out, name)
    progress = StageProgress(quiet)
    try:
        data = dominance_bench(runs, filters, filter_members, progress)
    finally:
        progress.close()
    _finish(data, dominance_markdown(data), out, name, plot_dominance, as_json)


@bench.command("faults")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--data", default=None,
              help="Labelled test inputs: DATASET:SPLIT or FILE.npz (as `edgens infer --input`) [the bundle's data "
                   "set, test split].")
@click.option("--draws", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Harmful exponent flips per budget (all members, deadline).")
@click.option("--random-draws", type=click.IntRange(min=1), default=None, help="Random flips (any bit) [--draws].")
@click.option("--sweep-draws", type=click.IntRange(min=1), default=10, show_default=True,
              help="Flips per bit position (0-31) and per flip count (1, 4, 16, 64) in the sweep.")
@click.option("--sweep-examples", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Test examples per sweep draw.")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Examples per call.")
@click.option("--shuffles", type=click.IntRange(min=1), default=10, show_default=True,
              help="Random orders of the clean test calls (false drops).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every draw.")
@click.option("--cost-rounds", type=click.IntRange(min=1), default=15, show_default=True,
              help="Rounds of timing detection and the combiners at full budget.")
@_common("faults")
def faults(bundles: tuple[str, ...], data: str | None, draws: int, random_draws: int | None, sweep_draws: int,
           sweep_examples: int, batch: int, shuffles: int, seed: int, cost_rounds: int, out: str, name: str,
           as_json: bool, quiet: bool) -> None:
    """Silent faults in deployed BUNDLES (e.g. of runs with lam 0, 0.99, 1): weight bits flipped in memory after
    the checksum, with outlier detection off and on and with each combiner.

    Measures accuracy and silent data corruption (predictions that differ from the fault-free ones) against the
    corrupted group of members simply left out, by bit position and number of flips; false drops and cost on
    clean data; and which flips the self-test catches. Runs on onnxruntime (CPU or its GPU providers).
    """
    from edgens.bench.faults import faults_bench, faults_markdown
    from edgens.bench.plots import plot_faults
    from edgens.bench.report import check_destination
    from edgens.cli.progress import StageProgress

    check_destination(out, name)
    progress = StageProgress(quiet)
    try:
        results = faults_bench(bundles, data, draws, random_draws, sweep_draws, sweep_examples, batch, shuffles, seed,
                               cost_rounds, progress)
    finally:
        progress.close()
    _finish(results, faults_markdown(results), out, name, plot_faults, as_json)
