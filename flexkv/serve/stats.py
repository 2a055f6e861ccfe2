"""Request latency histograms of the serving engine, as Prometheus histograms (cumulative
buckets, sum, count): time to first token, time per output token and end-to-end latency of
every request that finished normally (a stop token or `max_tokens`; not cancelled or failed).
Buckets are vLLM's, so dashboards built for it read these the same way."""
from __future__ import annotations

import threading
from bisect import bisect_left
from itertools import accumulate

LATENCY = {   # name -> (help, bucket upper bounds in seconds)
    "time_to_first_token_seconds": (
        "seconds from a request's arrival to its first token",
        (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
         10.0, 20.0, 40.0, 80.0, 160.0, 640.0)),
    "time_per_output_token_seconds": (
        "a request's mean seconds per output token after the first",
        (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
         20.0, 40.0, 80.0)),
    "e2e_request_latency_seconds": (
        "seconds from a request's arrival to its last token",
        (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
         240.0, 480.0, 960.0, 1920.0, 7680.0)),
}


class Histogram:
    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)   # the last: above every bound
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1      # the first bound >= value
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict:
        """{"buckets": [(upper bound, cumulative count)] ending with ("+Inf", count), "sum",
        "count"}."""
        cum = list(accumulate(self.counts))
        return {"buckets": list(zip(self.bounds, cum)) + [("+Inf", self.count)],
                "sum": self.sum, "count": self.count}


class RequestLatency:
    """The engine's latency histograms; `finished(handle)` records one request (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._hist = {name: Histogram(bounds) for name, (_, bounds) in LATENCY.items()}

    def finished(self, handle) -> None:
        first, start, end = handle.first_token_at, handle.submitted_at, handle.finished_at
        if end is None:
            return
        with self._lock:
            self._hist["e2e_request_latency_seconds"].observe(end - start)
            if first is not None:
                self._hist["time_to_first_token_seconds"].observe(first - start)
                n = len(handle.tokens)
                if n > 1:
                    self._hist["time_per_output_token_seconds"].observe((end - first) / (n - 1))

    def snapshot(self) -> dict:
        """name -> (help, Histogram.snapshot())."""
        with self._lock:
            return {name: (LATENCY[name][0], h.snapshot()) for name, h in self._hist.items()}
