"""``edgens train``: train an ensemble with the modular loss into a run directory."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from pathlib import Path

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
@click.option("--anytime-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="mu: add mu * sum_k (k/M) NLL(mean of the first k members) to the loss, so that the prefixes of "
                   "the member order the device runs are strong ensembles (0: the paper's loss).")
@click.option("--prefixes", "prefixes_text", default=None, metavar="K1,K2,...",
              help="Member counts k of the nested prefixes the anytime term trains [M/16, 10%, M/8, M/4, M/2].")
@click.option("--fault-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="nu: add nu * the mean over random member subsets (each keeping 5-50% of the members) of "
                   "(k/M) NLL(mean of the kept members), so that what random faults and drops leave is a strong "
                   "ensemble too; combine with --anytime-weight for budgets and faults at once (0: none).")
@click.option("--fault-draws", type=click.IntRange(min=1), default=2, show_default=True,
              help="Random subsets per step for --fault-weight (each serves the whole batch).")
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
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=None,
              help="Train member-parallel in N processes on this machine (starts torchrun; each process trains "
                   "about M/N members; with GPUs, one GPU per process).")
@click.option("--dist-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Distributed runs: seconds a process waits for the others before failing.")
@click.pass_context
def train(ctx: click.Context, preset: str, n_members: int | None, lam: float, anytime_weight: float,
          fault_weight: float, fault_draws: int,
          prefixes_text: str | None, epochs: int, lr: float | None,
          lr_milestones: str, lr_gamma: float, momentum: float, nesterov: bool, weight_decay: float, batch_size: int,
          patience: int | None, method: str, dataset: str, family: str, data_dir: str | None, val_size: int | None,
          train_limit: int | None, seed: int, device: str, out: str | None, resume_dir: str | None, as_json: bool,
          quiet: bool, nproc_per_node: int | None, dist_timeout: float) -> None:
    """Train an ensemble with the modular loss and write a run directory.

    The run directory holds config.json, metrics.jsonl (one line per epoch), checkpoints (written atomically
    every epoch), the members' validation and test outputs, and summary.json. Interrupt it any time and continue
    with --resume RUN.

    Member-parallel training: `edgens train --nproc-per-node N ...`, or `torchrun --nproc-per-node N -m edgens
    train ...` (any torchrun setup, several machines included). Each process trains a slice of the members; rank
    0 writes the same run directory as a single process would.
    """
    if resume_dir is None:
        config = TrainConfig(preset=preset, n_members=n_members, lam=lam, epochs=epochs, lr=lr,
                             lr_milestones=_milestones(lr_milestones), lr_gamma=lr_gamma, momentum=momentum,
                             nesterov=nesterov, weight_decay=weight_decay, batch_size=batch_size, patience=patience,
                             seed=seed, device=device, dataset=dataset, family=family, data_dir=data_dir,
                             val_size=val_size, train_limit=train_limit, method=method, anytime_weight=anytime_weight,
                             prefixes=_prefixes(prefixes_text), fault_weight=fault_weight,
                             fault_draws=fault_draws).validate()
        out = out or f"runs/{preset}-lam{lam:g}-s{seed}-{datetime.now():%Y%m%d-%H%M%S}"
        from edgens.rundir import RunDir  # torch-free

        RunDir(out).check_new()  # a taken or unwritable --out fails now, before anything is printed or loaded

    from edgens.distributed.launch import torchrun_env  # torch-free

    if nproc_per_node is not None:
        _launch(ctx, nproc_per_node, resume_dir or out)
        return
    world = torchrun_env()
    distributed = world is not None and world.world_size > 1
    reports = not distributed or world.rank == 0  # rank 0 reports for everyone
    if not reports:
        quiet = True
        logging.getLogger("edgens").setLevel(logging.ERROR)
    run_path = resume_dir or out

    from edgens.cli.progress import EpochProgress  # heavy imports only now that the command runs
    from edgens.errors import DistributedError
    from edgens.train import resume, train as train_run

    progress = EpochProgress(quiet)
    try:
        if resume_dir is not None:
            device_override = None if device == "auto" else device
            if distributed:
                from edgens.distributed.trainer import resume_distributed

                summary = resume_distributed(resume_dir, progress.callbacks(), device_override, dist_timeout)
            else:
                summary = resume(resume_dir, progress.callbacks(), device_override)
            out = resume_dir
        else:
            click.echo(f"training {preset} (lam={lam:g}) -> {out}", err=True) if not quiet else None
            if distributed:
                from edgens.distributed.trainer import train_distributed

                summary = train_distributed(config, out, progress.callbacks(), dist_timeout)
            else:
                summary = train_run(config, out, progress.callbacks())
    except KeyboardInterrupt:
        progress.close()
        if reports:
            click.echo(f"\ninterrupted; the last finished epoch is saved: continue with `edgens train --resume "
                       f"{run_path}`", err=True)
        sys.exit(130)
    except DistributedError as err:
        progress.close()
        raise DistributedError(f"{err}{_resume_hint(run_path) if reports else ''}") from err
    progress.close()
    if not reports:
        return
    if as_json:
        click.echo(json.dumps({"run": str(out), **summary}, indent=2))
    else:
        click.echo(f"{out}: {describe_test(summary)}, best epoch {summary['best_epoch']} of "
                   f"{summary['epochs_run']}, {summary['train_time_s']:.0f} s")


def _worker_args(ctx: click.Context, out: str | None) -> list[str]:
    """The command line each torchrun worker runs: this one without --nproc-per-node, with --out resolved (so that
    every process, and the resume hint, name the same directory)."""
    verbose = ctx.parent.params.get("verbose", 0) if ctx.parent is not None else 0
    args = ["-v"] * verbose + [ctx.info_name or "train"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name == "nproc_per_node":
            continue
        value = out if param.name == "out" else ctx.params.get(param.name)
        if value is None:
            continue
        if param.is_flag:
            if param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
        else:
            args += [param.opts[0], str(value)]
    return args


def _launch(ctx: click.Context, nproc_per_node: int, run_dir: str) -> None:
    """``--nproc-per-node N``: run this command in N torchrun workers here and wait for them."""
    from edgens.distributed.launch import launch
    from edgens.errors import DistributedError

    new_run = ctx.params["resume_dir"] is None
    try:
        launch(nproc_per_node, _worker_args(ctx, run_dir if new_run else None))
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; the last finished epoch is saved: continue with `edgens train --resume {run_dir} "
                   f"--nproc-per-node {nproc_per_node}`", err=True)
        sys.exit(130)
    except DistributedError as err:
        hint = _resume_hint(run_dir, f" --nproc-per-node {nproc_per_node}")
        raise DistributedError(f"{err} (each process's own error is printed above){hint}") from err


def _resume_hint(run_dir: str | None, options: str = "") -> str:
    """How to continue a failed run, if it saved an epoch (a run refused at the start has nothing to resume)."""
    if run_dir is None or not Path(run_dir, "checkpoints", "last.pt").is_file():
        return ""
    return f"; finished epochs are saved in {run_dir}: continue with `edgens train --resume {run_dir}{options}`"


def describe_test(summary: dict) -> str:
    """One phrase with a run's test metrics (accuracy for classification, MSE otherwise)."""
    test = summary["test"]
    if summary.get("family", "categorical") == "categorical":
        return (f"test error {100 * test['ensemble_error']:.2f}% (accuracy {100 * (1 - test['ensemble_error']):.2f}%),"
                f" NLL {test['ensemble_loss']:.4f}")
    return f"test MSE {test['ensemble_error']:.4g}, NLL {test['ensemble_loss']:.4f}"


def _prefixes(text: str | None) -> tuple[int, ...] | None:
    """``--prefixes``: comma-separated member counts."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated member counts such as 16,32,64, got {text!r}",
                                 param_hint="--prefixes") from None
