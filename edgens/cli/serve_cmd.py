"""``edgens serve``: the bundle as an HTTP service (Open Inference Protocol), with per-request deadlines.

Only click and the standard library are imported here; the server (:mod:`edgens.serve.server`: Starlette, uvicorn,
prometheus-client, the runtime) is imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgens.cli.infer_cmd import BACKEND_CHOICES, parse_members


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Beyond loopback, --token-file (or --insecure) is required.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port; see --port-file).")
@click.option("--grpc-port", type=click.IntRange(0, 65535),
              help="Also serve the protocol over gRPC on this port (0: any free port, written as the second line "
                   "of --port-file), on the same address, batcher, token and limits as HTTP.")
@click.option("--model-name", help="The model's name in the protocol's URLs (default: the bundle folder's name).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most examples one merged stack call takes (and one request may send).")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most requests waiting to start; beyond it, requests get 503 at once.")
@click.option("--max-connections", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most HTTP connections open at once; one more is answered 503 and closed before it is read.")
@click.option("--default-deadline-ms", type=float,
              help="Budget of requests that give none: this deadline (Triton's default_timeout; perf_analyzer over "
                   "HTTP cannot send parameters). A request's own budget overrides it. At most one --default-*.")
@click.option("--default-members", "default_members_text", metavar="K|FRACTION",
              help="Budget of requests that give none: the first K members (or 0.5, 50%).")
@click.option("--default-flops", type=float, help="Budget of requests that give none: at most these FLOPs.")
@click.option("--default-latency-ms", type=float, help="Budget of requests that give none: this latency table budget.")
@click.option("--default-confidence", type=float, help="Budget of requests that give none: early exit at this p.")
@click.option("--default-task", help="Budget of requests that give none: this specialist task.")
@click.option("--token-file", type=click.Path(path_type=Path),
              help="File holding the bearer token clients must send (Authorization: Bearer TOKEN).")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without a token.")
@click.option("--min-available", type=float, default=0.5, show_default=True,
              help="Readiness turns false when fewer than this fraction of the members are available.")
@click.option("--stack-timeout-ms", type=float, default=1000.0, show_default=True,
              help="Drop a stack from a call when it takes longer than this (a hung stack; 0: no timeout).")
@click.option("--max-request-bytes", type=click.IntRange(min=1024), default=16 * 1024 * 1024, show_default=True,
              help="Largest request body accepted (after decompression); larger ones get 413.")
@click.option("--drain-timeout-s", type=float, default=30.0, show_default=True,
              help="On SIGTERM, wait at most this long for the requests in flight.")
@click.option("--self-test-interval-s", type=float,
              help="Rerun every stack on the bundle's stored self-test inputs this often (silent faults).")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime threads per general stack's session.")
@click.option("--accelerators", metavar="gpu,dla0,dla1",
              help="tensorrt backend: run the general stacks in turn on these (a Jetson's GPU and DLA cores), each "
                   "on its engine for that accelerator, else its GPU engine (docs/jetson.md).")
@click.option("--solo-threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime threads of a prefix stack's session. 1 never spins, which leaves the other cores to "
                   "the HTTP work (measured: +50% throughput at 16 clients on 2 cores); more is faster alone.")
@click.option("--allow-fault-injection", is_flag=True,
              help="Enable POST /edgens/faults, which makes stacks fail on purpose (tests and benchmarks only).")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="Log one line per infer request.")
@click.option("--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--port-file", type=click.Path(path_type=Path),
              help="Write the port here once the server accepts connections (removed at exit).")
@click.option("--systemd-unit", is_flag=True,
              help="Print a systemd unit that runs this command (with these options) as a service, and exit.")
@click.pass_context
def serve(ctx: click.Context, bundle: Path, host: str, port: int, grpc_port: int | None, model_name: str | None,
          backend: str, max_batch: int, max_queue: int, max_connections: int,
          default_deadline_ms: float | None, default_members_text: str | None,
          default_flops: float | None, default_latency_ms: float | None, default_confidence: float | None,
          default_task: str | None, token_file: Path | None, insecure: bool, min_available: float,
          stack_timeout_ms: float,
          max_request_bytes: int, drain_timeout_s: float, self_test_interval_s: float | None, threads: int | None,
          accelerators: str | None, solo_threads: int | None, allow_fault_injection: bool, access_log: bool,
          log_format: str, log_level: str, port_file: Path | None, systemd_unit: bool) -> None:
    """Serve BUNDLE with the Open Inference Protocol (KServe v2, as Triton speaks it) over HTTP, and over gRPC with
    --grpc-port.

    Budgets travel as request parameters (deadline_ms, members, flops, latency_ms, confidence, task); concurrent
    requests are merged into batched stack calls, and each deadline request is answered when its own deadline
    allows no further stack. SIGTERM drains: new requests are refused, those in flight are answered, exit 0.
    See docs/serve.md; on a Jetson, docs/jetson.md (with --systemd-unit, a service that starts at boot).
    """
    if systemd_unit:
        from edgens.cli.systemd_unit import systemd_unit as unit
        from edgens.runtime.bundle import load_manifest

        load_manifest(bundle)  # a unit for a bundle that is not there would fail at every boot

        click.echo(unit(ctx, bundle, drain_timeout_s), nl=False)
        return
    from edgens.errors import ConfigError
    from edgens.runtime.policies import Budget
    from edgens.serve.server import ServeOptions
    from edgens.serve.server import serve as run

    try:
        default_budget = Budget.parse(parse_members(default_members_text), default_flops, default_latency_ms,
                                      default_deadline_ms, default_confidence, default_task)
    except ConfigError as err:
        raise click.BadParameter(str(err), param_hint="--default-*") from None
    options = ServeOptions(default_budget=default_budget, grpc_port=grpc_port,
        bundle=bundle, host=host, port=port, model_name=model_name, backend=backend, max_batch=max_batch,
        max_queue=max_queue, max_connections=max_connections, token_file=token_file, insecure=insecure,
        min_available=min_available,
        stack_timeout_ms=stack_timeout_ms or None, max_request_bytes=max_request_bytes,
        drain_timeout_s=drain_timeout_s, self_test_interval_s=self_test_interval_s, threads=threads,
        solo_threads=solo_threads, accelerators=accelerators,
        allow_fault_injection=allow_fault_injection, access_log=access_log, log_format=log_format,
        log_level=log_level, port_file=port_file)
    raise SystemExit(run(options))
