"""The process group of a member-parallel run and the few collectives it needs.

One all-reduce per training step (:meth:`Communicator.sum_across_ranks`, differentiable), and per epoch a few
object collectives: gathering members' outputs and state to rank 0 and sharing rank 0's decisions. Every collective
runs under the group's timeout: a rank that dies (its peers see the connection close) or hangs (its peers time out)
becomes a :class:`~edgens.errors.DistributedError` on the others that names the operation, the rank and how long it
waited, instead of a hang.

Backends: gloo on CPU; on a machine with CUDA, ``cpu:gloo,cuda:nccl`` so that tensors on the GPU (the per-step
all-reduce) go through NCCL while pickled objects (outputs, checkpoints) stay in host memory on gloo.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from edgens.distributed.launch import DEFAULT_TIMEOUT_S, torchrun_env
from edgens.errors import ConfigError, DistributedError, EdgensError

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the identity.

    Why not torch.distributed.nn.functional.all_reduce: its backward all-reduces the incoming gradients again,
    i.e. it differentiates the *sum over ranks* of each rank's loss. Here every rank evaluates the same replicated
    function of the reduced tensor s (the ensemble term NLL(s / M) on the same batch), so d loss / d s is already
    identical on every rank, and the gradient w.r.t. this rank's summand is exactly that: no second collective.
    (With the library's all_reduce, every rank would have to divide its loss by the world size and pay a second
    B x K all-reduce in the backward pass.) Tests check the result against the paper's gradient formula.
    """

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, comm: Communicator) -> torch.Tensor:
        total = local.clone()
        comm.sum_(total, "the all-reduce of the members' natural parameters")
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class Communicator:
    """This rank's view of the process group: rank, world size, and collectives that fail with clear errors."""

    def __init__(self, rank: int, world_size: int, local_rank: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.local_rank, self.timeout_s = rank, world_size, local_rank, timeout_s

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes the run directory."""
        return self.rank == 0

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        except RuntimeError as err:  # DistBackendError / DistNetworkError: timeouts, a peer's closed connection
            if isinstance(err, EdgensError):
                raise
            waited = time.monotonic() - started
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed after {waited:.1f} s: another rank died or "
                f"did not answer within the timeout ({self.timeout_s:g} s) [{detail}]") from err

    def sum_(self, tensor: torch.Tensor, what: str = "an all-reduce") -> None:
        """All-reduce (sum) ``tensor`` in place.

        Raises:
            DistributedError: another rank died or did not take part within the timeout.
        """
        with self._guard(what):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def sum_across_ranks(self, local: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``local`` (same shape on every rank), differentiable for a replicated loss.

        The gradient w.r.t. ``local`` is the gradient w.r.t. the sum, which is correct when every rank computes the
        same loss from the sum (see :class:`_SumAcrossRanks`).

        Raises:
            DistributedError: another rank died or did not take part within the timeout.
        """
        return _SumAcrossRanks.apply(local, self)

    def gather_to_main(self, value: _T) -> list[_T] | None:
        """Every rank's ``value`` (picklable; put tensors on the CPU first) in rank order on rank 0; None elsewhere.

        Raises:
            DistributedError: another rank died or did not take part within the timeout.
        """
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        with self._guard("gathering to rank 0"):
            dist.gather_object(value, gathered, dst=0)
        return gathered

    def gather_rows_to_main(self, tensor: torch.Tensor, rows_per_rank: list[int]) -> torch.Tensor | None:
        """Every rank's ``tensor`` (``rows_per_rank[r]`` rows, the rest of the shape equal) joined along axis 0 on
        rank 0, in rank order; None elsewhere.

        A tensor collective rather than :meth:`gather_to_main`: no pickling, and the data stays on the device
        (NCCL for CUDA tensors). Shorter pieces are padded to the longest, as collectives need equal shapes.

        Raises:
            DistributedError: another rank died or did not take part within the timeout.
        """
        longest = max(rows_per_rank)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[:len(tensor)] = tensor
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)] if self.is_main else None
        with self._guard("gathering outputs to rank 0"):
            dist.gather(padded, pieces, dst=0)
        if pieces is None:
            return None
        return torch.cat([piece[:rows] for piece, rows in zip(pieces, rows_per_rank)], 0)

    def share(self, value: _T) -> _T:
        """Rank 0's ``value`` (picklable; tensors on the CPU) on every rank; other ranks' ``value`` is ignored.

        Raises:
            DistributedError: another rank died or did not take part within the timeout.
        """
        box = [value if self.is_main else None]
        with self._guard("receiving rank 0's data" if not self.is_main else "sending data to the other ranks"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def run_on_main(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on rank 0 and return its result on every rank; an EdgensError it raises is raised on every rank.

        Why: rank 0 alone touches the run directory; if it refuses (e.g. the directory already holds a run), every
        rank must stop with the same message rather than wait for rank 0 until the timeout.

        Raises:
            EdgensError: what ``fn`` raised on rank 0.
            DistributedError: another rank died or did not take part within the timeout.
        """
        outcome: tuple[str, Any] | None = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except EdgensError as err:
                outcome = ("error", err)
        kind, value = self.share(outcome)  # type: ignore[misc]
        if kind == "error":
            raise value
        return value


def backend_for_machine() -> str:
    """gloo, plus NCCL for CUDA tensors where this machine has CUDA."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Communicator]:
    """Join the torchrun job this process belongs to (``env://``) for the duration of the block.

    Raises:
        DistributedError: not started by torchrun (no RANK / WORLD_SIZE), or the other ranks did not join within
            ``timeout_s``.
        ConfigError: ``timeout_s`` is not positive.
    """
    if not timeout_s > 0:
        raise ConfigError(f"the distributed timeout must be > 0 seconds, got {timeout_s}")
    info = torchrun_env()
    if info is None:
        raise DistributedError("this process was not started by torchrun (RANK and WORLD_SIZE are not set); use "
                               "`torchrun --nproc-per-node N -m edgens train ...` or `edgens train --nproc-per-node N`")
    if dist.is_initialized():
        raise DistributedError("a torch.distributed process group is already initialised in this process")
    # torch._dynamo (which the first optimiser imports) keeps references to what it finds in torch.distributed when
    # it is imported; imported while a group exists, it keeps the group's gloo threads alive past
    # destroy_process_group, and their teardown at interpreter exit aborts a rank now and then ("terminate called
    # without an active exception", about one run in four). Imported first, it holds no group.
    import torch._dynamo  # noqa: F401

    comm = Communicator(info.rank, info.world_size, info.local_rank, timeout_s)
    backend = backend_for_machine()
    with comm._guard(f"joining the process group ({backend})"):
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                                timeout=timedelta(seconds=timeout_s))
    log.info("rank %d of %d joined (%s, timeout %g s)", info.rank, info.world_size, backend, timeout_s)
    try:
        yield comm
    finally:
        dist.destroy_process_group()


def use_rank_device(name: str, local_rank: int) -> torch.device:
    """Select and return this rank's device: the CPU, or for ``auto`` / ``cuda`` the GPU numbered LOCAL_RANK.

    Raises:
        ConfigError: ``cuda`` without a GPU, an explicit ``cuda:N`` (each rank takes its own GPU), or fewer GPUs
            on this node than ranks.
    """
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name.startswith("cuda:"):
        raise ConfigError(f"device {name!r}: in a distributed run each rank uses the GPU numbered by its LOCAL_RANK; "
                          f"use --device cuda or auto")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested, but torch {torch.__version__} sees no CUDA GPU; use --device "
                          f"cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this node has "
                          f"{torch.cuda.device_count()}; start at most {torch.cuda.device_count()} processes per node")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)  # NCCL uses the current device
    return device
