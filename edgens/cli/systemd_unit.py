"""A systemd unit that runs the ``edgens serve`` command being typed (``edgens serve ... --systemd-unit``).

The unit's ExecStart is this Python (the venv's interpreter, so the unit runs the same install) with ``-m edgens
serve`` and every option the user gave that differs from its default, paths made absolute. The service stops with
SIGTERM, which ``edgens serve`` answers by draining (exit 0), so TimeoutStopSec leaves the drain its time.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from edgens.errors import ConfigError

_PLAIN = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def quote(argument: str) -> str:
    """One ExecStart argument: ``%`` doubled (systemd's specifiers), double-quoted if it holds spaces.

    Raises:
        ConfigError: a quote, backslash, ``$`` or control character, which would need systemd's escapes.
    """
    if re.search(r"[\"'\\$\x00-\x1f]", argument):
        raise ConfigError(f"cannot write {argument!r} into a systemd unit: quotes, backslashes, $ and control "
                          f"characters are not supported; rename the path")
    argument = argument.replace("%", "%%")
    return argument if _PLAIN.match(argument) else f'"{argument}"'


def _value(value: Any) -> str:
    return str(Path(value).absolute()) if isinstance(value, Path) else str(value)


def serve_arguments(ctx: click.Context, skip: tuple[str, ...] = ("systemd_unit",)) -> list[str]:
    """The ``serve`` arguments that reproduce ``ctx``: the bundle, then each option that differs from its default."""
    arguments: list[str] = []
    for param in ctx.command.params:
        if param.name in skip or param.name is None:
            continue
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            arguments.append(_value(value))
            continue
        assert isinstance(param, click.Option)
        if value is None or value == param.default:
            continue
        if param.is_flag and param.secondary_opts:  # --access-log/--no-access-log
            arguments.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            arguments.append(param.opts[0])
        else:
            arguments += [param.opts[0], _value(value)]
    return arguments


def systemd_unit(ctx: click.Context, bundle: Path, drain_timeout_s: float) -> str:
    """The unit file's text for the ``edgens serve`` command of ``ctx``."""
    command = [sys.executable, "-m", "edgens", "serve", *serve_arguments(ctx)]
    return "\n".join([
        "# Written by `edgens serve ... --systemd-unit > edgens-serve.service` (docs/jetson.md, 'Run it as a",
        "# service'). Install it with:",
        "#   sudo cp edgens-serve.service /etc/systemd/system/ && sudo systemctl daemon-reload",
        "#   sudo systemctl enable --now edgens-serve",
        "[Unit]",
        f"Description=edgens serve {bundle.absolute().name} (Open Inference Protocol)",
        "After=network-online.target nvpmodel.service",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={getpass.getuser()}",
        f"WorkingDirectory={quote(os.getcwd())}",
        "Environment=PYTHONUNBUFFERED=1",
        "# The power mode the bundle was profiled in, and pinned clocks, before the server starts ('+': as root):",
        "# ExecStartPre=+/usr/sbin/nvpmodel -m 0",
        "# ExecStartPre=+/usr/bin/jetson_clocks",
        f"ExecStart={' '.join(quote(part) for part in command)}",
        "# SIGTERM makes edgens serve refuse new requests, answer those in flight and exit 0.",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={int(drain_timeout_s) + 10}",
        "Restart=on-failure",
        "RestartSec=2",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])
