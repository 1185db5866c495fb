"""The ``edgens`` command line.

One module per command (group); each imports only click and the standard library at the top and does its heavy
imports (torch, onnxruntime) inside the command, so ``edgens --help`` stays fast and torch-free. Errors the user
caused (:class:`edgens.errors.EdgensError`) are printed as one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from edgens import __version__
from edgens.errors import EdgensError
from edgens.interrupts import sticky_interrupts

# name -> "module:attribute"; loaded only when the command runs or help lists it.
COMMANDS = {
    "train": "edgens.cli.train_cmd:train",
    "inspect": "edgens.cli.inspect_cmd:inspect",
    "export": "edgens.cli.export_cmd:export",
    "infer": "edgens.cli.infer_cmd:infer",
    "profile": "edgens.cli.profile_cmd:profile",
    "bench": "edgens.cli.bench_cmd:bench",
    "serve": "edgens.cli.serve_cmd:serve",
    "doctor": "edgens.cli.doctor_cmd:doctor",
}


# Packages some commands need that the device install (`edgens[runtime]`: numpy, click, tqdm, onnxruntime) does not
# hold, and the extra that installs each.
OPTIONAL_PACKAGES = {
    "torch": "train", "onnx": "train", "onnxscript": "train", "onnxruntime": "runtime", "matplotlib": "plots",
    "tensorrt": "tensorrt", "cuda": "tensorrt",
    "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve", "anyio": "serve",
}


class UserError(click.ClickException):
    """An :class:`EdgensError` shown to the user: one line, exit status 2."""

    exit_code = 2


def missing_package_error(command: str, err: ModuleNotFoundError) -> UserError | None:
    """The one-line error for a command that needs an optional package this install lacks (None for any other
    missing module: that is a bug, and its traceback is worth seeing)."""
    package = (err.name or "").split(".")[0]
    extra = OPTIONAL_PACKAGES.get(package)
    if extra is None:
        return None
    hint = " (on a CPU-only machine install a CPU build of torch first; see the README)" if package == "torch" else ""
    install = f"pip install 'edgens[{extra}]'{hint}"
    if extra in ("tensorrt", "runtime"):
        from edgens.runtime.device_info import JETSON_ONNXRUNTIME_INSTALL, on_jetson

        if on_jetson():  # never from pip's extras there (docs/jetson.md)
            install = (JETSON_ONNXRUNTIME_INSTALL if extra == "runtime" else
                       "sudo apt-get install python3-libnvinfer (JetPack's package), in a venv made with "
                       "python3 -m venv --system-site-packages")
    return UserError(f"`edgens {command}` needs {package}, which this installation does not have; install it with "
                     f"{install}")


class _LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        try:
            with sticky_interrupts():
                return super().invoke(ctx)
        except KeyboardInterrupt:
            # Ctrl-C: one line and the shell's status for SIGINT (128 + 2), not click's "Aborted!" and 1. (train
            # catches it itself, to say how to resume.)
            click.echo("Error: interrupted", err=True)
            ctx.exit(130)
        except EdgensError as err:
            raise UserError(str(err)) from err
        except ModuleNotFoundError as err:
            friendly = missing_package_error(ctx.invoked_subcommand or "", err)
            if friendly is None:
                raise
            raise friendly from err


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgens")
@click.option("-v", "--verbose", count=True, help="More log output (-v: info, -vv: debug).")
def cli(verbose: int) -> None:
    """Anytime, fault-tolerant ensembles for edge devices.

    \b
    Typical use:
      edgens train --preset mlp-256x4 --lam 0.99 --out runs/default
      edgens export runs/default -o bundle
      edgens infer bundle --input fashion-mnist:test --deadline-ms 5
      edgens bench drop runs/default        # accuracy vs members dropped (also: lambda, specialists, dominance)
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``edgens`` script."""
    cli.main(args=argv, prog_name="edgens")
