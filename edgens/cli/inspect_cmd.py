"""``edgens inspect RUN``: print a run's settings, progress and results."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print config, last epoch and summary as JSON.")
def inspect(run_dir: str, as_json: bool) -> None:
    """Show a run's configuration, training progress and final test metrics."""
    from edgens.cli.train_cmd import describe_test
    from edgens.errors import DataNotFoundError
    from edgens.rundir import RunDir

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise DataNotFoundError(f"run directory {run_dir} does not exist")
    config = run.config()
    metrics = run.metrics()
    summary = run.summary() if run.is_finished() else None
    if as_json:
        click.echo(json.dumps({"run": run_dir, "config": config, "epochs_done": len(metrics),
                               "last_epoch": metrics[-1] if metrics else None, "summary": summary}, indent=2))
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
    if summary is None:
        click.echo(f"status     not finished: continue with `edgens train --resume {run_dir}`")
    else:
        click.echo(f"result     {describe_test(summary)}, best epoch {summary['best_epoch']}")
