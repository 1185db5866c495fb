"""The service behind ``edgens serve``, without a transport: health and readiness, metadata, inference, stack
administration (retry, fault injection) and the one table that maps an error to its status.

A transport (the HTTP application, :mod:`edgens.serve.app`) reads bytes and writes them; everything between is here,
so it is tested without a server. Every refusal goes through :meth:`InferenceService.refusal`, which looks the error
up in :data:`ERROR_STATUS` (a client never sees a traceback: anything not in the table is a 500 with one line, and
its traceback goes to the log) and counts it in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from edgens import __version__
from edgens.errors import (ConfigError, InputError, NoMembersAvailableError, OverloadedError, PredictorClosedError,
                           ServiceStoppingError)
from edgens.runtime.batching import Batcher
from edgens.runtime.faults import FAULT_KINDS, Fault, FaultyRunner
from edgens.runtime.policies import Budget
from edgens.runtime.prediction import Prediction
from edgens.runtime.predictor import Predictor
from edgens.serve.metrics import ServeMetrics
from edgens.serve.protocol import VERSION, InferRequest, ModelInfo, ProtocolError, encode_infer, parse_infer
from edgens.serve.shared_memory import SharedMemoryRegions
from edgens.serve.statistics import ModelStatistics

log = logging.getLogger("edgens.serve")

# Bodies above this are parsed in a worker thread, so that one large JSON request does not hold up the event loop.
PARSE_INLINE_BYTES = 32 * 1024
EXTENSIONS = ["binary_tensor_data", "parameters", "model_configuration", "statistics",  # the extensions served
              "system_shared_memory"]

# What each error means for the client, first match wins: (error class, status, outcome in the metrics). A
# ProtocolError carries its own status (400 malformed, 403 forbidden, 404 unknown, 413 too large).
ERROR_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (ProtocolError, 400, "bad_request"),
    (InputError, 400, "bad_request"),
    (ConfigError, 400, "bad_request"),
    (OverloadedError, 503, "overloaded"),
    (ServiceStoppingError, 503, "stopping"),
    (PredictorClosedError, 503, "stopping"),
    (NoMembersAvailableError, 503, "unavailable"),
)
PROTOCOL_OUTCOMES = {400: "bad_request", 403: "forbidden", 404: "not_found", 413: "too_large"}
RETRY_AFTER_S = 1  # what an overloaded service asks a client to wait
# The fewest requests a service with a default deadline admits at once, however slowly it answered lately: 16
# closed-loop clients (the load issue 26 measures) are never refused for being too many.
MIN_IN_SERVICE = 16


class RateMeter:
    """Events per second over the last whole window of ``window_s`` seconds (None before one has passed, or when
    none came for two windows). Only the event loop's thread ticks and reads it."""

    def __init__(self, window_s: float = 1.0):
        self.window_s = window_s
        self._start: float | None = None
        self._count = 0
        self._rate: float | None = None

    def tick(self, now: float) -> None:
        if self._start is None:
            self._start = now
        elif now - self._start >= self.window_s:
            self._rate = self._count / (now - self._start) if now - self._start < 2 * self.window_s else None
            self._start, self._count = now, 0
        self._count += 1

    def rate(self) -> float | None:
        if self._start is None or time.perf_counter() - self._start >= 2 * self.window_s:
            return None  # nothing lately: the last rate says nothing about now
        return self._rate


@dataclass(frozen=True)
class Refusal:
    """How a request was refused: the status, the outcome counted in the metrics, a one-line message, and headers
    (``Retry-After`` when overloaded)."""

    status: int
    outcome: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    """An answered infer request: the response body, the length of its JSON part when binary outputs follow (the
    ``Inference-Header-Content-Length`` header), and the prediction."""

    content: bytes
    json_length: int | None
    prediction: Prediction


def refusal_for(err: BaseException) -> Refusal:
    """The refusal of a request that raised ``err`` (:data:`ERROR_STATUS`; anything else is a 500)."""
    if isinstance(err, ProtocolError):
        return Refusal(err.status, PROTOCOL_OUTCOMES.get(err.status, "bad_request"), str(err))
    for cls, status, outcome in ERROR_STATUS:
        if isinstance(err, cls):
            headers = {"Retry-After": str(RETRY_AFTER_S)} if outcome == "overloaded" else {}
            return Refusal(status, outcome, str(err), headers)
    return Refusal(500, "error", f"internal error: {type(err).__name__}: {err}")


def log_infer(prediction: Prediction | None, refusal: Refusal | None, arrival: float, client: str | None,
              transport: str) -> None:
    """The access log's line of one infer request (either transport): outcome, status, latency, and what the
    prediction used, or the error."""
    outcome = "ok" if prediction is not None else refusal.outcome if refusal is not None else "error"
    fields: dict[str, Any] = {"event": "infer", "transport": transport, "outcome": outcome,
                              "status": 200 if prediction is not None else refusal.status if refusal is not None
                              else 500,
                              "latency_ms": round((time.perf_counter() - arrival) * 1e3, 3), "client": client}
    if prediction is not None:
        fields.update(examples=len(prediction.members_used), budget=prediction.budget,
                      members=int(prediction.members_used.min()), stacks=len(prediction.stacks_run),
                      failures=[f"{f.stack}:{f.kind}" for f in prediction.failures],
                      overrun_ms=round(prediction.overrun_ms, 3))
    elif refusal is not None:
        fields["error"] = refusal.message
    log.info("infer %s", outcome, extra={"fields": fields})


class InferenceService:
    """One bundle served: what the protocol's endpoints answer, whatever carries them.

    Args:
        predictor, batcher: the runtime behind the service.
        model: the protocol's view of the bundle.
        metrics: the service's metrics.
        min_available: the fraction of members that must be available for the service to be ready.
        allow_fault_injection: whether :meth:`apply_fault` works.
        default_budget: the budget of requests that give none (``edgens serve --default-deadline-ms``, as Triton's
            ``default_timeout``); None: all members.

    Attributes:
        draining: set on SIGTERM: readiness turns false, new infer requests are refused.
        statistics: Triton's statistics of the model (counted here and by the batcher's merged calls).
        shared_memory: the registered system shared-memory regions (closed by :meth:`close`).
    """

    def __init__(self, predictor: Predictor, batcher: Batcher, model: ModelInfo, metrics: ServeMetrics,
                 min_available: float = 0.5, allow_fault_injection: bool = False,
                 default_budget: Budget | None = None):
        self.predictor, self.batcher, self.model, self.metrics = predictor, batcher, model, metrics
        self.min_available = min_available
        self.allow_fault_injection = allow_fault_injection
        self.default_budget = default_budget if default_budget is not None else Budget.parse()
        self.statistics = ModelStatistics(model.name, VERSION)
        self.shared_memory = SharedMemoryRegions()
        self.draining = False
        self.in_service = 0  # infer requests admitted and not yet answered or refused (both transports)
        self._answers = RateMeter()
        self._faulty: dict[str, FaultyRunner] = {}  # stacks made faulty, by name

        def merged_call(examples: int, requests: int) -> None:
            metrics.merged_call(examples, requests)
            self.statistics.executed(examples, requests)

        batcher.on_batch = merged_call

    # ------------------------------------------------------------------------------------------ health, metadata

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the service is ready (not draining, enough members available), and the readiness body."""
        pool = self.predictor.pool
        fraction = pool.members_available()
        ready = not self.draining and fraction >= self.min_available
        return ready, {"ready": ready, "degraded": fraction < 1.0, "members_available": round(fraction, 4),
                       "min_available": self.min_available, "draining": self.draining,
                       "unavailable": {n: f"{h.status}: {h.reason}" for n, h in pool.health().items()
                                       if h.status != "ok"}}

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "edgens", "version": __version__, "extensions": EXTENSIONS}

    def check_model(self, name: str, version: str | None = None) -> None:
        """Raise unless this service serves model ``name`` (at ``version``, if given).

        Raises:
            ProtocolError: 404, naming the model (and version) it serves.
        """
        if name != self.model.name:
            raise ProtocolError(f"unknown model {name!r}; this server serves {self.model.name!r}", 404)
        if version is not None and version != VERSION:
            raise ProtocolError(f"unknown version {version!r} of model {name}; it has version {VERSION}", 404)

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        self.check_model(name, version)
        return self.model.metadata()

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The model configuration extension's answer (Triton's JSON form of its ``ModelConfig``)."""
        self.check_model(name, version)
        return self.model.config(self.batcher.max_batch, self.batcher.max_queue, self.default_budget)

    def model_statistics(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """The statistics extension's answer: ``{"model_stats": [...]}`` for this model (``name`` None: every
        model, which is this one)."""
        if name:
            self.check_model(name, version or None)
        return {"model_stats": [self.statistics.to_dict()]}

    def model_readiness(self, name: str, version: str | None = None) -> tuple[bool, dict[str, Any]]:
        self.check_model(name, version)
        ready, body = self.readiness()
        return ready, {"name": self.model.name, **body}

    # -------------------------------------------------------------------------------------------------- infer

    @contextmanager
    def admission(self, name: str, version: str | None = None) -> Iterator[None]:
        """Admit an infer request before its body is read (:meth:`admit`); it is in service until the block ends.

        Raises:
            ProtocolError, ServiceStoppingError, OverloadedError: as :meth:`admit`.
        """
        self.admit(name, version)
        self.in_service += 1
        try:
            yield
        finally:
            self.in_service -= 1

    def admit(self, name: str, version: str | None = None) -> None:
        """Raise what refuses an infer request before its body is read: an unknown model, a draining service, a
        full queue, or as many requests in service as :meth:`service_limit` allows.

        Raises:
            ProtocolError: 404, an unknown model or version.
            ServiceStoppingError: the service is draining.
            OverloadedError: the queue is full, or the service holds as many requests as it may.
        """
        self.check_model(name, version)
        if self.draining:
            raise ServiceStoppingError("the server is draining and accepts no new requests")
        self.batcher.check_room()
        limit, reason = self._limit()
        if self.in_service >= limit:
            raise OverloadedError(f"{self.in_service} requests are in service, the most this server takes now "
                                  f"({limit}: {reason}); try again later")

    def service_limit(self) -> int:
        """How many infer requests may be in service at once (admitted, not yet answered): with a default deadline,
        what the server answers in twice that deadline at the rate it answered lately (Little's law: then an
        admitted request waits about twice the deadline at most), at least :data:`MIN_IN_SERVICE`; otherwise, or
        before a rate is known, ``max_queue + max_batch``."""
        return self._limit()[0]

    def _limit(self) -> tuple[int, str]:
        """:meth:`service_limit` and what it comes from, in words (for the refusal's message)."""
        rate = self._answers.rate()
        if self.default_budget.kind != "deadline_ms" or rate is None:
            return self.batcher.max_queue + self.batcher.max_batch, "max_queue + max_batch"
        deadline_ms = self.default_budget.value
        return (max(MIN_IN_SERVICE, int(rate * 2 * deadline_ms / 1e3)),
                f"{rate:.0f} answers/s over twice the default deadline of {deadline_ms:g} ms")

    async def infer(self, body: bytes, header_length: str | None, arrival: float) -> Answer:
        """Parse an HTTP infer request's body, answer it (:meth:`answer`) and encode the response.

        Raises:
            ProtocolError, InputError, ConfigError: a bad request.
            OverloadedError, ServiceStoppingError, NoMembersAvailableError: the service cannot answer it now.
        """
        if len(body) > PARSE_INLINE_BYTES:
            parsed = await asyncio.to_thread(parse_infer, body, header_length, self.model, self.shared_memory)
        else:
            parsed = parse_infer(body, header_length, self.model, self.shared_memory)
        try:
            parsed_at = time.perf_counter()
            prediction = await self.answer(parsed, arrival)
            answered_at = time.perf_counter()
            content, json_length = encode_infer(parsed, prediction, self.model, self.shared_memory)
        finally:
            parsed.release(self.shared_memory)
        self.count_answer(prediction, arrival, parsed_at, answered_at)
        return Answer(content, json_length, prediction)

    async def answer(self, parsed: InferRequest, arrival: float) -> Prediction:
        """Queue a parsed request (its budget, or the server's default) and wait for its prediction; its deadline
        counts from ``arrival``, a ``time.perf_counter()`` taken when the transport first saw the request.

        Raises:
            OverloadedError, ServiceStoppingError, NoMembersAvailableError: the service cannot answer it now.
        """
        budget = parsed.budget if parsed.budget is not None else self.default_budget
        future = self.batcher.submit(parsed.x, budget, arrival)
        return await asyncio.wrap_future(future)

    def count_answer(self, prediction: Prediction, arrival: float, parsed_at: float, answered_at: float) -> None:
        """Count an answered request in the metrics and the statistics, once its response is encoded."""
        done = time.perf_counter()
        self._answers.tick(done)
        self.metrics.answered(prediction, done - arrival)
        queued = prediction.queued_ms / 1e3 if prediction.queued_ms is not None else 0.0
        queue_s = max(0.0, queued - (parsed_at - arrival))
        self.statistics.answered(len(prediction.members_used), parsed_at - arrival, queue_s,
                                 max(0.0, answered_at - parsed_at - queue_s), done - answered_at)

    def refusal(self, err: BaseException, infer: bool = True) -> Refusal:
        """The refusal of a request that raised ``err`` (counted in the metrics when it was an infer request); an
        unexpected error is logged with its traceback."""
        refusal = refusal_for(err)
        if refusal.status == 500:
            log.error("request failed", exc_info=err)
        if infer:
            self.metrics.refused(refusal.outcome)
        return refusal

    def refuse_infer(self, err: BaseException, arrival: float) -> Refusal:
        """The refusal of an infer request, counted in the metrics and in the statistics' failures."""
        self.statistics.failed(time.perf_counter() - arrival)
        return self.refusal(err)

    # -------------------------------------------------------------------------------------- system shared memory

    def shared_memory_status(self, name: str | None = None) -> list[dict[str, Any]]:
        """The registered regions (Triton's status form), or the one named."""
        return self.shared_memory.status(name)

    def register_shared_memory(self, name: str, spec: Any) -> None:
        """Register region ``name`` from ``{"key": ..., "offset": ..., "byte_size": ...}``.

        Raises:
            ProtocolError: a malformed spec, a bad key or bound, a name in use.
        """
        if not isinstance(spec, dict):
            raise ProtocolError(f"expected a JSON object with key, offset and byte_size, got {type(spec).__name__}")
        unknown = sorted(set(spec) - {"key", "offset", "byte_size"})
        if unknown:
            raise ProtocolError(f"unknown field(s) {', '.join(map(repr, unknown))}; expected key, offset, byte_size")
        self.shared_memory.register(name, spec.get("key"), spec.get("offset", 0), spec.get("byte_size"))
        log.info("shared memory registered", extra={"fields": {"event": "shm_register", "region": name,
                                                               "key": spec.get("key")}})

    def unregister_shared_memory(self, name: str | None = None) -> list[str]:
        """Unregister region ``name`` (None: all); regions in use are closed once their requests end."""
        return self.shared_memory.unregister(name)

    def cuda_shared_memory(self, action: str, name: str | None = None) -> list[dict[str, Any]]:
        """Triton's CUDA shared-memory extension, which edgens does not implement (it is not among its extensions):
        status lists no region and unregistering all succeeds (clients such as perf_analyzer clean up both kinds),
        a named region is unknown, and registering is refused with what to use instead.

        Raises:
            ProtocolError: 404 for a named region, 400 for registering.
        """
        if action == "register":
            raise ProtocolError("CUDA shared memory is not supported by edgens serve; use system shared memory "
                                "(/v2/systemsharedmemory, tritonclient.utils.shared_memory)")
        if name:
            raise ProtocolError(f"no CUDA shared-memory region {name!r} is registered", 404)
        return []

    def close(self) -> None:
        """Release what the service holds beyond the predictor and batcher: the shared-memory regions."""
        self.shared_memory.close()

    # ------------------------------------------------------------------------------------------- administration

    async def retry(self) -> dict[str, Any]:
        """Give quarantined and excluded stacks another chance (in a worker thread: it may reload files)."""
        back = await asyncio.to_thread(self.predictor.retry)
        return {"available_again": back, "unavailable": self.predictor.describe_health()}

    def check_fault_injection(self) -> None:
        """Raise unless fault injection is on.

        Raises:
            ProtocolError: 403, naming the option that turns it on.
        """
        if not self.allow_fault_injection:
            raise ProtocolError("fault injection is off; start the server with --allow-fault-injection (for tests and "
                                "benchmarks only)", 403)

    def apply_fault(self, spec: Any) -> dict[str, Any]:
        """``{"stack": NAME, "kind": KIND, ...Fault fields}`` makes a stack faulty; ``{"stack": NAME, "clear":
        true}`` (or ``{"clear": true}`` for all) restores it.

        Raises:
            ProtocolError: 403 while fault injection is off; 400 for a malformed spec or an unknown stack or kind.
            ConfigError: a fault field out of range.
        """
        self.check_fault_injection()
        if not isinstance(spec, dict):
            example = '{"stack": NAME, "kind": KIND}'
            raise ProtocolError(f"expected a JSON object such as {example}, got {spec!r}"[:200])
        predictor = self.predictor
        stack = spec.get("stack")
        if spec.get("clear"):
            names = [stack] if stack is not None else list(self._faulty)
            cleared = {name: self._faulty.pop(name) for name in names if name in self._faulty}
            for runner in cleared.values():
                runner.release()  # a held stack answers now
            restore = {name: runner.inner for name, runner in cleared.items()}
            predictor.replace_runners(restore)
            return {"cleared": sorted(restore)}
        if stack not in predictor.runners:
            raise ProtocolError(f"unknown stack {stack!r}; loaded stacks: {', '.join(predictor.runners)}")
        fields = {key: value for key, value in spec.items() if key != "stack"}
        if fields.get("kind") not in FAULT_KINDS:
            raise ProtocolError(f"kind: expected one of {', '.join(FAULT_KINDS)}, got {fields.get('kind')!r}")
        inner = self._faulty[stack].inner if stack in self._faulty else predictor.runners[stack]
        try:
            runner = FaultyRunner(inner, Fault(**fields))
        except TypeError as err:  # a field Fault does not have
            raise ProtocolError(str(err)) from None
        self._faulty[stack] = runner
        predictor.replace_runners({stack: runner})
        log.warning("fault injected into stack %s: %s", stack, runner.fault)
        return {"stack": stack, "fault": fields}
