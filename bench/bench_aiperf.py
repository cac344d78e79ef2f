"""Cross-check the bench harness against NVIDIA AIPerf 0.13 on the same server and the same prompts.

    python3 -m venv /work/aiperf-venv && /work/aiperf-venv/bin/pip install aiperf==0.13.0
    python bench/bench_aiperf.py [--aiperf /work/aiperf-venv/bin/aiperf] [--concurrency 1,4]
        [--requests 32] [--warmup 4] [--isl 128,480] [--osl 64] [--reps 3] [--batch-window-ms 20]
        [--batching auto|inflight|static] [--work /tmp/trtp-bench-aiperf]

Per prompt length and concurrency level: starts `trt_pipeline.server` on 127.0.0.1 (a child
process pinned to one core, max_batch_size = the level) with the default model's ONNX engine;
runs AIPerf (completions, streaming, ignore_eos, greedy, server token counts) and then our
harness (`measure` over HTTP) with the exact prompts AIPerf sent, in its order (its inputs.json
and profile_export.jsonl), both on the other cores. Prints TTFT and ITL medians of both, their
ratio (target: within 10 %) and how many requests each batch start (static) or joining prefill
(in-flight) took, from the server's scheduler counters.

Definitions (both per request, medians over requests; numpy-linear percentiles in both):
  TTFT  AIPerf: first chunk with non-empty text - just before aiohttp sends (after it has made
        the request's session; aiperf/transports/aiohttp_client.py), in a worker process.
        Ours: first token chunk (even empty text) - just before httpx sends.
        Each tool adds its own fixed per-request cost to the server's TTFT (AIPerf's worker
        shares its core with ~7 more AIPerf processes); at ISL 128 on the tiny default model
        (TTFT ~6 ms) that cost shows, at ISL 480 (~21 ms) it is a few percent.
  ITL   AIPerf: (last non-empty chunk - first non-empty chunk) / (OSL - 1), OSL from the usage
        chunk (--use-server-token-count; otherwise it re-tokenises the text, which can differ).
        Ours: (t_n - t_1)/(n - 1) over token chunks, n from usage. Same formula; they differ only
        when a first or last token decodes to no text.
Load: both are closed loops, but a tool re-sends only after its own bookkeeping (AIPerf passes a
credit between ~8 processes). With static batching (--batching static) re-sends that miss the
batch window wait a whole batch, so at concurrency > 1 the two tools can offer the server
different batches; the requests per batch start printed beside the latencies show when they did.
In-flight batching (the default on ONNX Runtime) admits each re-send at the next step.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from bench_harness_overhead import default_onnx_engine

from trt_pipeline.bench.cli_commands import INFLIGHT

SERVE = ("from trt_pipeline.server import serve; serve({engine!r}, '127.0.0.1', {port}, "
         "max_batch_size={batch}, batch_window_s={window}, inflight={inflight})")
CORES = sorted(os.sched_getaffinity(0))
# Server on the first core, every client on the others: on a 2-core host AIPerf's ~8 processes
# would otherwise take CPU from the decode they are timing, and ours (one process) less so.
SERVER_CORES, CLIENT_CORES = ({CORES[0]}, set(CORES[1:])) if len(CORES) > 1 else (None, None)


def pin(cores: set[int] | None) -> None:
    if cores:
        os.sched_setaffinity(0, cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine: Path, port: int, batch: int, window_s: float, log: Path,
                 inflight: bool | None = None) -> subprocess.Popen:
    code = SERVE.format(engine=str(engine), port=port, batch=batch, window=window_s,
                        inflight=inflight)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, preexec_fn=lambda: pin(SERVER_CORES))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the server did not come up in 120 s; see {log}")


def run_aiperf(aiperf: str, url: str, model: str, engine: Path, out: Path, concurrency: int,
               isl: int, args: argparse.Namespace) -> tuple[list[str], dict[str, list[float]], str]:
    """AIPerf's profiled prompts in send order, its per-request TTFT and ITL (ms), and the
    command it ran."""
    cmd = [aiperf, "profile", "--url", url, "--endpoint-type", "completions", "--streaming",
           "--model", model, "--tokenizer", str(engine), "--concurrency", str(concurrency),
           "--request-count", str(args.requests), "--warmup-request-count", str(args.warmup),
           "--isl", str(isl), "--osl", str(args.osl), "--extra-inputs", "ignore_eos:true",
           "--extra-inputs", "temperature:0", "--random-seed", str(args.seed),
           "--use-server-token-count", "--artifact-dir", str(out), "--ui-type", "none",
           "--no-gpu-telemetry", "--no-server-metrics", "--workers-max", "1",
           "--record-processors", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                          preexec_fn=lambda: pin(CLIENT_CORES))
    if done.returncode:
        raise RuntimeError(f"aiperf failed ({done.returncode}):\n{done.stdout[-3000:]}"
                           f"\n{done.stderr[-3000:]}")
    sessions = {s["session_id"]: s["payloads"][0]["prompt"]
                for s in json.loads((out / "inputs.json").read_text())["data"]}
    records = [json.loads(line) for line in (out / "profile_export.jsonl").read_text().splitlines()
               if line.strip()]
    profiled = sorted((r for r in records if r["metadata"].get("benchmark_phase") == "profiling"),
                      key=lambda r: r["metadata"]["request_start_ns"])
    prompts = [sessions[r["metadata"]["conversation_id"]] for r in profiled]
    values = {k: [r["metrics"][k]["value"] for r in profiled if k in r["metrics"]]
              for k in ("time_to_first_token", "inter_token_latency")}
    return prompts, {"TTFT": values["time_to_first_token"],
                     "ITL": values["inter_token_latency"]}, shlex.join(cmd)


def runs(values: list[list[float]]) -> str:
    """n, then each run's own median: their spread is the machine's noise."""
    per_run = " ".join(f"{statistics.median(v):.3f}" for v in values)
    return f"{sum(len(v) for v in values)}; {per_run}"


def batches(url: str) -> int:
    return httpx.get(f"{url}/health", timeout=10).json()["scheduler"]["batches"]


def run_ours(url: str, model: str, prompts: list[str], concurrency: int,
             args: argparse.Namespace) -> list:
    from trt_pipeline.bench.measure import measure
    from trt_pipeline.bench.workload import Request

    requests = [Request(i, p, None, args.osl) for i, p in enumerate(prompts)]
    records = measure(url, requests, concurrency, warmup=args.warmup, model=model,
                      timeout_s=args.timeout)
    failed = [r.error for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of our requests failed: {failed[0]}")
    return records


def compare(engine: Path, model: str, c: int, isl: int, args: argparse.Namespace,
            commands: list[str]) -> tuple[dict[str, list], dict[str, list]]:
    """One server at concurrency `c`; AIPerf and ours alternate on it (ABBA). Per tool: TTFT and
    ITL values of each run, and the batches each run made the server run."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(engine, port, c, args.batch_window_ms / 1e3,
                          args.work / f"server-c{c}-isl{isl}.log", INFLIGHT[args.batching])
    theirs: dict[str, list] = {"TTFT": [], "ITL": [], "batches": []}  # one entry per run
    ours: dict[str, list] = {"TTFT": [], "ITL": [], "batches": []}
    prompts: list[str] = []
    try:
        for rep in range(args.reps):  # ABBA: AIPerf first in even reps (it makes the prompts)
            for tool in ("aiperf", "ours") if rep % 2 == 0 else ("ours", "aiperf"):
                before = batches(url)
                if tool == "aiperf":
                    prompts, got, cmd = run_aiperf(args.aiperf, url, model, engine,
                                                   args.work / f"aiperf-c{c}-isl{isl}-{rep}",
                                                   c, isl, args)
                    commands.append(cmd)
                    theirs["TTFT"].append(got["TTFT"])
                    theirs["ITL"].append(got["ITL"])
                else:
                    records = run_ours(url, model, prompts, c, args)
                    ours["TTFT"].append([r.ttft_ms for r in records])
                    ours["ITL"].append([r.itl_ms for r in records])
                (theirs if tool == "aiperf" else ours)["batches"].append(batches(url) - before)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return theirs, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aiperf", default="/work/aiperf-venv/bin/aiperf")
    ap.add_argument("--work", type=Path, default=Path("/tmp/trtp-bench-aiperf"))
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--isl", default="128,480",
                    help="Prompt lengths (comma-separated). TTFT is ~6 ms at 128 on the tiny "
                         "default model, where each tool's fixed per-request cost shows; the "
                         "engine's max_input_len is 512.")
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-window-ms", type=float, default=20.0,
                    help="The server's batch window (scheduler.py). With max_batch_size = the "
                         "level it closes as soon as every client has re-sent, so both tools "
                         "offer full batches; 0 shows how their re-send timing differs.")
    ap.add_argument("--batching", choices=list(INFLIGHT), default="auto",
                    help="The server's batching (scheduler.py); auto = in-flight on ONNX Runtime.")
    ap.add_argument("--reps", type=int, default=3, help="Runs per tool and level, ABBA.")
    ap.add_argument("--timeout", type=float, default=300.0, help="Seconds per tool run.")
    args = ap.parse_args()

    engine = default_onnx_engine(args.work)
    model = json.loads((engine / "manifest.json").read_text())["recipe"]
    pin(CLIENT_CORES)  # our harness, like AIPerf, stays off the server's core
    print("| ISL | concurrency | metric | AIPerf p50 (n; per-run p50s) | "
          "ours p50 (n; per-run p50s) | ours/AIPerf |")
    print("|---|---|---|---|---|---|")
    worst: dict[int, float] = {}
    commands: list[str] = []
    for isl in (int(v) for v in args.isl.split(",")):
        for c in (int(v) for v in args.concurrency.split(",")):
            theirs, ours = compare(engine, model, c, isl, args, commands)
            sent = (args.requests + args.warmup) * args.reps
            print(f"| {isl} | {c} | requests per batch start | "
                  f"{sent / sum(theirs['batches']):.2f} | "
                  f"{sent / sum(ours['batches']):.2f} | - |")
            for name in ("TTFT", "ITL"):
                a, b = (statistics.median(v for run in tool[name] for v in run)
                        for tool in (theirs, ours))
                worst[isl] = max(worst.get(isl, 0.0), abs(b / a - 1))
                print(f"| {isl} | {c} | {name} | {a:.3f} ({runs(theirs[name])}) | {b:.3f} "
                      f"({runs(ours[name])}) | {b / a:.3f} |")
    print(f"\nengine {engine}; server on cores {SERVER_CORES}, clients on {CLIENT_CORES}; "
          f"server max_batch_size = concurrency, {args.batching} batching, batch window "
          f"{args.batch_window_ms} ms; "
          f"{args.requests} requests per run after {args.warmup} warm-up, {args.reps} runs per "
          f"tool (ABBA), OSL {args.osl} exact; medians over requests (ms)")
    print("\n".join(f"AIPerf: {cmd}" for cmd in dict.fromkeys(
        c.replace(c.split("--artifact-dir ")[1].split()[0], "DIR") for c in commands)))
    for isl, w in worst.items():
        print(f"ISL {isl}: largest disagreement {100 * w:.1f} % (target <= 10 %): {w <= 0.10}")


if __name__ == "__main__":
    main()
