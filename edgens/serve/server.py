"""Run ``edgens serve``: load the bundle, start the batcher, and serve the application with uvicorn until SIGTERM or
SIGINT, then drain.

Draining: readiness turns false and new infer requests get 503 at once; the requests in flight are answered; then
the batcher and the predictor stop and the process exits with status 0. Logs are JSON lines on stderr (one per
infer request with ``access_log``), or plain text.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from edgens.errors import ConfigError, DataNotFoundError
from edgens.fileio import atomic_write_text
from edgens.runtime.batching import Batcher
from edgens.runtime.policies import Budget
from edgens.runtime.predictor import Predictor
from edgens.serve.app import ARRIVAL, SOCKET, ServeState, create_app, early_refusal
from edgens.serve.metrics import ServeMetrics
from edgens.serve.protocol import ModelInfo
from edgens.serve.service import InferenceService

log = logging.getLogger("edgens.serve")


@dataclass
class ServeOptions:
    """The settings of one server (``edgens serve --help`` describes each)."""

    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None
    backend: str = "auto"
    max_batch: int = 64
    max_queue: int = 64
    token_file: Path | None = None
    insecure: bool = False
    min_available: float = 0.5
    stack_timeout_ms: float | None = 1000.0
    max_request_bytes: int = 16 * 1024 * 1024
    drain_timeout_s: float = 30.0
    self_test_interval_s: float | None = None
    allow_fault_injection: bool = False
    access_log: bool = True
    log_format: str = "json"
    log_level: str = "info"
    port_file: Path | None = None
    threads: int | None = None
    solo_threads: int | None = 1
    accelerators: str | None = None
    default_budget: Budget | None = None
    grpc_port: int | None = None
    max_connections: int | None = 256


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's ``fields`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                                 + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                                 "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_token(path: Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped).

    Raises:
        DataNotFoundError: no such file.
        ConfigError: the file is empty or shorter than 16 characters.
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise DataNotFoundError(f"--token-file {path} does not exist; write a random token into it, e.g. "
                                f"python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(f"--token-file {path}: expected one token of at least 16 characters without spaces, got "
                          f"{len(token)} characters")
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("token file %s is readable by other users; chmod 600 it", path)
    return token


def check_bind(options: ServeOptions) -> None:
    """A non-loopback address needs a token unless ``insecure``.

    Raises:
        ConfigError: binding beyond loopback without --token-file or --insecure.
    """
    if not is_loopback(options.host) and options.token_file is None and not options.insecure:
        raise ConfigError(f"--host {options.host} is reachable from other machines: give --token-file FILE (clients "
                          f"then send Authorization: Bearer TOKEN), or --insecure to serve without authentication")


def stamped_protocol(max_connections: int | None = None, refuse: Callable[..., tuple[bytes, bytes] | None] | None = None
                     ) -> type | str:
    """uvicorn's httptools protocol, stamping each request's scope with the time of its first byte (where deadlines
    and the queueing statistics count from; ``ARRIVAL``) and its socket (``SOCKET``), answering a connection
    beyond ``max_connections`` open ones with one 503 and closing it, and answering an infer request that
    ``refuse`` refuses (:func:`~edgens.serve.app.early_refusal`) as soon as its headers are parsed, without starting
    the application; without httptools, uvicorn's default (deadlines count from when the application sees the
    request, connections are not bounded, refusals go through the application)."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"
    refusal = json.dumps({"error": f"the server has {max_connections} connections open, the most it keeps "
                                   f"(--max-connections); try again later"}).encode()
    too_many = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"retry-after: 1\r\nconnection: close\r\n\r\n%s" % (len(refusal), refusal))

    class StampedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if max_connections is not None and len(self.connections) > max_connections:
                transport.write(too_many)  # before any request is read: bounded work for each one refused
                transport.close()

        def on_message_begin(self) -> None:  # the parser met the request's first byte
            super().on_message_begin()
            self.scope[ARRIVAL] = time.perf_counter()  # type: ignore[literal-required]
            self.scope[SOCKET] = self.transport.get_extra_info("socket")  # type: ignore[literal-required]

        def on_headers_complete(self) -> None:
            # Only with no response in progress on this connection (a pipelined request waits for its turn).
            if refuse is None or (self.cycle is not None and not self.cycle.response_complete):
                super().on_headers_complete()
                return
            path = httptools.parse_url(self.url).path.decode("ascii")  # as uvicorn reads it
            if "%" in path:
                path = urllib.parse.unquote(path)
            answer = refuse(self.parser.get_method().decode("ascii"), self.root_path + path, self.headers,
                            self.scope[ARRIVAL], self.client)  # type: ignore[literal-required]
            if answer is None:
                super().on_headers_complete()
                return
            head, body = answer
            keep_alive = self.parser.get_http_version() == "1.1" and self.parser.should_keep_alive()
            # The body that follows is parsed and dropped: uvicorn skips it for a cycle whose response is complete.
            self.cycle = _Answered()
            self.transport.write(head + (b"\r\n" if keep_alive else b"connection: close\r\n\r\n") + body)
            if keep_alive:
                self.on_response_complete()  # counts it, resumes reading, arms the keep-alive timeout
            else:
                self.transport.close()

    return StampedHttpToolsProtocol


class _Answered:
    """The request cycle of a request the protocol answered itself (what uvicorn's protocol reads of a cycle)."""

    response_complete = True
    keep_alive = False
    disconnected = False


class _Server(uvicorn.Server):
    """uvicorn's server, but a signal starts the drain and, once drained, the process exits with status 0 (uvicorn
    itself re-raises the signal after its graceful shutdown)."""

    def __init__(self, config: uvicorn.Config, state: ServeState, url: str, port_file: Path | None,
                 grpc_address: tuple[str, int] | None = None, drain_timeout_s: float = 30.0):
        super().__init__(config)
        self.state = state
        self.url = url
        self.port_file = port_file
        self.grpc_address = grpc_address
        self.drain_timeout_s = drain_timeout_s
        self.grpc: Any = None
        self.grpc_port: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop without waiting
            return
        service = self.state.service
        if not service.draining:
            log.info("draining", extra={"fields": {"event": "draining", "signal": signal.Signals(sig).name,
                                                   "in_flight": service.batcher.in_flight,
                                                   "queued": service.batcher.queue_depth}})
        service.draining = True
        self.should_exit = True

    async def startup(self, sockets: Any = None) -> None:
        if self.grpc_address is not None:  # in this event loop, beside HTTP: one service, one batcher
            from edgens.serve.grpc_server import create_grpc_server

            state = self.state
            self.grpc = create_grpc_server(state.service, state.token, state.max_request_bytes, state.access_log)
            host, port = self.grpc_address
            self.grpc_port = _add_port(self.grpc, host, port)
            await self.grpc.start()
        await super().startup(sockets)
        if self.port_file is not None:  # written once the server accepts connections; line 2: the gRPC port
            ports = self.url.rsplit(":", 1)[1] + (f"\n{self.grpc_port}" if self.grpc_port is not None else "")
            atomic_write_text(self.port_file, ports + "\n")
        fields = {"event": "listening", "url": self.url, "model": self.state.service.model.name,
                  "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0]}  # uvloop or asyncio
        if self.grpc_port is not None:
            fields["grpc"] = f"{self.grpc_address[0]}:{self.grpc_port}"  # type: ignore[index]
        log.info("listening", extra={"fields": fields})

    async def shutdown(self, sockets: Any = None) -> None:
        if self.grpc is not None:  # draining already refuses new calls; those in flight finish within the grace
            await self.grpc.stop(self.drain_timeout_s)
        await super().shutdown(sockets)


def _add_port(server: Any, host: str, port: int) -> int:
    """Bind the gRPC server's port; the port bound (port 0: a free one).

    Raises:
        ConfigError: the address cannot be bound.
    """
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:  # grpcio raises where older versions returned 0
        raise ConfigError(f"cannot serve gRPC on {address}: {err}") from None
    if not bound:
        raise ConfigError(f"cannot serve gRPC on {address}: the port is in use or the address is not this machine's")
    return bound


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the bundle loads, so that a busy port fails at once in one line.

    Raises:
        ConfigError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it a response's
    # header and body writes wait ~40 ms for the client's delayed ACK (Nagle's algorithm).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def serve(options: ServeOptions) -> int:
    """Serve until a signal; returns the exit status (0 after a clean drain).

    Raises:
        ConfigError, DataNotFoundError, BundleError, BackendUnavailableError: bad options or bundle, before
            anything listens.
    """
    setup_logging(options.log_format, options.log_level)
    check_bind(options)
    token = read_token(options.token_file) if options.token_file is not None else None
    if not 0.0 <= options.min_available <= 1.0:
        raise ConfigError(f"--min-available: expected a fraction in [0, 1], got {options.min_available}")
    if options.grpc_port is not None:
        try:
            import grpc  # noqa: F401  (the serve extra has it; a hand-made install may not)
        except ImportError:
            raise ConfigError("--grpc-port needs grpcio and protobuf: pip install 'edgens[serve]'") from None
        if options.grpc_port:  # a busy gRPC port fails before the bundle loads, as a busy HTTP port does
            bind(options.host, options.grpc_port).close()
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    backend_options = {key: value for key, value in (("threads", options.threads),
                                                      ("solo_threads", options.solo_threads),
                                                      ("accelerators", options.accelerators)) if value}
    try:
        predictor = Predictor.load(options.bundle, options.backend, stack_timeout_ms=options.stack_timeout_ms,
                                   self_test_interval_s=options.self_test_interval_s, **backend_options)
    except BaseException:
        sock.close()
        raise
    try:
        state = _start(options, predictor, token)
        protocol = stamped_protocol(options.max_connections, early_refusal(state))
        config = uvicorn.Config(create_app(state), http=protocol, log_config=None, access_log=False, lifespan="off",
                                server_header=False, timeout_graceful_shutdown=options.drain_timeout_s)
        grpc_address = (options.host, options.grpc_port) if options.grpc_port is not None else None
        server = _Server(config, state, url, options.port_file, grpc_address, options.drain_timeout_s)
        server.run(sockets=[sock])
        drained = state.service.batcher.close(timeout=options.drain_timeout_s)
        state.service.close()
        log.info("stopped", extra={"fields": {"event": "stopped", "drained": drained}})
        return 0 if drained else 1
    finally:
        sock.close()
        predictor.close()
        if options.port_file is not None:
            options.port_file.unlink(missing_ok=True)


def _start(options: ServeOptions, predictor: Predictor, token: str | None) -> ServeState:
    name = options.model_name or options.bundle.resolve().name
    batcher = Batcher(predictor, options.max_batch, options.max_queue)
    metrics = ServeMetrics(predictor, batcher)  # its gauges read the batcher; the service hooks its batch sizes
    # First runs of a session are slow (allocation); and without a latency table, deadlines need observed latencies
    # (a batch size not seen borrows the next larger one's, so warming up at the largest batch covers all).
    predictor.warm_up(sorted({1, options.max_batch}))
    if predictor.latency_table is None:
        log.warning("%s has no latency table for this device: deadlines use the latencies observed here; run "
                    "`edgens profile %s` for estimates measured at every batch size", options.bundle, options.bundle)
    log.info("loaded", extra={"fields": {"event": "loaded", "bundle": str(options.bundle), "model": name,
                                         "pid": os.getpid(), **predictor.describe()}})
    service = InferenceService(predictor, batcher, ModelInfo.from_manifest(predictor.manifest, name), metrics,
                               options.min_available, options.allow_fault_injection, options.default_budget)
    return ServeState(service, token, options.max_request_bytes, options.access_log)
