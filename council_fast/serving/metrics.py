"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

council_fast_requests_total{path,status}   counter    every answered request
council_fast_request_seconds{path}         histogram  time from arrival to answer, translate requests
council_fast_batch_size                    histogram  requests per model batch
council_fast_batch_seconds                 histogram  time per model batch
council_fast_batches_failed_total          counter    batches whose run raised (their requests got 500)
council_fast_queue_depth                   gauge      requests waiting for the model
council_fast_ready                         gauge      1 once the model is loaded and warmed up
process_resident_memory_bytes              gauge      the server's resident memory
"""
from __future__ import annotations

import bisect
import os
import threading
from collections import Counter
from typing import Callable

__all__ = ["Metrics", "Histogram", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else format(bound, "g")
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]
        return out


def resident_memory_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Metrics:
    def __init__(self, queue_depth: Callable[[], int] = lambda: 0, ready: Callable[[], bool] = lambda: False):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (path, status) -> n
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS)
        self.batches_failed = 0
        self.queue_depth, self.ready = queue_depth, ready

    def request(self, path: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(path, status)] += 1
            if seconds is not None:
                self.latency.setdefault(path, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, size: int, seconds: float, ok: bool) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.batch_seconds.observe(seconds)
            self.batches_failed += 0 if ok else 1

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP council_fast_requests_total Requests answered, by path and HTTP status.",
                     "# TYPE council_fast_requests_total counter"]
            lines += [f'council_fast_requests_total{{path="{p}",status="{s}"}} {n}'
                      for (p, s), n in sorted(self.requests.items())]
            lines += ["# HELP council_fast_request_seconds Time from arrival to answer.",
                      "# TYPE council_fast_request_seconds histogram"]
            for path, hist in sorted(self.latency.items()):
                lines += hist.lines("council_fast_request_seconds", f'path="{path}"')
            lines += ["# HELP council_fast_batch_size Requests per model batch.",
                      "# TYPE council_fast_batch_size histogram", *self.batch_size.lines("council_fast_batch_size"),
                      "# HELP council_fast_batch_seconds Time per model batch.",
                      "# TYPE council_fast_batch_seconds histogram",
                      *self.batch_seconds.lines("council_fast_batch_seconds"),
                      "# HELP council_fast_batches_failed_total Batches whose model run raised.",
                      "# TYPE council_fast_batches_failed_total counter",
                      f"council_fast_batches_failed_total {self.batches_failed}"]
        lines += ["# HELP council_fast_queue_depth Requests waiting for the model.",
                  "# TYPE council_fast_queue_depth gauge", f"council_fast_queue_depth {self.queue_depth()}",
                  "# HELP council_fast_ready 1 once the model is loaded and warmed up.",
                  "# TYPE council_fast_ready gauge", f"council_fast_ready {int(bool(self.ready()))}"]
        rss = resident_memory_bytes()
        if rss is not None:
            lines += ["# HELP process_resident_memory_bytes Resident memory size in bytes.",
                      "# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {rss}"]
        return "\n".join(lines) + "\n"
