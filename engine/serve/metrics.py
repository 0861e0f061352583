"""The server's Prometheus metrics (GET /metrics), with vLLM's names under the prefix `engine:` and a
`model_name` label, in the server's own CollectorRegistry (nothing global, so several servers or
tests in one process never share counts).

Gauges are read from the engine's latest stats when scraped: requests running and waiting, KV-cache
usage (0..1), and as counters the prefix-cache hit tokens and preemptions since start. Token
counters and the TTFT, inter-token and end-to-end latency histograms are updated by the engine thread
as outputs come out of each step (perf_counter seconds; TTFT from the moment the request reached the
server).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..llm_engine import EngineStats
from ..sequence import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    def __init__(self, model_name: str, state: Callable[[], tuple[EngineStats, int]]):
        """`state()`: the engine's latest stats and the requests handed to the engine thread but not yet
        in its queue (counted as waiting)."""
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.prompt_tokens = Counter("engine:prompt_tokens", "Prompt tokens of requests that started generating.",
                                     labels, registry=r).labels(model_name)  # fmt: skip
        self.generation_tokens = Counter("engine:generation_tokens", "Generated tokens.", labels,
                                         registry=r).labels(model_name)  # fmt: skip
        self.request_success = Counter("engine:request_success", "Finished requests by finish reason.",
                                       [*labels, "finished_reason"], registry=r)  # fmt: skip
        self.ttft = Histogram("engine:time_to_first_token_seconds", "Time to first token (from arrival).",
                              labels, buckets=TTFT_BUCKETS, registry=r).labels(model_name)  # fmt: skip
        self.itl = Histogram("engine:inter_token_latency_seconds", "Time between consecutive generated tokens.",
                             labels, buckets=ITL_BUCKETS, registry=r).labels(model_name)  # fmt: skip
        self.e2e = Histogram("engine:e2e_request_latency_seconds", "Request latency from arrival to finish.",
                             labels, buckets=E2E_BUCKETS, registry=r).labels(model_name)  # fmt: skip
        r.register(_EngineState(model_name, state))
        self._last_token: dict[str, float] = {}  # request id -> when its latest token came out (engine thread)

    def observe(self, outputs: list[RequestOutput]) -> None:
        """One engine step's DELTA outputs (called on the engine thread)."""
        stamp = time.perf_counter()
        for out in outputs:
            rid, n = out.request_id, len(out.outputs[0].token_ids)
            if n:
                self.generation_tokens.inc(n)
                last = self._last_token.get(rid)
                if last is None:
                    self.prompt_tokens.inc(len(out.prompt_token_ids))
                    if out.first_token_time is not None:
                        self.ttft.observe(out.first_token_time - out.arrival_time)
                else:
                    for _ in range(n):
                        self.itl.observe((stamp - last) / n)
                self._last_token[rid] = stamp
            if out.finished:
                self.finished(rid, out.finish_reason)
                if out.finish_time is not None:
                    self.e2e.observe(out.finish_time - out.arrival_time)

    def finished(self, request_id: str, reason: str | None) -> None:
        self._last_token.pop(request_id, None)
        self.request_success.labels(self.model_name, reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineState:
    """Collector of the values the engine keeps itself, read at scrape time."""

    def __init__(self, model_name: str, state: Callable[[], tuple[EngineStats, int]]):
        self.model_name, self.state = model_name, state

    def collect(self):
        stats, queued = self.state()
        values = [
            (GaugeMetricFamily, "engine:num_requests_running", "Requests in the running batch.", stats.num_running),
            (GaugeMetricFamily, "engine:num_requests_waiting", "Requests waiting to be scheduled.",
             stats.num_waiting + queued),
            (GaugeMetricFamily, "engine:kv_cache_usage_perc", "KV-cache usage (1 = full).", stats.kv_cache_usage),
            (CounterMetricFamily, "engine:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
             stats.prefix_cache_hit_tokens),
            (CounterMetricFamily, "engine:num_preemptions", "Preemptions since start.", stats.num_preemptions),
        ]  # fmt: skip
        for kind, name, doc, value in values:
            family = kind(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
