"""Per-request latencies, run-level throughput and percentile statistics from raw token timestamps.

Definitions (benchmarking.md §2; t_s = send, t_1/t_n = first/last output token, n = output tokens):
  TTFT          = t_1 - t_s
  ITL           = (t_n - t_1) / (n - 1), per request, n >= 2; excludes the first token.
                  This is AIPerf/GenAI-Perf/GuideLLM "ITL" and trtllm-bench/vLLM "TPOT".
                  It is NOT GuideLLM's TPOT, which includes TTFT.
  token gaps    = every t_i - t_{i-1} (i >= 2) of every request, pooled: vLLM's "ITL",
                  token-weighted and fatter-tailed. Tokens that arrive in one chunk share a
                  timestamp (gap 0).
  E2E           = t_n - t_s
  duration      = last token of any request - first send of any request
  output tok/s  = sum(n of successful requests) / duration (trtllm-bench, vLLM, AIPerf)
  per-user tok/s = mean over requests of (n - 1) / (t_n - t_1)  (trtllm-bench "per user")
Failed requests are counted, and excluded from latency statistics and token sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from pydantic import ConfigDict

PercentileMethod = Literal["numpy-linear", "nearest-rank-floor"]
PERCENTILES = (50, 90, 95, 99)
_STRICT = ConfigDict(extra="forbid")  # honoured when a BenchReport validates these dataclasses


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What a client saw of one request: perf_counter seconds, one timestamp per output token.

    One entry per token, even when a chunk carries several, so token counts never depend on how
    the stream was chunked (benchmarking.md §2, "Multi-token chunks").
    """

    __pydantic_config__ = _STRICT

    task_id: int
    start_s: float
    token_times_s: tuple[float, ...]
    input_tokens: int
    output_tokens: int
    error: str | None = None

    def __post_init__(self) -> None:
        times = self.token_times_s
        if any(b < a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"task {self.task_id}: token times go backwards")
        if times and times[0] < self.start_s:
            raise ValueError(f"task {self.task_id}: a token arrived before the request was sent")
        if self.error is None and (not times or len(times) != self.output_tokens):
            raise ValueError(f"task {self.task_id}: a successful request needs one timestamp per "
                             f"output token; got {len(times)} for {self.output_tokens} tokens")

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_ms(self) -> float:
        return (self.token_times_s[0] - self.start_s) * 1e3

    @property
    def e2e_ms(self) -> float:
        return (self.token_times_s[-1] - self.start_s) * 1e3

    @property
    def itl_ms(self) -> float | None:
        """(t_n - t_1)/(n - 1); None for a single-token request, which has no gap to average."""
        n = len(self.token_times_s)
        if n < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (n - 1) * 1e3

    @property
    def token_gaps_ms(self) -> list[float]:
        t = self.token_times_s
        return [(b - a) * 1e3 for a, b in zip(t, t[1:], strict=False)]


@dataclass(frozen=True, slots=True)
class Stats:
    """Distribution of one metric; every value is None when n == 0 (JSON has no NaN)."""

    __pydantic_config__ = _STRICT

    method: PercentileMethod
    n: int
    mean: float | None
    std: float | None  # population (ddof 0), as vLLM and AIPerf
    min: float | None
    max: float | None
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None


@dataclass(frozen=True, slots=True)
class Summary:
    """One load level. Throughputs are None when no token arrived (duration undefined)."""

    __pydantic_config__ = _STRICT

    requests_ok: int
    requests_failed: int
    input_tokens: int
    output_tokens: int
    duration_s: float | None
    output_tok_s: float | None
    request_per_s: float | None
    per_user_tok_s: float | None
    mean_concurrency: float | None  # Little's law, sum(E2E) / duration: a check on the load
    ttft_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    token_gaps_ms: Stats


def percentile(values: Sequence[float], q: int, method: PercentileMethod) -> float:
    """The q-th percentile (q an integer 0..100) by a named method.

    numpy-linear: np.percentile's linear interpolation (AIPerf, GenAI-Perf, vLLM, LLMPerf).
    nearest-rank-floor: sorted[floor(N*q/100)], trtllm-bench's `statistics.py`; integer
    arithmetic, so 10 * 90 / 100 is exactly 9, never 8.999...
    """
    _check_method(method)
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100; got {q}")
    if method == "numpy-linear":
        return float(np.percentile(np.asarray(values, dtype=np.float64), q, method="linear"))
    ordered = sorted(values)
    return float(ordered[min(len(ordered) * q // 100, len(ordered) - 1)])


def _check_method(method: str) -> None:
    if method not in get_args(PercentileMethod):
        raise ValueError(f"unknown percentile method {method!r}; expected one of "
                         f"{', '.join(get_args(PercentileMethod))}")


def stats(values: Sequence[float], method: PercentileMethod = "numpy-linear") -> Stats:
    """n, mean, population std, min, max and p50/p90/p95/p99 by the named method."""
    _check_method(method)
    if not values:
        return Stats(method, 0, *([None] * 8))
    arr = np.asarray(values, dtype=np.float64)
    p = [percentile(values, q, method) for q in PERCENTILES]
    return Stats(method, len(values), float(arr.mean()), float(arr.std()), float(arr.min()),
                 float(arr.max()), *p)


def summarize(
    records: Sequence[RequestRecord], method: PercentileMethod = "numpy-linear"
) -> Summary:
    """Run-level numbers for one load level, by the definitions in this module's docstring."""
    ok = [r for r in records if r.ok]
    starts = [r.start_s for r in records]
    ends = [r.token_times_s[-1] for r in records if r.token_times_s]
    duration_s = max(ends) - min(starts) if ends else None
    out_tokens = sum(r.output_tokens for r in ok)
    e2e = [r.e2e_ms for r in ok]
    itl = [v for r in ok if (v := r.itl_ms) is not None]
    # A request whose tokens all arrived at once has no decode time to divide by.
    user = [(len(r.token_times_s) - 1) / (r.token_times_s[-1] - r.token_times_s[0])
            for r in ok if len(r.token_times_s) >= 2 and r.token_times_s[-1] > r.token_times_s[0]]
    rate = duration_s is not None and duration_s > 0
    return Summary(
        requests_ok=len(ok),
        requests_failed=len(records) - len(ok),
        input_tokens=sum(r.input_tokens for r in ok),
        output_tokens=out_tokens,
        duration_s=duration_s,
        output_tok_s=out_tokens / duration_s if rate else None,
        request_per_s=len(ok) / duration_s if rate else None,
        per_user_tok_s=float(np.mean(user)) if user else None,
        mean_concurrency=sum(e2e) / 1e3 / duration_s if rate else None,
        ttft_ms=stats([r.ttft_ms for r in ok], method),
        itl_ms=stats(itl, method),
        e2e_ms=stats(e2e, method),
        token_gaps_ms=stats([g for r in ok for g in r.token_gaps_ms], method),
    )


def bytes_per_decode_token(
    weight_bytes: float, kv_bytes_per_token: float, context_tokens: float, batch: int
) -> float:
    """DRAM bytes read per generated token in decode (benchmarking.md §7.2-7.3).

    One decode step reads every weight once, shared by the whole batch, plus each sequence's own
    KV cache (context_tokens x kv_bytes_per_token); it yields `batch` tokens, so
        bytes/token = (weight_bytes + batch * context_tokens * kv_bytes_per_token) / batch.
    Activations, norms and the embedding row are ignored (negligible at small batch). Example:
    Hunyuan-0.5B W4 + FP16 lm_head, ctx 1024, batch 1: 461.5e6 + 1024 * 98304 = 562.2e6 B.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1; got {batch}")
    return (weight_bytes + batch * context_tokens * kv_bytes_per_token) / batch


def decode_roofline_tok_s(bytes_per_token: float, bandwidth_gbs: float) -> float:
    """Bandwidth-bound ceiling, tokens/s: GB/s x 1e9 / bytes per token (GB = 1e9 B, as datasheets).

    Compare it with the same batch's aggregate decode rate; at batch 1 that is 1000 / ITL ms.
    """
    return bandwidth_gbs * 1e9 / bytes_per_token


def achieved_gbs(tok_s: float, bytes_per_token: float) -> float:
    """Bandwidth a measured decode rate implies; above the device's peak means a measurement bug."""
    return tok_s * bytes_per_token / 1e9


def pct_of_roofline(measured: float, ceiling: float) -> float:
    """Percent of the ceiling; good runs reach 50-70 %, over 100 % is a bug (benchmarking.md)."""
    return 100.0 * measured / ceiling
