"""``edgens train``: train an ensemble with the modular loss into a run directory."""

from __future__ import annotations

import json
import sys
from datetime import datetime

import click

from edgens.config import DEFAULT_LR, HIGH_LAM, HIGH_LAM_LR_FACTOR, TrainConfig
from edgens.presets import DEFAULT_PRESET, PRESETS


def _milestones(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated fractions like 0.5,0.75, got {text!r}") from None


@click.command(context_settings={"max_content_width": 100})
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=DEFAULT_PRESET, show_default=True,
              help="Ensemble architecture (mlp-MxH: M members of H hidden units).")
@click.option("--members", "n_members", type=click.IntRange(min=1), default=None,
              help="Override the preset's number of members.")
@click.option("--lam", type=float, default=0.99, show_default=True,
              help="Modular-loss weight in [0, 1]: 0 = independent members, 1 = end-to-end ensemble.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--lr", type=float, default=None,
              help=f"Per-member learning rate (the paper's rate / M). Default: {DEFAULT_LR['mlp']} for mlp, "
                   f"{DEFAULT_LR['cnn']} for cnn, {DEFAULT_LR['densenet']} for densenet, x{HIGH_LAM_LR_FACTOR} when "
                   f"lam > {HIGH_LAM}.")
@click.option("--lr-milestones", default="0.5,0.75", show_default=True,
              help="Fractions of the epochs after which the rate is multiplied by --lr-gamma.")
@click.option("--lr-gamma", type=float, default=0.1, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--nesterov/--no-nesterov", default=False, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=None,
              help="Stop after this many epochs without a better validation score.")
@click.option("--method", type=click.Choice(["modular", "bagging"]), default="modular", show_default=True,
              help="bagging: each member on its own bootstrap sample (needs --lam 0).")
@click.option("--data", "dataset", default="fashion-mnist", show_default=True,
              help="fashion-mnist, cifar10, cifar100, or npz:PATH (arrays x, y; optional x_test, y_test).")
@click.option("--family", type=click.Choice(["categorical", "gaussian", "poisson"]), default="categorical",
              show_default=True, help="Target family (for npz data).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where to look for data first (then $EDGENS_DATA, the user cache, Debian's package).")
@click.option("--val-size", type=click.IntRange(min=1), default=None,
              help="Validation examples held out of the training data [fashion-mnist: 10000].")
@click.option("--train-limit", type=click.IntRange(min=1), default=None,
              help="Train on this many (random) training examples only, for quick experiments.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda, cuda:N.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory to create [runs/PRESET-lamLAM-sSEED-TIME].")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the interrupted run in this directory (its own settings are used).")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
def train(preset: str, n_members: int | None, lam: float, epochs: int, lr: float | None, lr_milestones: str,
          lr_gamma: float, momentum: float, nesterov: bool, weight_decay: float, batch_size: int,
          patience: int | None, method: str, dataset: str, family: str, data_dir: str | None, val_size: int | None,
          train_limit: int | None, seed: int, device: str, out: str | None, resume_dir: str | None, as_json: bool,
          quiet: bool) -> None:
    """Train an ensemble with the modular loss and write a run directory.

    The run directory holds config.json, metrics.jsonl (one line per epoch), checkpoints (written atomically
    every epoch), the members' validation and test outputs, and summary.json. Interrupt it any time and continue
    with --resume RUN.
    """
    if resume_dir is None:
        config = TrainConfig(preset=preset, n_members=n_members, lam=lam, epochs=epochs, lr=lr,
                             lr_milestones=_milestones(lr_milestones), lr_gamma=lr_gamma, momentum=momentum,
                             nesterov=nesterov, weight_decay=weight_decay, batch_size=batch_size, patience=patience,
                             seed=seed, device=device, dataset=dataset, family=family, data_dir=data_dir,
                             val_size=val_size, train_limit=train_limit, method=method).validate()
        out = out or f"runs/{preset}-lam{lam:g}-s{seed}-{datetime.now():%Y%m%d-%H%M%S}"

    from edgens.cli.progress import EpochProgress  # heavy imports only now that the command runs
    from edgens.train import resume, train as train_run

    progress = EpochProgress(quiet)
    try:
        if resume_dir is not None:
            summary = resume(resume_dir, progress.callbacks(), None if device == "auto" else device)
            out = resume_dir
        else:
            click.echo(f"training {preset} (lam={lam:g}) -> {out}", err=True) if not quiet else None
            summary = train_run(config, out, progress.callbacks())
    except KeyboardInterrupt:
        progress.close()
        click.echo(f"\ninterrupted; the last finished epoch is saved: continue with `edgens train --resume {out}`",
                   err=True)
        sys.exit(130)
    progress.close()
    if as_json:
        click.echo(json.dumps({"run": str(out), **summary}, indent=2))
    else:
        click.echo(f"{out}: {describe_test(summary)}, best epoch {summary['best_epoch']} of "
                   f"{summary['epochs_run']}, {summary['train_time_s']:.0f} s")


def describe_test(summary: dict) -> str:
    """One phrase with a run's test metrics (accuracy for classification, MSE otherwise)."""
    test = summary["test"]
    if summary.get("family", "categorical") == "categorical":
        return (f"test error {100 * test['ensemble_error']:.2f}% (accuracy {100 * (1 - test['ensemble_error']):.2f}%),"
                f" NLL {test['ensemble_loss']:.4f}")
    return f"test MSE {test['ensemble_error']:.4g}, NLL {test['ensemble_loss']:.4f}"
