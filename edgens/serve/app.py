"""The HTTP application of ``edgens serve``: the Open Inference Protocol's endpoints on Starlette.

    GET  /v2/health/live, /v2/health/ready        liveness; readiness (200, or 400 when not ready, as KServe says)
    GET  /v2                                      server metadata
    GET  /v2/models/{name}[/versions/1]           model metadata
    GET  /v2/models/{name}[/versions/1]/ready     model readiness
    POST /v2/models/{name}[/versions/1]/infer     inference (JSON tensors or the binary tensor data extension)
    GET  /metrics                                 Prometheus metrics
    POST /edgens/retry                            give quarantined and excluded stacks another chance
    POST /edgens/faults                           make a stack faulty (only with --allow-fault-injection)

Every error is JSON, ``{"error": "one line"}``, with the status that fits (400 bad request, 401 no or wrong token,
404 unknown model or path, 413 body too large, 503 queue full, draining or no member available); a client never
sees a traceback. With a token, every endpoint but the two health checks needs ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgens import __version__
from edgens.errors import (ConfigError, InputError, NoMembersAvailableError, OverloadedError, PredictorClosedError,
                           ServiceStoppingError)
from edgens.runtime.batching import Batcher
from edgens.runtime.faults import FAULT_KINDS, Fault, FaultyRunner
from edgens.runtime.predictor import Predictor
from edgens.serve.metrics import CONTENT_TYPE, ServeMetrics, members_available
from edgens.serve.protocol import HEADER_LENGTH, VERSION, ModelInfo, ProtocolError, encode_infer, parse_infer

log = logging.getLogger("edgens.serve")
# Bodies above this are parsed in a worker thread, so that one large JSON request does not hold up the event loop.
PARSE_INLINE_BYTES = 32 * 1024
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")  # probes need no token


@dataclass
class ServeState:
    """What the application serves and how.

    Attributes:
        predictor, batcher: the runtime behind the service.
        model: the protocol's view of the bundle.
        token: the bearer token every request but the health checks must carry (None: none needed).
        max_request_bytes: the largest request body, after decompression.
        min_available: the fraction of members that must be available for the service to be ready.
        allow_fault_injection: whether ``POST /edgens/faults`` works.
        access_log: log one line per infer request.
        draining: set on SIGTERM: readiness turns false, new infer requests are refused.
    """

    predictor: Predictor
    batcher: Batcher
    model: ModelInfo
    metrics: ServeMetrics
    token: str | None = None
    max_request_bytes: int = 16 * 1024 * 1024
    min_available: float = 0.5
    allow_fault_injection: bool = False
    access_log: bool = True
    draining: bool = False
    faulty: dict[str, FaultyRunner] = field(default_factory=dict)  # stacks made faulty, by name


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps({"error": message}), status, headers=headers, media_type="application/json")


def _json(content: Any, status: int = 200) -> Response:
    return Response(json.dumps(content), status, media_type="application/json")


def create_app(state: ServeState) -> Starlette:
    """The Starlette application serving ``state``."""

    def model_or_404(request: Request) -> Response | None:
        name = request.path_params["model"]
        version = request.path_params.get("version")
        if name != state.model.name:
            return error(404, f"unknown model {name!r}; this server serves {state.model.name!r}")
        if version is not None and version != VERSION:
            return error(404, f"unknown version {version!r} of model {name}; it has version {VERSION}")
        return None

    def readiness() -> tuple[bool, dict[str, Any]]:
        health = state.predictor.health()
        fraction = members_available(state.predictor)
        ready = not state.draining and fraction >= state.min_available
        body = {"ready": ready, "degraded": fraction < 1.0, "members_available": round(fraction, 4),
                "min_available": state.min_available, "draining": state.draining,
                "unavailable": {n: f"{h.status}: {h.reason}" for n, h in health.items() if h.status != "ok"}}
        return ready, body

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        ok, body = readiness()
        return _json(body, 200 if ok else 400)

    async def server_metadata(request: Request) -> Response:
        return _json({"name": "edgens", "version": __version__, "extensions": ["binary_tensor_data", "parameters"]})

    async def model_metadata(request: Request) -> Response:
        return model_or_404(request) or _json(state.model.metadata())

    async def model_ready(request: Request) -> Response:
        missing = model_or_404(request)
        if missing is not None:
            return missing
        ok, body = readiness()
        return _json({"name": state.model.name, **body}, 200 if ok else 400)

    async def infer(request: Request) -> Response:
        arrival = time.perf_counter()
        outcome, response, prediction = "error", None, None
        try:
            missing = model_or_404(request)
            if missing is not None:
                outcome, response = "not_found", missing
                return response
            if state.draining:
                outcome, response = "stopping", error(503, "the server is draining and accepts no new requests")
                return response
            body = await _read_body(request, state.max_request_bytes)
            header_length = request.headers.get(HEADER_LENGTH)
            if len(body) > PARSE_INLINE_BYTES:
                parsed = await asyncio.to_thread(parse_infer, body, header_length, state.model)
            else:
                parsed = parse_infer(body, header_length, state.model)
            future = state.batcher.submit(parsed.x, parsed.budget, arrival)
            prediction = await asyncio.wrap_future(future)
            content, json_length = encode_infer(parsed, prediction, state.model)
            headers = {} if json_length is None else {"Inference-Header-Content-Length": str(json_length)}
            outcome = "ok"
            response = Response(content, 200, headers=headers, media_type="application/json" if json_length is None
                                else "application/octet-stream")
            state.metrics.answered(prediction, time.perf_counter() - arrival)
            return response
        except ProtocolError as err:
            outcome = {400: "bad_request", 413: "too_large"}.get(err.status, "bad_request")
            response = error(err.status, str(err))
        except (InputError, ConfigError) as err:
            outcome, response = "bad_request", error(400, str(err))
        except OverloadedError as err:
            outcome, response = "overloaded", error(503, str(err), {"Retry-After": "1"})
        except (ServiceStoppingError, PredictorClosedError) as err:
            outcome, response = "stopping", error(503, str(err))
        except NoMembersAvailableError as err:
            outcome, response = "unavailable", error(503, str(err))
        except Exception as err:  # noqa: BLE001  (the client gets one line; the log gets the traceback)
            log.exception("infer request failed")
            response = error(500, f"internal error: {type(err).__name__}: {err}")
        finally:
            if outcome != "ok":
                state.metrics.refused(outcome)
            if state.access_log:
                _log_request(request, outcome, response, prediction, arrival)
        return response

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    async def retry(request: Request) -> Response:
        back = await asyncio.to_thread(state.predictor.retry)
        return _json({"available_again": back, "unavailable": state.predictor.describe_health()})

    async def faults(request: Request) -> Response:
        if not state.allow_fault_injection:
            return error(403, "fault injection is off; start the server with --allow-fault-injection (for tests "
                              "and benchmarks only)")
        try:
            spec = json.loads(await _read_body(request, 64 * 1024))
            return _json(_apply_fault(state, spec))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return error(400, f"malformed JSON in the request: {err}")
        except (ProtocolError, ConfigError, TypeError) as err:
            return error(400, str(err))

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/metrics", metrics),
        Route("/edgens/retry", retry, methods=["POST"]),
        Route("/edgens/faults", faults, methods=["POST"]),
    ]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [Route(base, model_metadata), Route(f"{base}/ready", model_ready),
                   Route(f"{base}/infer", infer, methods=["POST"])]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error(404, f"no endpoint {request.url.path}; see GET /v2 and GET /v2/models/{state.model.name}")
        if exc.status_code == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path}")
        return error(exc.status_code, str(exc.detail))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("request %s failed", request.url.path, exc_info=exc)
        return error(500, f"internal error: {type(exc).__name__}")

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})
    if state.token is not None:
        app.add_middleware(_BearerToken, token=state.token, metrics=state.metrics)
    return app


class _BearerToken:
    """ASGI middleware: every path but the health checks needs ``Authorization: Bearer TOKEN`` (compared in
    constant time)."""

    def __init__(self, app: Any, token: str, metrics: ServeMetrics):
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = next((value for key, value in scope["headers"] if key == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        if scope["path"].endswith("/infer"):
            self.metrics.refused("unauthorized")
        reason = "no Authorization header" if not given else "the bearer token is wrong"
        response = error(401, f"unauthorized: {reason}; send Authorization: Bearer <token from --token-file>",
                         {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed (gzip or deflate, as tritonclient may send it), at most ``limit`` bytes.

    Raises:
        ProtocolError: 413 when larger; 400 for an unknown encoding or a corrupt compressed body.
    """
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ProtocolError(f"the request body of {int(length)} bytes exceeds the server's limit of {limit} bytes "
                            f"(--max-request-bytes)", 413)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; expected gzip, deflate or none")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"the request body exceeds the server's limit of {limit} bytes (--max-request-bytes)",
                                413)
        chunks.append(chunk)
    body = b"".join(chunks)
    if encoding == "identity":
        return body
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise ProtocolError(f"the {encoding} body is corrupt: {err}") from None
    if len(plain) > limit or inflater.unconsumed_tail:
        raise ProtocolError(f"the decompressed request body exceeds the server's limit of {limit} bytes "
                            f"(--max-request-bytes)", 413)
    return plain


def _apply_fault(state: ServeState, spec: Any) -> dict[str, Any]:
    """``{"stack": NAME, "kind": KIND, ...Fault fields}`` makes a stack faulty; ``{"stack": NAME, "clear": true}``
    (or ``{"clear": true}`` for all) restores it."""
    if not isinstance(spec, dict):
        raise ProtocolError(f"expected a JSON object such as {{\"stack\": NAME, \"kind\": KIND}}, got {spec!r}"[:200])
    predictor = state.predictor
    stack = spec.get("stack")
    if spec.get("clear"):
        names = [stack] if stack is not None else list(state.faulty)
        restore = {name: state.faulty.pop(name).inner for name in names if name in state.faulty}
        predictor.replace_runners(restore)
        return {"cleared": sorted(restore)}
    if stack not in predictor.runners:
        raise ProtocolError(f"unknown stack {stack!r}; loaded stacks: {', '.join(predictor.runners)}")
    fields = {key: value for key, value in spec.items() if key != "stack"}
    if fields.get("kind") not in FAULT_KINDS:
        raise ProtocolError(f"kind: expected one of {', '.join(FAULT_KINDS)}, got {fields.get('kind')!r}")
    inner = state.faulty[stack].inner if stack in state.faulty else predictor.runners[stack]
    runner = FaultyRunner(inner, Fault(**fields))
    state.faulty[stack] = runner
    predictor.replace_runners({stack: runner})
    log.warning("fault injected into stack %s: %s", stack, runner.fault)
    return {"stack": stack, "fault": fields}


def _log_request(request: Request, outcome: str, response: Response | None, prediction: Any,
                 arrival: float) -> None:
    fields: dict[str, Any] = {"event": "infer", "outcome": outcome,
                              "status": response.status_code if response is not None else 500,
                              "latency_ms": round((time.perf_counter() - arrival) * 1e3, 3),
                              "client": request.client.host if request.client else None}
    if prediction is not None:
        fields.update(examples=len(prediction.members_used), budget=prediction.budget,
                      members=int(prediction.members_used.min()), stacks=len(prediction.stacks_run),
                      failures=[f"{f.stack}:{f.kind}" for f in prediction.failures],
                      overrun_ms=round(prediction.overrun_ms, 3))
    elif response is not None and response.status_code >= 400:
        fields["error"] = json.loads(bytes(response.body)).get("error")
    log.info("infer %s", outcome, extra={"fields": fields})
