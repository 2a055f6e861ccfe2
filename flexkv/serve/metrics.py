"""The serving engine's metrics as Prometheus text (`prometheus_text`, what `GET /metrics`
serves), and its request latency histograms (`RequestLatency`: cumulative buckets, sum, count of
the time to first token, time per output token and end-to-end latency of every request that
finished normally, a stop token or `max_tokens`; not cancelled or failed). Buckets are vLLM's,
so dashboards built for it read these the same way."""
from __future__ import annotations

import math
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


def prometheus_text(engine, model_name: str, http_counters: dict) -> str:
    """`engine.metrics()` (gauges and counters), its latency histograms and the HTTP layer's
    counters (`queue_full`, `disconnects`), labelled with the served model's name."""
    m = dict(engine.metrics())
    label = '{model="%s"}' % model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    known = [
        ("running", "flexkv_requests_running", "gauge", "requests decoding"),
        ("waiting", "flexkv_requests_waiting", "gauge", "requests waiting for a slot"),
        ("prefilling", "flexkv_requests_prefilling", "gauge", "requests whose prompt is being prefilled"),
        ("slots_total", "flexkv_slots_total", "gauge", "request slots of the engine"),
        ("slots_used", "flexkv_slots_used", "gauge", "request slots in use"),
        ("tokens_generated_total", "flexkv_generation_tokens_total", "counter", "tokens generated"),
        ("prompt_tokens_total", "flexkv_prompt_tokens_total", "counter",
         "prompt tokens of the requests started (a shared prefill counts for each)"),
        ("prefills_shared_total", "flexkv_prefills_shared_total", "counter",
         "requests that took another request's prefill of the same prompt (n, best_of, repeats)"),
        ("requests_finished_total", "flexkv_requests_finished_total", "counter", "requests finished (any reason)"),
        ("prefill_seconds_total", "flexkv_prefill_seconds_total", "counter",
         "wall seconds the scheduler spent running prefill chunks"),
        ("decode_seconds_total", "flexkv_decode_seconds_total", "counter",
         "wall seconds the scheduler spent in decode steps (sampling and token delivery included)"),
        ("kv_bytes_allocated", "flexkv_kv_bytes_allocated", "gauge", "bytes of the static KV cache buffers"),
        ("kv_bytes_held", "flexkv_kv_bytes_held", "gauge", "bytes of KV held by the running requests"),
    ]
    out = []

    def emit(name, typ, help_, value):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {typ}")
        v = float(value)
        out.append(f"{name}{label} {int(v) if v.is_integer() else repr(v)}")

    slots_total, slots_used = m.get("slots_total"), m.get("slots_used")
    for key, name, typ, help_ in known:
        if key in m:
            emit(name, typ, help_, m.pop(key))
    if slots_total and slots_used is not None:
        emit("flexkv_slot_occupancy", "gauge", "fraction of the request slots in use",
             float(slots_used) / float(slots_total))
    for key, value in sorted(m.items()):           # anything the engine adds later
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            emit(f"flexkv_{key}", "counter" if key.endswith("_total") else "gauge",
                 f"engine metric {key}", value)
    histograms = getattr(engine, "latency_histograms", None)
    for key, (help_, h) in sorted((histograms() if histograms else {}).items()):
        name = f"flexkv_{key}"
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} histogram")
        for le, n in h["buckets"]:
            out.append(f'{name}_bucket{label[:-1]},le="{le if le == "+Inf" else repr(float(le))}"}} {n}')
        out.append(f"{name}_sum{label} {repr(float(h['sum']))}")
        out.append(f"{name}_count{label} {h['count']}")
    emit("flexkv_http_rejected_queue_full_total", "counter",
         "requests refused with 429 because the waiting queue was full", http_counters["queue_full"])
    emit("flexkv_http_client_disconnects_total", "counter",
         "requests cancelled because the client went away", http_counters["disconnects"])
    return "\n".join(out) + "\n"
