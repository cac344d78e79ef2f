"""Bench report: JSON round trip, Markdown numbers, real PNG plots, A/B comparison ratios."""

from __future__ import annotations

import json

import pytest

from trt_pipeline.bench.metrics import RequestRecord
from trt_pipeline.bench.report import (
    BenchLevel,
    BenchReport,
    Roofline,
    compare,
    load_json,
    markdown,
    plot,
    write_json,
)
from trt_pipeline.errors import BadInput

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(concurrency: int, step_s: float) -> list[RequestRecord]:
    """Requests all sent at 0; request i has TTFT 0.125 s x (i + 1), then 4 tokens step_s apart."""
    out = []
    for i in range(concurrency):
        t1 = 0.125 * (i + 1)
        out.append(RequestRecord(i, 0.0, tuple(t1 + k * step_s for k in range(5)), 16, 5))
    return out


def _report(step_s: float = 0.125, **metadata) -> BenchReport:
    meta = {"command": "build-engine bench x.yaml", "engine_key": "abc123", "backend": "rtx"}
    meta.update(metadata)
    failed = RequestRecord(99, 0.0, (), 16, 0, error="engine raised")
    return BenchReport(metadata=meta, levels=(
        BenchLevel.from_records(1, _records(1, step_s)),
        BenchLevel.from_records(4, _records(4, step_s) + [failed]),
    ))


def test_level_numbers_by_hand():
    s = _report().levels[1].summary
    # TTFT 125, 250, 375, 500 ms; last token 0.5 + 4 x 0.125 = 1.0 s after the first send
    assert (s.requests_ok, s.requests_failed) == (4, 1)
    assert s.duration_s == 1.0
    assert s.output_tok_s == 20.0  # 4 ok requests x 5 tokens / 1.0 s
    assert s.itl_ms.p50 == 125.0 and s.ttft_ms.p50 == 312.5
    assert s.per_user_tok_s == 8.0  # (5 - 1) / 0.5 for every request


def test_json_round_trip(tmp_path):
    report = _report()
    path = tmp_path / "bench" / "report.json"
    write_json(report, path)
    loaded = load_json(path)
    assert loaded == report
    assert loaded.levels[1].records[-1].error == "engine raised"


def test_load_json_rejects_unknown_keys_and_bad_records(tmp_path):
    path = tmp_path / "r.json"
    write_json(_report(), path)
    data = json.loads(path.read_text())
    data["levels"][0]["records"][0]["ttft"] = 1.0
    data["levels"][1]["records"][0]["token_times_s"] = [0.5, 0.25, 0.5, 0.6, 0.7]
    path.write_text(json.dumps(data))
    with pytest.raises(BadInput) as err:
        load_json(path)
    text = str(err.value)
    assert "r.json  levels.0.records.0.ttft:" in text
    assert "levels.1.records.0: " in text and "token times go backwards" in text


def test_report_refuses_inconsistent_levels():
    level = BenchLevel.from_records(2, _records(2, 0.125))
    with pytest.raises(ValueError, match="repeat"):
        BenchReport(metadata={}, levels=(level, level))
    with pytest.raises(ValueError, match="records"):
        BenchLevel(concurrency=2, summary=level.summary, records=level.records[:1])
    other = BenchLevel.from_records(4, _records(4, 0.125), "nearest-rank-floor")
    with pytest.raises(ValueError, match="percentile methods"):
        BenchReport(metadata={}, levels=(level, other))


def test_markdown_states_definitions_and_numbers():
    md = markdown(_report())
    assert "(t_n - t_1)/(n - 1)" in md and '"TPOT"' in md and "Percentiles: numpy-linear" in md
    assert "- engine_key: abc123" in md
    assert "## Concurrency 1" in md and "## Concurrency 4" in md
    # c=4 run row: 4 ok, 1 failed, 1.0 s, 20 tok/s, 4 req/s, 8 tok/s/user,
    # Little's law (0.625 + 0.75 + 0.875 + 1.0) / 1.0 = 3.25
    assert "| 4 | 1 | 1.000 | 20.0 | 4.000 | 8.0 | 3.25 |" in md
    # TTFT 125..500 ms: mean 312.5; std sqrt((187.5^2 + 62.5^2) / 2) = 139.754;
    # linear p50 = 312.5, p90 = 125 + 0.9 x 375, p95 = 125 + 0.95 x 375, p99 = 125 + 0.99 x 375
    assert "| TTFT ms | 4 | 312.500 | 139.754 | 125.000 | 312.500 | 462.500 | 481.250 | " \
           "496.250 | 500.000 |" in md
    # ITL: n = 4 requests, each (4 x 125 ms) / 4
    assert "| ITL ms | 4 | 125.000 | 0.000 | 125.000 | 125.000 |" in md
    # token gaps: 4 requests x 4 gaps = 16
    assert "| token gap ms | 16 |" in md


def test_markdown_roofline_column():
    report = _report().model_copy(update={"roofline": Roofline(
        weight_bytes=461.5e6, kv_bytes_per_token=98304, context_tokens=1024, bandwidth_gbs=360,
        source="RTX 3060, 360 GB/s")})
    md = markdown(report)
    # c=1: ceiling 360e9 / 562,163,296 = 640.4 tok/s; measured 8 tok/s -> 1.2 %
    assert "RTX 3060, 360 GB/s" in md
    assert "| 1 | 0 | 0.625 | 8.0 | 1.600 | 8.0 | 1.00 | 640.4 | 1.2 |" in md
    # c=4: (461.5e6 + 4 x 100,663,296) / 4 = 216,038,296 B/token -> 1666.4 tok/s;
    # measured 4 x 8 = 32 tok/s -> 1.9 %
    assert "| 1666.4 | 1.9 |" in md


def test_plot_writes_real_pngs(tmp_path):
    import matplotlib.image

    paths = plot(_report(), tmp_path / "plots")
    assert [p.name for p in paths] == ["latency_vs_throughput.png", "ttft_itl_cdf.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert len(data) > 10_000  # axes, labels and lines, not an empty canvas
        height, width, _ = matplotlib.image.imread(p).shape
        assert (width, height) == (1000, 400)


def test_compare_shows_ratios_for_matching_levels():
    a = _report(step_s=0.125)
    b = _report(step_s=0.0625, engine_key="def456")
    b = b.model_copy(update={"levels": b.levels[1:] + (BenchLevel.from_records(
        8, _records(8, 0.0625)),)})
    md = compare(a, b)
    # ITL halves: 62.5 / 125 = 0.5. c=4 duration: A 0.5 + 4 x 0.125 = 1.0 s -> 20 tok/s;
    # B 0.5 + 4 x 0.0625 = 0.75 s -> 26.667 tok/s; 26.667 / 20 = 1.333
    assert "| ITL ms p50 | 125.000 | 62.500 | 0.500 |" in md
    assert "| output tok/s | 20.000 | 26.667 | 1.333 |" in md
    assert "| TTFT ms p50 | 312.500 | 312.500 | 1.000 |" in md
    assert "| failed requests | 1 | 1 | 1.000 |" in md
    assert "| ITL ms n | 4 | 4 | 1.000 |" in md
    assert "| engine_key | abc123 | def456 |" in md
    assert "Levels only in A: [1]; only in B: [8]." in md
    assert "## Concurrency 4" in md and "## Concurrency 1" not in md


def test_compare_warns_when_methods_differ():
    a = _report()
    b = BenchReport(metadata=a.metadata, levels=(
        BenchLevel.from_records(1, _records(1, 0.125), "nearest-rank-floor"),))
    assert "WARNING: percentile methods differ" in compare(a, b)
