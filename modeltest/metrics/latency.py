"""Performance figures (task_type performance): their definitions, which way is better, and the summary
statistics over requests.

Per request, from the times a backend records (modeltest/backends/base.py TimedBatch): TTFT = first
token - submission, E2E latency = last token - submission, TPOT = (E2E - TTFT) / (output tokens - 1),
ITL = the gaps between consecutive tokens (vLLM's benchmark definitions). Per batch (the seed's CSV):
total time = the last token of the batch - submission, first token time = the last first token of the
batch - submission (the whole batch's prefill), non-first token time = (total - first) / (output - 1),
non-first token throughput = batch size / non-first token time, E2E throughput = batch size x output
tokens / total time.

`modeltest compare` gates each case's figures against the baseline's with a relative tolerance
(--max_slowdown): a performance run has no per-sample scores for paired statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# figure (as the result JSON's cases name it) -> higher is better
FIGURES = {
    "total_time_s": False,
    "first_token_time_ms": False,
    "non_first_token_time_ms": False,
    "non_first_token_throughput": True,
    "e2e_throughput": True,
    "max_batch_size": True,  # performance_maxbs: the largest batch size under the limit
}
# the figures `modeltest compare` gates; the throughputs are these times restated
GATED = ("first_token_time_ms", "non_first_token_time_ms", "total_time_s")
HEADLINE = "e2e_throughput"  # a performance run's value in the history: the seed's E2E Throughput Average
PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def describe(values_s: Sequence[float]) -> dict | None:
    """mean, p50, p90, p99 of durations given in seconds, in milliseconds (None: no values)."""
    if not values_s:
        return None
    ms = [v * 1000 for v in values_s]
    return {"mean": sum(ms) / len(ms), **{f"p{q}": percentile(ms, q) for q in PERCENTILES}}


def slowdown(figure: str, baseline: float, candidate: float) -> float:
    """How much worse the candidate is, relative to the baseline (0.1: 10% slower, or 10% less
    throughput); negative when it is better."""
    if baseline == 0:
        return 0.0 if candidate == baseline else math.inf
    change = candidate / baseline - 1
    return -change if FIGURES[figure] else change
