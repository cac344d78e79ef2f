"""Metric definitions against hand-computed timelines; percentiles against benchmarking.md §3."""

from __future__ import annotations

import pytest

from trt_pipeline.bench.metrics import (
    RequestRecord,
    achieved_gbs,
    bytes_per_decode_token,
    decode_roofline_tok_s,
    pct_of_roofline,
    percentile,
    stats,
    summarize,
)

# Times are binary fractions, so every difference below is exact in floating point.
A = RequestRecord(1, start_s=1.0, token_times_s=(1.25, 1.375, 1.5, 2.0), input_tokens=10,
                  output_tokens=4)
B = RequestRecord(2, start_s=1.5, token_times_s=(2.0, 2.5), input_tokens=20, output_tokens=2)
C = RequestRecord(3, start_s=2.0, token_times_s=(2.25,), input_tokens=30, output_tokens=1)
# Failed after two tokens: in the time window, not in token sums or latency statistics.
FAILED = RequestRecord(4, start_s=0.5, token_times_s=(0.75, 1.0), input_tokens=40, output_tokens=2,
                       error="engine raised")


def test_ttft_is_first_token_minus_send():
    # A: 1.25 - 1.0 = 0.25 s; B: 2.0 - 1.5 = 0.5 s
    assert A.ttft_ms == 250.0
    assert B.ttft_ms == 500.0


def test_e2e_is_last_token_minus_send():
    # A: 2.0 - 1.0 = 1.0 s; C: 2.25 - 2.0 = 0.25 s
    assert A.e2e_ms == 1000.0
    assert C.e2e_ms == 250.0


def test_itl_is_decode_time_over_n_minus_1_and_excludes_first_token():
    # A: (2.0 - 1.25) / (4 - 1) = 0.25 s; B: (2.5 - 2.0) / (2 - 1) = 0.5 s
    assert A.itl_ms == 250.0
    assert B.itl_ms == 500.0
    # A slow first token shows TTFT is not in ITL: (1.25 - 1.0) / 2 = 125 ms, while GuideLLM's
    # TPOT, E2E / n = 1250 / 3 = 416.7 ms, includes it.
    slow_first = RequestRecord(9, 0.0, (1.0, 1.125, 1.25), 0, 3)
    assert slow_first.itl_ms == 125.0
    assert slow_first.e2e_ms / 3 == pytest.approx(416.667, abs=1e-3)


def test_single_token_request_has_no_itl_and_no_gaps():
    assert C.itl_ms is None
    assert C.token_gaps_ms == []


def test_token_gaps_are_every_consecutive_difference():
    # A: 1.375-1.25, 1.5-1.375, 2.0-1.5
    assert A.token_gaps_ms == [125.0, 125.0, 500.0]


def test_multi_token_chunk_counts_every_token():
    # Three tokens in one chunk at 1.25, one more at 1.5: gaps 0, 0, 250; ITL = 250 / 3.
    r = RequestRecord(5, 1.0, (1.25, 1.25, 1.25, 1.5), 0, 4)
    assert r.token_gaps_ms == [0.0, 0.0, 250.0]
    assert r.itl_ms == pytest.approx(250.0 / 3, rel=1e-15)


def test_summary_run_level_numbers():
    s = summarize([A, B, C, FAILED])
    assert (s.requests_ok, s.requests_failed) == (3, 1)
    # window: first send 0.5 (the failed request) .. last token 2.5 (B) = 2.0 s
    assert s.duration_s == 2.0
    # output tokens of successful requests: 4 + 2 + 1 = 7 (not the failed one's 2) -> 3.5 tok/s
    assert s.output_tokens == 7
    assert s.output_tok_s == 3.5
    # 3 successful requests / 2.0 s
    assert s.request_per_s == 1.5
    # per user: A (4-1)/(2.0-1.25) = 4, B (2-1)/(2.5-2.0) = 2, C has one token -> mean 3
    assert s.per_user_tok_s == 3.0
    # Little's law: (1.0 + 1.0 + 0.25) s of E2E over 2.0 s
    assert s.mean_concurrency == 1.125
    assert s.input_tokens == 10 + 20 + 30


def test_summary_latency_stats_exclude_failed_and_single_token_itl():
    s = summarize([A, B, C, FAILED])
    assert s.ttft_ms.n == 3 and s.ttft_ms.mean == pytest.approx((250 + 500 + 250) / 3)
    assert (s.ttft_ms.min, s.ttft_ms.max) == (250.0, 500.0)
    assert s.itl_ms.n == 2 and s.itl_ms.mean == 375.0  # A 250, B 500; C has none
    assert s.e2e_ms.n == 3 and s.e2e_ms.p50 == 1000.0  # sorted 250, 1000, 1000
    # pooled gaps (vLLM ITL): A's 125, 125, 500 and B's 500 -> token-weighted, unlike ITL
    assert s.token_gaps_ms.n == 4 and s.token_gaps_ms.mean == 312.5
    assert s.itl_ms.std == 125.0  # population std of (250, 500)


def test_all_failed_level_is_counted_with_empty_stats():
    s = summarize([FAILED])
    assert (s.requests_ok, s.requests_failed) == (0, 1)
    assert (s.duration_s, s.output_tok_s, s.request_per_s) == (0.5, 0.0, 0.0)  # 1.0 - 0.5 s
    assert s.ttft_ms.n == 0 and s.ttft_ms.p50 is None
    no_token = RequestRecord(5, 0.0, (), 8, 0, error="refused")
    s = summarize([no_token])
    assert s.duration_s is None and s.output_tok_s is None and s.per_user_tok_s is None


def test_percentiles_worked_example_numpy_linear():
    values = [float(v) for v in range(10, 0, -1)]  # 1..10, unsorted on purpose
    assert [percentile(values, q, "numpy-linear") for q in (50, 90, 99)] == [5.5, 9.1, 9.91]


def test_percentiles_worked_example_nearest_rank_floor():
    values = [float(v) for v in range(10, 0, -1)]
    assert [percentile(values, q, "nearest-rank-floor") for q in (50, 90, 99)] == [6.0, 10.0, 10.0]


def test_summary_names_its_method():
    recs = [RequestRecord(i, 0.0, (i / 1000,), 0, 1) for i in range(1, 11)]  # TTFT 1..10 ms
    linear = summarize(recs)
    floor = summarize(recs, "nearest-rank-floor")
    assert linear.ttft_ms.method == "numpy-linear"
    assert linear.ttft_ms.p50 == pytest.approx(5.5, rel=1e-12)
    assert floor.ttft_ms.method == "nearest-rank-floor"
    assert (floor.ttft_ms.p50, floor.ttft_ms.p90, floor.ttft_ms.p99) == pytest.approx((6, 10, 10))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="nearest-rank-floor"):
        stats([1.0], "median-ish")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown percentile method"):
        stats([], "median-ish")  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, match", [
    ({"token_times_s": (1.5, 1.25), "output_tokens": 2}, "backwards"),
    ({"token_times_s": (0.5,), "output_tokens": 1}, "before the request"),
    ({"token_times_s": (1.5,), "output_tokens": 3}, "one timestamp per output token"),
    ({"token_times_s": (), "output_tokens": 0}, "one timestamp per output token"),
])
def test_record_rejects_impossible_timelines(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RequestRecord(task_id=1, start_s=1.0, input_tokens=0, **kwargs)


def test_roofline_matches_facts_worked_example():
    # benchmarking.md §7.4: Hunyuan-0.5B W4 + FP16 head, ctx 1024, RTX 3060:
    # 461.5e6 + 1024 * 98304 = 562,163,296 B per token; 360e9 / that = 640.4 tok/s
    bpt = bytes_per_decode_token(461.5e6, 98304, 1024, batch=1)
    assert bpt == 461.5e6 + 1024 * 98304
    assert decode_roofline_tok_s(bpt, 360) == pytest.approx(360e9 / 562_163_296)
    assert round(decode_roofline_tok_s(bpt, 360)) == 640
    # ctx 0: 360e9 / 461.5e6 = 780 (facts: 780)
    assert round(decode_roofline_tok_s(bytes_per_decode_token(461.5e6, 98304, 0, 1), 360)) == 780


def test_roofline_batch_shares_weights_not_kv():
    # batch 5: (461.5e6 + 5 * 1024 * 98304) / 5 = 92.3e6 + 100,663,296 = 192,963,296 B/token
    bpt = bytes_per_decode_token(461.5e6, 98304, 1024, batch=5)
    assert bpt == pytest.approx(192_963_296)
    # as batch grows the ceiling tends to 360e9 / 100,663,296 = 3576 tok/s (KV-bound, facts 3.6 k)
    big = bytes_per_decode_token(461.5e6, 98304, 1024, batch=10_000)
    assert 3500 < decode_roofline_tok_s(big, 360) < 360e9 / (1024 * 98304)
    with pytest.raises(ValueError):
        bytes_per_decode_token(1.0, 1.0, 1.0, batch=0)


def test_pct_of_roofline_and_achieved_bandwidth():
    assert pct_of_roofline(320.0, 640.0) == 50.0
    # 640 tok/s x 562,163,296 B = 359.8 GB/s
    assert achieved_gbs(640.0, 562_163_296) == pytest.approx(359.78450944)
