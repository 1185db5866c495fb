"""Recognising torchrun workers and starting them (standard library only at import time: the CLI uses it).

torchrun starts every worker with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment;
:func:`torchrun_env` reads them. :func:`launch` is what ``edgens train --nproc-per-node N`` runs: torchrun's own
launcher (``torch.distributed.run``, standalone rendezvous on this machine, no restarts) with
``python -m edgens ...`` as the worker, so it behaves exactly like ``torchrun --nproc-per-node N -m edgens ...``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgens.errors import ConfigError, DistributedError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
"""How long a rank waits in a collective (or to join) before it fails: longer than any pause the others make on
purpose (rank 0 writing a checkpoint, every rank loading data), short enough that a dead or stuck rank is noticed."""


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_env(environ: Mapping[str, str] | None = None) -> WorldInfo | None:
    """This process's rank and world size when torchrun started it (RANK and WORLD_SIZE are set), else None.

    Raises:
        DistributedError: the variables are set but malformed (not integers, or RANK outside [0, WORLD_SIZE)).
    """
    environ = os.environ if environ is None else environ
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return None
    raw = {name: environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    try:
        rank, world_size = int(raw["RANK"] or ""), int(raw["WORLD_SIZE"] or "")
        local_rank = int(raw["LOCAL_RANK"]) if raw["LOCAL_RANK"] is not None else rank
    except ValueError:
        raise DistributedError(f"torchrun environment variables must be integers, got {raw}") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DistributedError(f"expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, got {raw}")
    return WorldInfo(rank, world_size, local_rank)


def torchrun_args(nproc_per_node: int, argv: Sequence[str]) -> list[str]:
    """torchrun's command-line arguments that run ``python -m edgens ARGV`` in ``nproc_per_node`` workers here."""
    return ["--standalone", "--nproc-per-node", str(nproc_per_node), "--max-restarts", "0", "-m", "edgens",
            *argv]


def describe_failures(failures: Mapping[int, object]) -> str:
    """One phrase per failed rank (torchrun's ProcessFailure records), the first to fail first."""
    def when(item: tuple[int, object]) -> float:
        return float(getattr(item[1], "timestamp", 0))

    phrases = []
    for rank, failure in sorted(failures.items(), key=when):
        code, pid = getattr(failure, "exitcode", None), getattr(failure, "pid", "?")
        if isinstance(code, int) and code < 0:
            signal_name = failure.signal_name()  # type: ignore[attr-defined]
            phrases.append(f"rank {rank} (pid {pid}) was killed by {signal_name}")
        else:
            phrases.append(f"rank {rank} (pid {pid}) exited with status {code}")
    return "; ".join(phrases)


def launch(nproc_per_node: int, argv: Sequence[str]) -> None:
    """Run ``python -m edgens ARGV`` in ``nproc_per_node`` torchrun workers on this machine; wait for all of them.

    When one worker fails, torchrun stops the others and this raises. Each worker's own error message is on
    stderr above. OMP_NUM_THREADS, unless set, becomes cores / workers (torchrun alone would make it 1).

    Raises:
        ConfigError: ``nproc_per_node`` < 1, or this process is itself a torchrun worker.
        DistributedError: a worker failed; the message names each failed rank and its exit status or signal.
        KeyboardInterrupt: the launcher was interrupted (torchrun has stopped the workers).
    """
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    if torchrun_env() is not None:
        raise ConfigError("--nproc-per-node starts torchrun, but this process already is a torchrun worker "
                          f"(RANK={os.environ.get('RANK')}); drop --nproc-per-node")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    previous = os.environ.get("OMP_NUM_THREADS")
    if previous is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc_per_node))
    log.info("starting %d workers with torchrun (OMP_NUM_THREADS=%s)", nproc_per_node, os.environ["OMP_NUM_THREADS"])
    try:
        run(parse_args(torchrun_args(nproc_per_node, argv)))
    except ChildFailedError as err:
        raise DistributedError(f"distributed training failed: {describe_failures(err.failures)}") from None
    except SignalException as err:
        raise KeyboardInterrupt(str(err)) from None
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
