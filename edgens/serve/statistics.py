"""Triton's statistics extension for ``edgens serve``: cumulative counts and durations per model, in Triton's form
(``GET /v2/models/{m}/stats`` and the gRPC ``ModelStatistics``), so that perf_analyzer's server-side breakdown works.

Per answered request (from its arrival at the transport):

- ``compute_input``: parsing and checking the request (JSON or protobuf, the tensor bytes);
- ``queue``: from parsed to the start of the batcher's first stack call for it;
- ``compute_infer``: from that start to its prediction (the stacks, the tally; a deadline request may share its
  stack calls with others in its cohort);
- ``compute_output``: encoding the response;
- ``success``: the whole, arrival to encoded. Refused and failed requests count in ``fail`` with their time.

``inference_count`` counts examples answered, ``execution_count`` the merged calls the batcher ran (one stack call for
a deadline cohort, one predict call for a fixed-plan group). Per-batch-size statistics (``batch_stats``) are not
kept: a deadline cohort's examples change between its stack calls, so edgens has no one batch size per execution.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit",
             "cache_miss")


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, round(seconds * 1e9))


class ModelStatistics:
    """The cumulative statistics of one served model (thread-safe: the batcher's worker counts executions)."""

    def __init__(self, name: str, version: str):
        self.name, self.version = name, version
        self._lock = threading.Lock()
        self._durations = {key: _Duration() for key in DURATIONS}  # cache_*: always 0, edgens caches no responses
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0

    def answered(self, examples: int, input_s: float, queue_s: float, infer_s: float, output_s: float) -> None:
        """Count one answered request of ``examples`` examples and its phases (seconds)."""
        with self._lock:
            for key, seconds in (("compute_input", input_s), ("queue", queue_s), ("compute_infer", infer_s),
                                 ("compute_output", output_s),
                                 ("success", input_s + queue_s + infer_s + output_s)):
                self._durations[key].add(seconds)
            self.inference_count += examples
            self.last_inference_ms = int(time.time() * 1e3)

    def failed(self, seconds: float) -> None:
        """Count one refused or failed infer request that took ``seconds``."""
        with self._lock:
            self._durations["fail"].add(seconds)

    def executed(self, examples: int, requests: int) -> None:
        """Count one merged call of the batcher (its ``on_batch`` hook)."""
        with self._lock:
            self.execution_count += 1

    def to_dict(self) -> dict[str, Any]:
        """One entry of Triton's ``model_stats`` list (the JSON form; the gRPC message has the same fields)."""
        with self._lock:
            return {"name": self.name, "version": self.version, "last_inference": self.last_inference_ms,
                    "inference_count": self.inference_count, "execution_count": self.execution_count,
                    "inference_stats": {key: {"count": d.count, "ns": d.ns} for key, d in self._durations.items()},
                    "batch_stats": []}
