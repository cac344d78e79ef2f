"""The bench harness on a real ONNX engine, in-process and over HTTP against our server: exact
record and token counts, warm-up sent but not recorded, seeded open-loop arrivals, and a sweep
report that survives its JSON round trip; the CLI commands write and compare reports."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from test_server import LiveServer, build_served

from trt_pipeline.bench import report as rep
from trt_pipeline.bench.cli_commands import bench
from trt_pipeline.bench.measure import arrival_offsets_s, measure, sweep
from trt_pipeline.bench.workload import Request, synthetic
from trt_pipeline.errors import BadInput
from trt_pipeline.runner import Runner


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(ONNX engine dir, converted checkpoint dir) of the default model."""
    return build_served(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def engine_dir(built):
    return built[0]


@pytest.fixture(scope="module")
def runner(engine_dir):
    return Runner.open(engine_dir)


@pytest.fixture(scope="module")
def live(engine_dir):
    from trt_pipeline.server import create_app

    server = LiveServer(create_app(engine_dir))
    yield server
    server.stop()


def workload(count: int = 5) -> list[Request]:
    """Different output lengths per request, so a count mixed up between requests shows."""
    return synthetic(count, 16, 6, 0.0, 3.0, 2048, seed=1)


def served(live) -> int:
    return httpx.get(f"{live.url}/health").json()["scheduler"]["requests_done"]


def check_exact(records, requests) -> None:
    assert [r.task_id for r in records] == [q.task_id for q in requests]
    for rec, q in zip(records, requests, strict=True):
        assert rec.ok, rec.error
        assert rec.output_tokens == q.output_tokens == len(rec.token_times_s)
        assert rec.input_tokens == len(q.input_ids)
        assert rec.start_s < rec.token_times_s[0]


def test_in_process_closed_loop_counts_are_exact(runner):
    requests = workload()
    check_exact(measure(runner, requests, concurrency=2, warmup=3), requests)
    records = measure(runner, requests, concurrency=1, warmup=0)
    check_exact(records, requests)
    # closed loop at 1: each request starts after the previous one's last token
    assert all(b.start_s >= a.token_times_s[-1] for a, b in zip(records, records[1:],
                                                                 strict=False))


def test_endpoint_counts_are_exact_and_warmup_is_sent_not_recorded(live):
    requests = workload()
    before = served(live)
    records = measure(live.url, requests, concurrency=3, warmup=2)
    check_exact(records, requests)
    assert served(live) - before == len(requests) + 2


def test_endpoint_chat_with_text_prompts(live):
    requests = [Request(i, p, None, 4 + i) for i, p in enumerate(["ROMEO:", "To be", "O"])]
    records = measure(live.url, requests, concurrency=3, warmup=0, api="chat")
    assert [r.output_tokens for r in records] == [4, 5, 6]
    assert all(r.ok and len(r.token_times_s) == r.output_tokens for r in records)


def test_open_loop_follows_the_seeded_schedule(live):
    offsets = arrival_offsets_s(6, rate=25.0, seed=3)
    assert offsets == arrival_offsets_s(6, rate=25.0, seed=3) != arrival_offsets_s(6, 25.0, 4)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    requests = synthetic(6, 8, 2, 0.0, 0.0, 2048, seed=0)
    records = measure(live.url, requests, concurrency=6, warmup=0, rate=25.0, seed=3)
    sent = [r.start_s - records[0].start_s for r in records]
    assert sent == pytest.approx(offsets, abs=0.03)


def test_failures_become_records_not_exceptions(runner, live):
    too_long = [Request(0, None, (5,) * 1000, 100)]
    for target in (runner, live.url):
        (record,) = measure(target, too_long, concurrency=1, warmup=0)
        assert not record.ok and "max_seq_len" in record.error and record.output_tokens == 0
    with pytest.raises(BadInput):
        measure(live.url, workload(), concurrency=1, api="chat")  # token ids, no text
    with pytest.raises(BadInput):
        measure(runner, workload(), concurrency=0)


def test_sweep_report_round_trips(runner, engine_dir, tmp_path):
    report = sweep(runner, workload(4), [1, 2], warmup=1, command="test sweep")
    assert [lv.concurrency for lv in report.levels] == [1, 2]
    assert all(lv.summary.requests_ok == 4 for lv in report.levels)
    meta = report.metadata
    assert meta["command"] == "test sweep" and meta["engine"] == "served-default"
    assert meta["backend"] == "onnx" and meta["runtime"] == "onnxruntime"
    assert len(meta["engine_key"]) == 20 and len(meta["engine_hash"]) == 20
    assert meta["tokens_sharing_a_chunk"] == 0 and meta["device"]["cpu"]
    assert meta["batching"] == "inflight"
    rep.write_json(report, tmp_path / "r.json")
    assert rep.load_json(tmp_path / "r.json") == report


def test_cli_bench_writes_reports_and_compares(engine_dir, live, tmp_path):
    cli = CliRunner()
    args = ["--isl", "8", "--osl", "3", "--requests", "3", "--warmup", "1", "--concurrency", "1,2"]
    a = cli.invoke(bench, [str(engine_dir), *args, "--out", str(tmp_path / "a")])
    assert a.exit_code == 0, a.output
    b = cli.invoke(bench, [str(engine_dir), "--endpoint", live.url, "--model", "served-default",
                           *args, "--out", str(tmp_path / "b")])
    assert b.exit_code == 0, b.output
    for out in ("a", "b"):
        assert {p.name for p in (tmp_path / out).iterdir()} == {
            "report.json", "report.md", "latency_vs_throughput.png", "ttft_itl_cdf.png"}
        assert str(tmp_path / out / "report.json") in (a.output + b.output)
    assert "## Concurrency 2" in a.output and "| TTFT ms | 3 |" in a.output
    assert rep.load_json(tmp_path / "b" / "report.json").metadata["batching"] == "inflight"
    c = cli.invoke(bench, ["--compare", str(tmp_path / "a" / "report.json"),
                           str(tmp_path / "b" / "report.json")])
    assert c.exit_code == 0 and "# A vs B" in c.output and "in-process runner" in c.output


def test_cli_bench_on_a_cached_checkpoint_runs_the_reference(built, tmp_path):
    """A stage's checkpoint dir (its manifest is a stage's, not an engine's) is benchmarked on
    the reference model and named by its cache key, the directory's name."""
    checkpoint = built[1]
    args = ["--isl", "8", "--osl", "3", "--requests", "2", "--warmup", "0"]
    done = CliRunner().invoke(bench, [str(checkpoint), *args, "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    meta = rep.load_json(tmp_path / "report.json").metadata
    assert meta["runtime"] == "reference" and meta["backend"] == "reference"
    assert meta["engine_key"] == checkpoint.name and len(meta["engine_hash"]) == 20


def test_metadata_names_the_runtime_that_ran_and_the_recipe(engine_dir, tmp_path):
    """An RTX engine benched on a CPU runs its ONNX fallback: the report says so."""
    import hashlib
    import json

    runner = Runner.open(engine_dir)
    runner.info["runtime"] = "stand-in"  # what a fallback runner reports
    meta = sweep(runner, workload(2), [1], warmup=0).metadata
    assert meta["runtime"] == "stand-in" and meta["built_for_runtime"] == "onnxruntime"
    recipe = (engine_dir / "recipe.yaml").read_bytes()
    assert meta["recipe_sha256"] == hashlib.sha256(recipe).hexdigest()
    assert json.loads((engine_dir / "manifest.json").read_text())["recipe"] == meta["engine"]


def test_roofline_on_the_target_gpu_and_not_on_a_cpu_fallback(engine_dir, tmp_path):
    """An engine that ran on its GPU runtime gets the target's decode ceiling from the planner's
    figures in its manifest (hand arithmetic below); a CPU run says why it has none."""
    import json
    import shutil

    from trt_pipeline.bench.measure import decode_roofline
    from trt_pipeline.bench.report import markdown

    rtx = Path(shutil.copytree(engine_dir, tmp_path / "rtx"))
    m = json.loads((rtx / "manifest.json").read_text())
    m.update(target="rtx3060-12gb", runtime={**m["runtime"], "max_batch_size": 4,
                                             "max_seq_len": 1000})
    m["metrics"]["memory_fit"] = {"estimate": {"weights_bytes": 400_000_000,
                                               "kv_cache_bytes": 4 * 1000 * 20_000}}
    (rtx / "manifest.json").write_text(json.dumps(m))
    requests = [Request(i, None, [1] * 100, 50) for i in range(3)]
    roof, why = decode_roofline(rtx, "tensorrt_rtx", requests)
    assert why is None and roof.bandwidth_gbs == 360 and roof.weight_bytes == 400e6
    assert roof.kv_bytes_per_token == 20_000 and roof.context_tokens == 125  # 100 + 50 / 2
    # batch 1: 360e9 / (400e6 + 125 * 20e3) B = 894.4 tok/s
    assert roof.bandwidth_gbs * 1e9 / (roof.weight_bytes + 125 * 20_000) == pytest.approx(894.41,
                                                                                         abs=0.01)
    assert decode_roofline(rtx, "onnxruntime", requests) == (
        None, "not computed: onnxruntime ran it on this host, not the target GPU")

    runner = Runner.open(engine_dir)
    runner.info.update(runtime="tensorrt_rtx", path=str(rtx))
    report = sweep(runner, workload(2), [1], warmup=0)
    assert report.roofline is not None and "% of ceiling" in markdown(report)
    cpu = sweep(Runner.open(engine_dir), workload(2), [1], warmup=0)
    assert cpu.roofline is None and cpu.metadata["roofline"].startswith("not computed")
