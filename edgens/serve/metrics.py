"""Prometheus metrics of ``edgens serve`` (``GET /metrics``), in a registry of the server's own.

Names start with ``edgens_``. Counters: requests by outcome, deadline overruns (and those beyond the deadline's
promise of one stack), stack failures by stack and kind.
Histograms: request latency (from arrival to the answer), members used per request, examples per merged call.
Gauges read at scrape time: queue depth, requests in flight, quarantined and unavailable stacks, the fraction of
members available, the device's power mode (a Jetson's nvpmodel mode, as a label) and whether a latency table for it
is in use.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edgens.runtime.batching import Batcher
from edgens.runtime.prediction import Prediction
from edgens.runtime.predictor import Predictor

OUTCOMES = ("ok", "bad_request", "unauthorized", "not_found", "too_large", "overloaded", "stopping", "unavailable",
            "error")
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class PowerModeCollector:
    """``edgens_power_mode{mode="25W"} 1`` (no sample without power modes) and ``edgens_latency_table`` (1 while a
    table for the current backend, device and power mode is in use), read at scrape time."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # one view for both samples; following the mode here too, since a server answering only member budgets
        # would not read it otherwise
        view = self.predictor.latency.follow_power_mode()
        mode = GaugeMetricFamily("edgens_power_mode", "The device's power mode (nvpmodel's name, as the label)",
                                 labels=["mode"])
        if view.power_mode is not None:
            mode.add_metric([view.power_mode], 1.0)
        yield mode
        yield GaugeMetricFamily("edgens_latency_table", "1 while a latency table for this backend, device and power "
                                "mode is in use (latency_ms budgets need one)", value=float(view.table is not None))


class ServeMetrics:
    """The server's metrics; :meth:`answered` and :meth:`refused` record each request."""

    def __init__(self, predictor: Predictor, batcher: Batcher):
        disable_created_metrics()  # the *_created series (start times) only clutter a device's scrape
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("edgens_requests", "Infer requests by outcome", ["outcome"], registry=registry)
        # every outcome is exported from the start, at 0; the children are kept (labels() costs a lookup per call)
        self._outcomes = {outcome: self.requests.labels(outcome) for outcome in OUTCOMES}
        self.latency = Histogram("edgens_request_latency_seconds", "Infer latency from arrival to the answer",
                                 buckets=LATENCY_BUCKETS_S, registry=registry)
        total = len(predictor.manifest.members)
        sizes = sorted({len(s.members) for s in predictor.manifest.general_stacks})
        step = sizes[0] if sizes else 1
        member_buckets = sorted({*range(step, total + 1, step), total})
        self.members = Histogram("edgens_members_used", "Members averaged per answered request (the fewest of its "
                                 "examples)", buckets=member_buckets, registry=registry)
        self.overruns = Counter("edgens_deadline_overruns", "Answers that came after their request's deadline",
                                registry=registry)
        self.overrun_seconds = Histogram("edgens_deadline_overrun_seconds", "How far past the deadline late answers "
                                         "came", buckets=LATENCY_BUCKETS_S, registry=registry)
        self.beyond_promise = Counter("edgens_deadline_beyond_one_stack", "Answers later than their deadline's "
                                      "promise: one stack (the slowest started, at its p90) and the runtime's own work",
                                      registry=registry)
        self.stack_failures = Counter("edgens_stack_failures", "Stacks that failed in a call, by kind",
                                      ["stack", "kind"], registry=registry)
        self.batch = Histogram("edgens_batch_examples", "Examples per merged stack or predict call",
                               buckets=BATCH_BUCKETS, registry=registry)
        Gauge("edgens_queue_depth", "Requests waiting to start", registry=registry).set_function(
            lambda: batcher.queue_depth)
        Gauge("edgens_requests_in_flight", "Requests started and not yet answered", registry=registry).set_function(
            lambda: batcher.in_flight)
        Gauge("edgens_quarantined_stacks", "Stacks quarantined after failing", registry=registry).set_function(
            lambda: sum(h.status == "quarantined" for h in predictor.health().values()))
        Gauge("edgens_excluded_stacks", "Stacks excluded at load (missing, corrupt or unloadable)",
              registry=registry).set_function(lambda: sum(h.status == "excluded" for h in predictor.health().values()))
        Gauge("edgens_members_available_ratio", "Fraction of the members in available general stacks",
              registry=registry).set_function(predictor.pool.members_available)
        registry.register(PowerModeCollector(predictor))

    def answered(self, prediction: Prediction, latency_s: float) -> None:
        self._outcomes["ok"].inc()
        self.latency.observe(latency_s)
        self.members.observe(int(prediction.members_used.min()))
        if prediction.overrun_ms > 0:
            self.overruns.inc()
            self.overrun_seconds.observe(prediction.overrun_ms / 1e3)
            if not prediction.within_promise:
                self.beyond_promise.inc()
        for failure in prediction.failures:
            self.stack_failures.labels(failure.stack, failure.kind).inc()

    def refused(self, outcome: str) -> None:
        child = self._outcomes.get(outcome)
        (child if child is not None else self.requests.labels(outcome)).inc()

    def merged_call(self, examples: int, requests: int) -> None:
        self.batch.observe(examples)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
