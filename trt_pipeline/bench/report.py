"""The bench report: validated JSON with raw records, Markdown tables, PNG plots, A/B comparison."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import BadInput, Problem
from ..fsio import write_bytes_atomic, write_text_atomic
from .metrics import (
    PercentileMethod,
    RequestRecord,
    Stats,
    Summary,
    bytes_per_decode_token,
    decode_roofline_tok_s,
    summarize,
)

DEFINITIONS = (
    "TTFT = t_1 - t_send. ITL = (t_n - t_1)/(n - 1) per request, first token excluded "
    '(AIPerf/GenAI-Perf/GuideLLM "ITL" = trtllm-bench/vLLM "TPOT"; not GuideLLM\'s TPOT, which '
    "includes TTFT). Token gap = every t_i - t_(i-1) pooled over requests (vLLM \"ITL\"). "
    "E2E = t_n - t_send. Output tok/s = sum(n of successful requests) / (last token - first send). "
    "Per-user tok/s = mean over requests of (n - 1)/(t_n - t_1). Std is population (ddof 0). "
    "Failed requests are counted, not in latencies or token sums."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Roofline(_Strict):
    """Inputs of the decode ceiling (benchmarking.md §7.3); the report computes it per level."""

    weight_bytes: float = Field(gt=0)
    kv_bytes_per_token: float = Field(ge=0)
    context_tokens: float = Field(ge=0, description="Mean context per sequence while decoding.")
    bandwidth_gbs: float = Field(gt=0)
    source: str = Field(description="Where the numbers come from (device, engine config).")


class BenchLevel(_Strict):
    """One concurrency level: its summary and every raw record it was computed from."""

    concurrency: int = Field(ge=1)
    summary: Summary
    records: tuple[RequestRecord, ...]

    @classmethod
    def from_records(
        cls, concurrency: int, records: Sequence[RequestRecord],
        method: PercentileMethod = "numpy-linear",
    ) -> BenchLevel:
        return cls(concurrency=concurrency, summary=summarize(records, method),
                   records=tuple(records))

    @model_validator(mode="after")
    def _counts_match(self) -> BenchLevel:
        s = self.summary
        if s.requests_ok + s.requests_failed != len(self.records):
            raise ValueError(f"summary counts {s.requests_ok} ok + {s.requests_failed} failed, "
                             f"but there are {len(self.records)} records")
        return self


class BenchReport(_Strict):
    """What `build-engine bench` writes: metadata (command, recipe, engine key, backend, device,
    versions, workload) and one entry per concurrency level, raw records included, so any statistic
    can be recomputed later with another definition."""

    schema_version: Literal[1] = 1
    metadata: dict[str, Any]
    levels: tuple[BenchLevel, ...] = Field(min_length=1)
    roofline: Roofline | None = None

    @model_validator(mode="after")
    def _one_method_unique_levels(self) -> BenchReport:
        seen = [lv.concurrency for lv in self.levels]
        if len(set(seen)) != len(seen):
            raise ValueError(f"concurrency levels repeat: {seen}")
        if len({_method_of(lv.summary) for lv in self.levels}) > 1:
            raise ValueError("levels use different percentile methods")
        return self


def _method_of(summary: Summary) -> str:
    return summary.ttft_ms.method


def write_json(report: BenchReport, path: str | Path) -> None:
    write_text_atomic(Path(path), report.model_dump_json(indent=1) + "\n")


def load_json(path: str | Path) -> BenchReport:
    """Read and validate a report; raises BadInput with the key path of every fault."""
    path = Path(path)
    try:
        return BenchReport.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise BadInput([Problem("", f"cannot read report: {exc}", None, str(path))]) from exc
    except ValidationError as exc:
        problems = [Problem(".".join(str(p) for p in e["loc"]), e["msg"], None, str(path))
                    for e in exc.errors()]
        raise BadInput(problems, str(path)) from exc


def _f(x: float | int | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return str(x) if isinstance(x, int) else f"{x:.{digits}f}"


def _ceiling_tok_s(report: BenchReport, concurrency: int) -> float | None:
    r = report.roofline
    if r is None:
        return None
    bpt = bytes_per_decode_token(r.weight_bytes, r.kv_bytes_per_token, r.context_tokens,
                                 concurrency)
    return decode_roofline_tok_s(bpt, r.bandwidth_gbs)


def markdown(report: BenchReport) -> str:
    """One run table and one latency table (n beside the percentiles) per level."""
    out = ["# Benchmark report", ""]
    out += [f"- {k}: {v}" for k, v in report.metadata.items()]
    used = _method_of(report.levels[0].summary)
    out += ["", f"Definitions: {DEFINITIONS} Percentiles: {used}.", ""]
    if report.roofline:
        out += [f"Roofline: {report.roofline.source}; decode tok/s = per-user tok/s x concurrency "
                "against bandwidth / bytes per token at batch = concurrency.", ""]
    for lv in report.levels:
        s = lv.summary
        head = ["requests ok", "failed", "duration s", "output tok/s", "requests/s",
                "per-user tok/s", "mean concurrency"]
        row = [str(s.requests_ok), str(s.requests_failed), _f(s.duration_s), _f(s.output_tok_s, 1),
               _f(s.request_per_s), _f(s.per_user_tok_s, 1), _f(s.mean_concurrency, 2)]
        ceiling = _ceiling_tok_s(report, lv.concurrency)
        if ceiling is not None:
            decode = s.per_user_tok_s * lv.concurrency if s.per_user_tok_s else None
            head += ["decode ceiling tok/s", "% of ceiling"]
            row += [_f(ceiling, 1), _f(100 * decode / ceiling if decode else None, 1)]
        out += [f"## Concurrency {lv.concurrency}", "", _row(head), _row(["---"] * len(head)),
                _row(row), "", _row(["metric", "n", "mean", "std", "min", "p50", "p90", "p95",
                                     "p99", "max"]), _row(["---"] * 10)]
        for name, st in _latency_stats(s):
            out.append(_row([name, str(st.n)] + [_f(v) for v in (
                st.mean, st.std, st.min, st.p50, st.p90, st.p95, st.p99, st.max)]))
        out.append("")
    return "\n".join(out)


def _latency_stats(s: Summary) -> list[tuple[str, Stats]]:
    return [("TTFT ms", s.ttft_ms), ("ITL ms", s.itl_ms), ("E2E ms", s.e2e_ms),
            ("token gap ms", s.token_gaps_ms)]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def compare(a: BenchReport, b: BenchReport) -> str:
    """Side by side for the concurrency levels both reports have, with B/A ratios."""
    out = ["# A vs B", "", f"Definitions: {DEFINITIONS}", ""]
    ma, mb = _method_of(a.levels[0].summary), _method_of(b.levels[0].summary)
    if ma != mb:
        out += [f"WARNING: percentile methods differ (A {ma}, B {mb}); percentiles are not "
                "comparable.", ""]
    else:
        out += [f"Percentiles: {ma}.", ""]
    differ = [k for k in sorted(a.metadata.keys() | b.metadata.keys())
              if a.metadata.get(k) != b.metadata.get(k)]
    out += ["Metadata that differs (one changed variable makes a clean comparison):", ""]
    out += [_row(["key", "A", "B"]), _row(["---"] * 3)]
    out += [_row([k, str(a.metadata.get(k, "-")), str(b.metadata.get(k, "-"))]) for k in differ]
    out.append("")
    la = {lv.concurrency: lv.summary for lv in a.levels}
    lb = {lv.concurrency: lv.summary for lv in b.levels}
    only_a, only_b = sorted(la.keys() - lb.keys()), sorted(lb.keys() - la.keys())
    if only_a or only_b:
        out += [f"Levels only in A: {only_a or '-'}; only in B: {only_b or '-'}.", ""]
    for c in sorted(la.keys() & lb.keys()):
        out += [f"## Concurrency {c}", "", _row(["metric", "A", "B", "B/A"]), _row(["---"] * 4)]
        for name, va, vb in _compared(la[c], lb[c]):
            ratio = vb / va if va and vb is not None else None
            out.append(_row([name, _f(va), _f(vb), _f(ratio)]))
        out.append("")
    return "\n".join(out)


def _compared(a: Summary, b: Summary) -> list[tuple[str, float | None, float | None]]:
    rows = [("output tok/s", a.output_tok_s, b.output_tok_s),
            ("requests/s", a.request_per_s, b.request_per_s),
            ("per-user tok/s", a.per_user_tok_s, b.per_user_tok_s),
            ("failed requests", a.requests_failed, b.requests_failed)]
    for (name, sa), (_, sb) in zip(_latency_stats(a), _latency_stats(b), strict=True):
        rows += [(f"{name} n", sa.n, sb.n)]
        rows += [(f"{name} {q}", getattr(sa, q), getattr(sb, q)) for q in ("p50", "p90", "p99")]
    return rows


def plot(report: BenchReport, out_dir: str | Path) -> list[Path]:
    """Latency vs throughput across the sweep, and TTFT/ITL CDFs per level; PNGs via Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    written = []

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    points = [lv for lv in report.levels if lv.summary.output_tok_s is not None]
    for ax, attr, label in zip(fig.subplots(1, 2), ("ttft_ms", "itl_ms"),
                               ("p50 TTFT ms", "p50 ITL ms"), strict=True):
        xy = [(lv.summary.output_tok_s, getattr(lv.summary, attr).p50, lv.concurrency)
              for lv in points if getattr(lv.summary, attr).p50 is not None]
        ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o")
        for x, y, c in xy:
            ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4))
        ax.set(xlabel="output tok/s (all users)", ylabel=label, title=f"{label} vs throughput")
        ax.margins(0.15)
        ax.grid(True, alpha=0.3)
    written.append(_save(fig, out_dir / "latency_vs_throughput.png"))

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, attr, label in zip(fig.subplots(1, 2), ("ttft_ms", "itl_ms"), ("TTFT ms", "ITL ms"),
                               strict=True):
        for lv in report.levels:
            values = sorted(v for r in lv.records if r.ok and (v := getattr(r, attr)) is not None)
            if values:
                frac = [i / len(values) for i in range(len(values) + 1)]  # ECDF from 0 to 1
                ax.step([values[0], *values], frac, where="post",
                        label=f"c={lv.concurrency} (n={len(values)})")
        ax.set(xlabel=label, ylabel="fraction of requests", title=f"{label} CDF")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    written.append(_save(fig, out_dir / "ttft_itl_cdf.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes_atomic(path, buf.getvalue())
    return path
