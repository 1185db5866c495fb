"""The HTTP application of ``edgens serve``: the Open Inference Protocol's endpoints on Starlette, as thin routes over
the transport-free :class:`~edgens.serve.service.InferenceService`, and the bearer-token middleware.

    GET  /v2/health/live, /v2/health/ready        liveness; readiness (200, or 400 when not ready, as KServe says)
    GET  /v2                                      server metadata
    GET  /v2/models/{name}[/versions/1]           model metadata
    GET  /v2/models/{name}[/versions/1]/ready     model readiness
    GET  /v2/models/{name}[/versions/1]/config    model configuration (Triton's extension and JSON form)
    GET  /v2/models[/{name}[/versions/1]]/stats   statistics (Triton's extension and JSON form)
    POST /v2/models/{name}[/versions/1]/infer     inference (JSON tensors, binary tensor data, shared memory)
    GET  /v2/systemsharedmemory[/region/{r}]/status          registered regions (Triton's extension)
    POST /v2/systemsharedmemory/region/{r}/register         register a /dev/shm region {key, offset, byte_size}
    POST /v2/systemsharedmemory[/region/{r}]/unregister     unregister it (or all)
    /v2/cudasharedmemory/...                                 none registered; registering refused (not supported)
    GET  /metrics                                 Prometheus metrics
    POST /edgens/retry                            give quarantined and excluded stacks another chance
    POST /edgens/faults                           make a stack faulty (only with --allow-fault-injection)

Every error is JSON, ``{"error": "one line"}``, with the status that fits (400 bad request, 401 no or wrong token,
404 unknown model or path, 413 body too large, 503 queue full or too many requests in service (both decided before
the body is read), draining or no member available); a client never sees a traceback. With a token, every
endpoint but the two health checks needs ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edgens.errors import ConfigError, OverloadedError, ServiceStoppingError
from edgens.serve.metrics import CONTENT_TYPE, ServeMetrics
from edgens.serve.protocol import HEADER_LENGTH, ProtocolError
from edgens.serve.service import InferenceService, Refusal, log_infer

log = logging.getLogger("edgens.serve")
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")  # probes need no token
FAULT_SPEC_BYTES = 64 * 1024  # also the largest shared-memory registration body
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
# The scope key under which the server's HTTP protocol puts the time.perf_counter() of a request's first byte.
ARRIVAL = "edgens.arrival"
SOCKET = "edgens.socket"  # and the connection's socket (to send a response's head and body in one segment)
CORK = getattr(socket, "TCP_CORK", None)  # Linux


@dataclass
class ServeState:
    """What the application serves and how.

    Attributes:
        service: the service without HTTP (predictor, batcher, metrics, readiness, draining).
        token: the bearer token every request but the health checks must carry (None: none needed).
        max_request_bytes: the largest request body, after decompression.
        access_log: log one line per infer request.
    """

    service: InferenceService
    token: str | None = None
    max_request_bytes: int = 16 * 1024 * 1024
    access_log: bool = True


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps({"error": message}), status, headers=headers, media_type="application/json")


def _json(content: Any, status: int = 200) -> Response:
    return Response(json.dumps(content), status, media_type="application/json")


def _refused(refusal: Refusal) -> Response:
    return error(refusal.status, refusal.message, refusal.headers)


def early_refusal(state: ServeState) -> Callable[[str, str, list[tuple[bytes, bytes]], float, Any],
                                                  tuple[bytes, bytes] | None]:
    """What the HTTP protocol answers an infer request with as soon as its headers are parsed, without starting the
    application: ``refuse(method, path, headers, arrival, client)`` returns the 503 response's head (its lines, each
    ending in CRLF, without the blank line) and body when the service refuses the request now (draining, a full
    queue, as many requests in service as it takes), else None: the application takes it (a missing or wrong token
    and an unknown model included, whose answers are its own). Under overload refusals are most of the requests, so
    each one costs what deciding costs: no task, no ASGI messages, no reading of the body (the protocol drops it)."""
    service = state.service
    expected = None if state.token is None else f"Bearer {state.token}".encode()

    def refuse(method: str, path: str, headers: list[tuple[bytes, bytes]], arrival: float,
               client: Any) -> tuple[bytes, bytes] | None:
        if method != "POST":
            return None
        route = INFER_PATH.fullmatch(path)
        if route is None:
            return None
        if expected is not None and not hmac.compare_digest(
                next((value for key, value in headers if key == b"authorization"), b""), expected):
            return None
        try:
            service.admit(route[1], route[2])
            return None  # admitted: the application serves it (and admits it again, as it reads the body)
        except (OverloadedError, ServiceStoppingError) as err:
            refusal = service.refuse_infer(err, arrival)
        except ProtocolError:  # an unknown model: the application's 404
            return None
        if state.access_log:
            log_infer(None, refusal, arrival, client[0] if client else None, "http")
        content = orjson.dumps({"error": refusal.message})
        head = [b"HTTP/1.1 %d %s" % (refusal.status, HTTPStatus(refusal.status).phrase.encode()),
                b"content-type: application/json",
                b"content-length: %d" % len(content),
                *(b"%s: %s" % (key.lower().encode(), value.encode()) for key, value in refusal.headers.items())]
        return b"\r\n".join(head) + b"\r\n", content

    return refuse


def create_app(state: ServeState) -> ASGIApp:
    """The ASGI application serving ``state``: thin routes over its :class:`InferenceService` (infer on a path of
    its own, the rest on Starlette)."""
    service = state.service

    def model_of(request: Request) -> tuple[str, str | None]:
        return request.path_params["model"], request.path_params.get("version")

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        ok, body = service.readiness()
        return _json(body, 200 if ok else 400)

    async def server_metadata(request: Request) -> Response:
        return _json(service.server_metadata())

    def answer(call: Callable[[], Any]) -> Response:
        """``call()``'s answer as JSON, or the refusal of the ProtocolError it raised (not an infer request)."""
        try:
            return _json(call())
        except ProtocolError as err:
            return _refused(service.refusal(err, infer=False))

    async def model_metadata(request: Request) -> Response:
        return answer(lambda: service.model_metadata(*model_of(request)))

    async def model_config(request: Request) -> Response:
        return answer(lambda: service.model_config(*model_of(request)))

    async def model_stats(request: Request) -> Response:
        return answer(lambda: service.model_statistics(request.path_params.get("model"),
                                                       request.path_params.get("version")))

    async def model_ready(request: Request) -> Response:
        try:
            ok, body = service.model_readiness(*model_of(request))
        except ProtocolError as err:
            return _refused(service.refusal(err, infer=False))
        return _json(body, 200 if ok else 400)

    async def shm_status(request: Request) -> Response:
        return answer(lambda: service.shared_memory_status(request.path_params.get("region")))

    async def shm_register(request: Request) -> Response:
        try:
            service.register_shared_memory(request.path_params["region"], await _read_json(request, FAULT_SPEC_BYTES))
        except ProtocolError as err:
            return _refused(service.refusal(err, infer=False))
        return _json({})

    async def shm_unregister(request: Request) -> Response:
        try:
            service.unregister_shared_memory(request.path_params.get("region"))
        except ProtocolError as err:
            return _refused(service.refusal(err, infer=False))
        return _json({})

    async def cuda_shm(request: Request) -> Response:  # not implemented: see InferenceService.cuda_shared_memory
        action = request.url.path.rsplit("/", 1)[-1]
        try:
            regions = service.cuda_shared_memory(action, request.path_params.get("region"))
        except ProtocolError as err:
            return _refused(service.refusal(err, infer=False))
        return _json(regions if action == "status" else {})

    async def infer_not_post(request: Request) -> Response:
        return error(405, f"{request.method} is not allowed on {request.url.path}; infer requests are POST")

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)

    async def retry(request: Request) -> Response:
        return _json(await service.retry())

    async def faults(request: Request) -> Response:
        try:
            service.check_fault_injection()  # before the body is read
            return _json(service.apply_fault(await _read_json(request, FAULT_SPEC_BYTES)))
        except (ProtocolError, ConfigError) as err:
            return _refused(service.refusal(err, infer=False))

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/v2/models/stats", model_stats),
        Route("/v2/systemsharedmemory/status", shm_status),
        Route("/v2/systemsharedmemory/region/{region}/status", shm_status),
        Route("/v2/systemsharedmemory/region/{region}/register", shm_register, methods=["POST"]),
        Route("/v2/systemsharedmemory/region/{region}/unregister", shm_unregister, methods=["POST"]),
        Route("/v2/systemsharedmemory/unregister", shm_unregister, methods=["POST"]),
        Route("/v2/cudasharedmemory/status", cuda_shm),
        Route("/v2/cudasharedmemory/region/{region}/status", cuda_shm),
        Route("/v2/cudasharedmemory/region/{region}/register", cuda_shm, methods=["POST"]),
        Route("/v2/cudasharedmemory/region/{region}/unregister", cuda_shm, methods=["POST"]),
        Route("/v2/cudasharedmemory/unregister", cuda_shm, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/edgens/retry", retry, methods=["POST"]),
        Route("/edgens/faults", faults, methods=["POST"]),
    ]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [Route(base, model_metadata), Route(f"{base}/ready", model_ready),
                   Route(f"{base}/config", model_config), Route(f"{base}/stats", model_stats),
                   Route(f"{base}/infer", infer_not_post)]  # POST never reaches the router: _Application

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error(404, f"no endpoint {request.url.path}; see GET /v2 and GET /v2/models/{service.model.name}")
        if exc.status_code == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path}")
        return error(exc.status_code, str(exc.detail))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("request %s failed", request.url.path, exc_info=exc)
        return error(500, f"internal error: {type(exc).__name__}")

    others = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})
    app: ASGIApp = _Application(state, others)
    if state.token is not None:
        app = _BearerToken(app, state.token, service.metrics)
    return app


class _Application:
    """The ASGI application: ``POST .../infer`` goes straight to :meth:`infer` (no router, middleware or request
    objects: it is the hot path, and its admission runs before the body is read), everything else to Starlette."""

    def __init__(self, state: ServeState, others: Starlette):
        self.state, self.service, self.others = state, state.service, others

    @property
    def routes(self) -> list[Any]:
        """The routes served (the infer path's included, as a route that refuses every method but POST)."""
        return self.others.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = INFER_PATH.fullmatch(scope["path"])
            if route is not None:
                await self.infer(scope, receive, send, route[1], route[2])
                return
        await self.others(scope, receive, send)

    async def infer(self, scope: Scope, receive: Receive, send: Send, model: str, version: str | None) -> None:
        # the deadline counts from the request's first byte, stamped by the server's protocol (edgens.serve.server)
        arrival = scope.get(ARRIVAL) or time.perf_counter()
        service, headers = self.service, Headers(scope=scope)
        answer = refusal = None
        try:
            with service.admission(model, version):  # unknown model, draining, overloaded: before the body is read
                body = await _read_body(headers, receive, self.state.max_request_bytes)
                answer = await service.infer(body, headers.get(HEADER_LENGTH), arrival)
        except Exception as err:  # noqa: BLE001  (every refusal is one line with its status: service.refusal)
            refusal = service.refuse_infer(err, arrival)
        finally:
            if self.state.access_log:
                client = scope.get("client")
                log_infer(answer.prediction if answer is not None else None, refusal, arrival,
                          client[0] if client else None, "http")
        if refusal is not None:  # raw ASGI messages here too: under overload, refusals are most of the work
            content = orjson.dumps({"error": refusal.message})
            headers_out = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content)),
                           *((key.lower().encode(), value.encode()) for key, value in refusal.headers.items())]
            await _respond(scope, send, refusal.status, headers_out, content)
            return
        assert answer is not None
        headers_out = [(b"content-type", b"application/json" if answer.json_length is None
                        else b"application/octet-stream"), (b"content-length", b"%d" % len(answer.content))]
        if answer.json_length is not None:
            headers_out.append((b"inference-header-content-length", b"%d" % answer.json_length))
        await _respond(scope, send, 200, headers_out, answer.content)


async def _respond(scope: Scope, send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Send a whole response; uvicorn writes its head and body apart, so the socket is corked around the two
    writes: one segment on the wire costs the server (and the client) less than two."""
    sock = scope.get(SOCKET) if CORK is not None else None
    corked = sock is not None and _cork(sock, 1)
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    finally:
        if corked:
            _cork(sock, 0)


def _cork(sock: Any, on: int) -> bool:
    """Cork or uncork a connection's socket; False when it is already gone (the client left: nothing to send)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, CORK, on)
    except OSError:
        return False
    return True


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


async def _read_body(headers: Headers, receive: Receive, limit: int) -> bytes:
    """The request body, decompressed (gzip or deflate, as tritonclient may send it), at most ``limit`` bytes.

    Raises:
        ProtocolError: 413 when larger; 400 for an unknown encoding, a corrupt compressed body or a client that left
            before sending all of it.
    """
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ProtocolError(f"the request body of {int(length)} bytes exceeds the server's limit of {limit} bytes "
                            f"(--max-request-bytes)", 413)
    encoding = headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; expected gzip, deflate or none")
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise ProtocolError("the client disconnected before sending the whole request body")
        chunk, more = message.get("body", b""), message.get("more_body", False)
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


async def _read_json(request: Request, limit: int) -> Any:
    """A small JSON request body (fault specs, shared-memory registrations), at most ``limit`` bytes.

    Raises:
        ProtocolError: 413 when larger; 400 for malformed JSON.
    """
    try:
        return json.loads(await _read_body(request.headers, request.receive, limit))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProtocolError(f"malformed JSON in the request: {err}") from None


