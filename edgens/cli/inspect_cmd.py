"""``edgens inspect RUN``: print a run's settings, progress and results."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print config, last epoch and summary as JSON.")
@click.option("--collusion", is_flag=True,
              help="Recompute the learner-collusion diagnostic from the best checkpoint (runs trained before it was "
                   "recorded per epoch; needs torch and the run's data).")
def inspect(run_dir: str, as_json: bool, collusion: bool) -> None:
    """Show a run's configuration, training progress and final test metrics, with warnings for module dominance
    and learner collusion."""
    from edgens.cli.train_cmd import describe_test
    from edgens.errors import DataNotFoundError
    from edgens.rundir import RunDir

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise DataNotFoundError(f"run directory {run_dir} does not exist")
    config = run.config()
    metrics = run.metrics()
    summary = run.summary() if run.is_finished() else None
    recomputed = None
    if collusion:
        from edgens.collusion import run_collusion

        recomputed = run_collusion(run_dir)
    if as_json:
        click.echo(json.dumps({"run": run_dir, "config": config, "epochs_done": len(metrics),
                               "last_epoch": metrics[-1] if metrics else None, "summary": summary,
                               **({"collusion_best": recomputed} if recomputed is not None else {})}, indent=2))
        return
    settings = config["config"]
    stack = config["stack"]
    click.echo(f"run        {run_dir}")
    click.echo(f"model      {settings['preset']}: {stack['n_members']} members, lam {settings['lam']}, "
               f"method {settings['method']}")
    click.echo(f"data       {config['data']['name']} ({config['data']['sizes']['train']} train / "
               f"{config['data']['sizes']['val']} val / {config['data']['sizes']['test']} test)")
    click.echo(f"training   lr {config['resolved']['lr']} per member, batch {settings['batch_size']}, "
               f"{len(metrics)}/{settings['epochs']} epochs on {config['resolved']['device']}")
    if metrics:
        last = metrics[-1]["val"]
        click.echo(f"last epoch val error {100 * last['ensemble_error']:.2f}%, members best/median/worst "
                   f"{100 * last['best_member_error']:.1f}/{100 * last['median_member_error']:.1f}/"
                   f"{100 * last['worst_member_error']:.1f}%, ambiguity {last['ambiguity']:.3f}")
        if any(record.get("dominance") for record in metrics):
            first = next(r["epoch"] for r in metrics if r.get("dominance"))
            click.echo(f"warning    module dominance seen from epoch {first} (one member far better than the median)")
        if metrics[-1].get("collusion") is not None:
            click.echo(f"collusion  last epoch: {describe_collusion(metrics[-1]['collusion'])}")
        if any(record.get("colluding") for record in metrics):
            first = next(r["epoch"] for r in metrics if r.get("colluding"))
            click.echo(f"warning    learner collusion seen from epoch {first} (diversity that cancels in the "
                       f"ensemble; members dropped will cost much)")
    if recomputed is not None:
        from edgens.diagnostics import is_colluding

        click.echo(f"collusion  best weights: {describe_collusion(recomputed)}"
                   + ("  [colluding]" if is_colluding(recomputed) else ""))
    if summary is None:
        click.echo(f"status     not finished: continue with `edgens train --resume {run_dir}`")
    else:
        click.echo(f"result     {describe_test(summary)}, best epoch {summary['best_epoch']}")


def describe_collusion(values: dict) -> str:
    """One line of the collusion diagnostic: diversity against member loss (train/val), and the offsets' part."""
    return (f"diversity/member loss {values['train_diversity_ratio']:.2f} train, {values['val_diversity_ratio']:.2f} "
            f"val (gap {values['diversity_ratio_gap']:+.3f}); constant offsets "
            f"{100 * values['val_debiased_fraction']:.0f}% of the spread")
