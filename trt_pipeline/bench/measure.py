"""Drive a Runner in-process, or an OpenAI-compatible endpoint, and record every token's arrival.

Load: closed loop (`concurrency` requests in flight; the next starts when one finishes, AIPerf's
`--concurrency`) or open loop (`rate` requests/s with seeded Poisson arrivals; `concurrency` then
caps requests in flight, sleep-then-gate without catch-up, as AIPerf). Warm-up requests run first,
at the same concurrency, and are not recorded. Output length is exact: every request asks for
`output_tokens` with EOS ignored, greedy, no stop strings.

Timestamps are `time.perf_counter()` seconds. In-process, a token's time is taken on the scheduler
thread the moment its TokenEvent is yielded, so the harness adds no delay to what it measures;
through the scheduler (scheduler.py) the bench batches exactly as the server does.

Over HTTP (plain HTTP/1.1 on asyncio streams, one connection per request, the clock started once
connected): the request asks for streaming with `stream_options.include_usage`, and a token's
time is the arrival of its SSE chunk. Token counts come from the server's usage (engine output
ids, not re-tokenised text). OpenAI's protocol does not say which chunk carried how many tokens:
if usage counts more tokens than chunks arrived, the extra tokens get the last chunk's time,
show up as token gaps of exactly 0, and are counted in the sweep's metadata
(`tokens_sharing_a_chunk`). Our server sends one chunk per token, so there it is 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..console import track
from ..errors import BadInput, Problem
from ..fsio import sha256_file
from ..manifest import (
    RECIPE_FILE,
    host_name,
    is_engine_dir,
    now_iso,
    package_versions,
    read_engine_manifest,
    read_manifest,
)
from ..runner import Runner, SamplingParams, TokenEvent
from ..runner.inflight import can_rebatch
from ..scheduler import BatchScheduler
from ..targets import TARGETS
from .metrics import RequestRecord
from .report import BenchLevel, BenchReport, Roofline
from .workload import Request

Api = Literal["completions", "chat"]
Send = Callable[[Request], Awaitable[RequestRecord]]


def arrival_offsets_s(count: int, rate: float, seed: int) -> list[float]:
    """Poisson arrivals: the first at 0, then exponential gaps of mean 1/rate from a seeded
    numpy Generator (vLLM's bench also sends its first request at once)."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=max(count - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:count]


def measure(target: Runner | str, requests: Sequence[Request], concurrency: int,
            warmup: int = 2, rate: float | None = None, seed: int = 0, *,
            api: Api = "completions", model: str | None = None, timeout_s: float = 600.0,
            max_batch_size: int | None = None, inflight: bool | None = None
            ) -> list[RequestRecord]:
    """One load level: a RequestRecord per request, in workload order (warm-up excluded).

    `target` is a Runner (run here, batched by a BatchScheduler of at most `max_batch_size`,
    in-flight where the runtime can unless `inflight` says otherwise) or
    the base URL of an OpenAI-compatible server (`http://host:port`; `api` picks completions or
    chat; `model` defaults to the server's first). Failed requests come back as records with
    `error` set; bad arguments raise BadInput before anything is sent.
    """
    _check_load(requests, concurrency, warmup, rate)
    if isinstance(target, Runner):
        with BatchScheduler(target, max_batch_size, inflight=inflight) as scheduler:
            if warmup:
                _in_process(scheduler, [requests[i % len(requests)] for i in range(warmup)],
                            concurrency, None, seed, timeout_s)
            return _in_process(scheduler, requests, concurrency, rate, seed, timeout_s)
    if api == "chat" and any(r.prompt is None for r in requests):
        raise BadInput([Problem("api", "chat requests need text prompts; this workload has "
                                "token ids", "Use api=completions, which accepts token ids.")])
    return asyncio.run(_over_http(target, requests, concurrency, warmup, rate, seed, api, model,
                                  timeout_s))


def _check_load(requests: Sequence[Request], concurrency: int, warmup: int,
                rate: float | None) -> None:
    problems = []
    if not requests:
        problems.append(Problem("requests", "no requests to send"))
    if concurrency < 1:
        problems.append(Problem("concurrency", f"got {concurrency}; expected >= 1"))
    if warmup < 0:
        problems.append(Problem("warmup", f"got {warmup}; expected >= 0"))
    if rate is not None and not rate > 0:
        problems.append(Problem("rate", f"got {rate}; expected requests/s > 0"))
    if problems:
        raise BadInput(problems)


async def _drive(send: Send, requests: Sequence[Request], concurrency: int, warmup: int,
                 rate: float | None, seed: int) -> list[RequestRecord]:
    if warmup:
        await _closed_loop(send, [requests[i % len(requests)] for i in range(warmup)],
                           concurrency)
    if rate is None:
        return await _closed_loop(send, requests, concurrency)
    offsets = arrival_offsets_s(len(requests), rate, seed)
    gate = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()

    async def arrive(i: int, r: Request) -> RequestRecord:
        await asyncio.sleep(max(0.0, t0 + offsets[i] - time.perf_counter()))
        async with gate:
            return await send(r)

    return list(await asyncio.gather(*(arrive(i, r) for i, r in enumerate(requests))))


async def _closed_loop(send: Send, requests: Sequence[Request], concurrency: int
                       ) -> list[RequestRecord]:
    out: list[RequestRecord | None] = [None] * len(requests)
    todo = iter(enumerate(requests))

    async def worker() -> None:
        for i, r in todo:
            out[i] = await send(r)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return [r for r in out if r is not None]


def _in_process(scheduler: BatchScheduler, requests: Sequence[Request], concurrency: int,
                rate: float | None, seed: int, timeout_s: float) -> list[RequestRecord]:
    """Run one phase on the scheduler; returns when every request has its record.

    Closed loop: a finishing request's sink starts the next one on the scheduler thread, so the
    next batch begins with no thread hand-off (on a loaded 2-core host a thread wake-up costs
    up to a 5 ms time slice, 3 % of a short request; bench_harness_overhead.py). Open loop: this
    thread submits each request at its arrival time once the gate allows.
    """
    runner = scheduler.runner
    # Tokenised up front: encoding is not what is measured, and the tokenizer is then used by
    # the scheduler thread alone.
    prompts = [list(r.input_ids) if r.input_ids is not None else runner.encode(r.prompt or "")
               for r in requests]
    out: list[RequestRecord | None] = [None] * len(requests)
    lock, all_done = threading.Lock(), threading.Event()
    todo = iter(range(len(requests))) if rate is None else iter(())
    gate = threading.Semaphore(concurrency) if rate is not None else None
    left = [len(requests)]

    def record(i: int, rec: RequestRecord) -> None:
        out[i] = rec
        if gate is not None:
            gate.release()
        with lock:
            left[0] -= 1
            if left[0] == 0:
                all_done.set()

    def launch_next() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None or start(i):
                return

    def start(i: int) -> bool:
        r, ids = requests[i], prompts[i]
        params = SamplingParams(max_new_tokens=r.output_tokens, ignore_eos=True)
        times: list[float] = []

        def sink(item: TokenEvent | BaseException) -> None:
            if isinstance(item, BaseException):
                record(i, RequestRecord(r.task_id, sent, tuple(times), len(ids), len(times),
                                        f"{type(item).__name__}: {item}"))
            else:
                times.append(time.perf_counter())
                if not item.finished:
                    return
                record(i, RequestRecord(r.task_id, sent, tuple(times), len(ids), len(times)))
            launch_next()

        sent = time.perf_counter()
        try:
            scheduler.submit(ids, params, sink)
        except BadInput as exc:
            record(i, RequestRecord(r.task_id, sent, (), len(ids), 0, exc.render()))
            return False
        return True

    if gate is None:
        for _ in range(min(concurrency, len(requests))):
            launch_next()
    else:
        t0 = time.perf_counter()
        for i, offset in enumerate(arrival_offsets_s(len(requests), rate or 1.0, seed)):
            time.sleep(max(0.0, t0 + offset - time.perf_counter()))
            gate.acquire()
            start(i)
    if not all_done.wait(timeout_s):
        raise TimeoutError(f"the in-process run did not finish within {timeout_s} s")
    return [r for r in out if r is not None]


async def _over_http(url: str, requests: Sequence[Request], concurrency: int, warmup: int,
                     rate: float | None, seed: int, api: Api, model: str | None,
                     timeout_s: float) -> list[RequestRecord]:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise BadInput([Problem("endpoint", f"got {url!r}; expected http://HOST:PORT",
                                "The harness speaks plain HTTP/1.1 (local or tunnelled servers).")])
    host, port = parts.hostname, parts.port or 80
    prefix = parts.path.rstrip("/").removesuffix("/v1")
    if model is None:
        model = _first_model(f"http://{host}:{port}{prefix}")
    path = f"{prefix}/v1/chat/completions" if api == "chat" else f"{prefix}/v1/completions"

    async def send(r: Request) -> RequestRecord:
        start = time.perf_counter()
        times: list[float] = []
        try:
            return await asyncio.wait_for(_stream_one(host, port, path, api, model, r, times),
                                          timeout_s)
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError,
                _HttpStatus) as exc:
            return _failed(r, start, times, f"{type(exc).__name__}: {exc}"[:600])

    return await _drive(send, requests, concurrency, warmup, rate, seed)


def _server_batching(base: str) -> str:
    """Our server reports its scheduler's mode on /health; other servers: unknown."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=10) as resp:
            return str(json.loads(resp.read())["scheduler"]["mode"])
    except (OSError, KeyError, TypeError, ValueError):
        return "unknown"


def _first_model(base: str) -> str:
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as resp:
            return str(json.loads(resp.read())["data"][0]["id"])
    except (OSError, KeyError, IndexError, ValueError) as exc:
        raise BadInput([Problem("endpoint", f"cannot list models at {base}/v1/models ({exc})",
                                "Pass the model id (--model).")]) from None


class _HttpStatus(Exception):
    """A non-200 answer; its body (the server's error) is the message."""


async def _stream_one(host: str, port: int, path: str, api: Api, model: str, r: Request,
                      times: list[float]) -> RequestRecord:
    """One streamed request on a fresh connection; the clock starts once it is connected, as
    for a pooled connection. `times` collects token arrivals (the caller reports partial ones).

    Plain asyncio streams, not httpx: on this 2-core host httpx's layers put 3 ms between a
    chunk's arrival and its timestamp (TTFT 12.2 vs 8.9 ms at a raw socket); AIPerf's aiohttp
    is closer to the raw socket."""
    body: dict[str, Any] = {"model": model, "max_tokens": r.output_tokens, "ignore_eos": True,
                            "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": r.prompt}]
    else:
        body["prompt"] = list(r.input_ids) if r.input_ids is not None else r.prompt
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection(host, port)
    usage: dict[str, int] = {}
    try:
        start = time.perf_counter()
        writer.write(head + payload)  # one write: no wait between headers and body
        async for now, data in _sse_events(reader):
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return _failed(r, start, times, f"stream error: {chunk['error']}")
            usage = chunk.get("usage") or usage
            if _carries_token(chunk, api):
                times.append(now)
    finally:
        writer.close()
    return _record(r, start, times, usage)


async def _sse_events(reader: asyncio.StreamReader) -> AsyncIterator[tuple[float, bytes]]:
    """(arrival time, data) of each `data:` line of an HTTP/1.1 SSE response."""
    status = (await reader.readline()).split()
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip().lower()
    pieces = (_chunked(reader) if "chunked" in headers.get("transfer-encoding", "")
              else _until_eof(reader))
    if len(status) < 2 or status[1] != b"200":
        text = b"".join([d async for _, d in pieces]).decode(errors="replace")
        raise _HttpStatus(f"HTTP {b' '.join(status[1:]).decode()}: {text[:500]}")
    buf = b""
    async for now, data in pieces:
        buf = (buf + data).replace(b"\r\n", b"\n")
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    yield now, line[5:].strip()


async def _chunked(reader: asyncio.StreamReader) -> AsyncIterator[tuple[float, bytes]]:
    while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
        data = await reader.readexactly(size + 2)  # the chunk and its CRLF
        yield time.perf_counter(), data[:-2]
    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
        pass  # trailer fields, then the blank line that ends the message


async def _until_eof(reader: asyncio.StreamReader) -> AsyncIterator[tuple[float, bytes]]:
    while data := await reader.read(1 << 16):
        yield time.perf_counter(), data


def _carries_token(chunk: dict[str, Any], api: Api) -> bool:
    """A streamed chunk that holds generated output (possibly empty text): completions `text`,
    chat `delta.content` -- except the opening chat chunk that only announces the role."""
    choices = chunk.get("choices") or []
    if not choices:
        return False
    if api == "completions":
        return choices[0].get("text") is not None
    delta = choices[0].get("delta") or {}
    return delta.get("content") is not None and "role" not in delta


def _record(r: Request, start: float, times: list[float], usage: dict[str, int]
            ) -> RequestRecord:
    n = int(usage.get("completion_tokens", len(times)))
    prompt = int(usage.get("prompt_tokens", len(r.input_ids or ())))
    if not times:
        return _failed(r, start, times, "the stream carried no tokens")
    if n < len(times):
        return _failed(r, start, times, f"{len(times)} token chunks but usage counts {n} tokens")
    times += [times[-1]] * (n - len(times))  # tokens that shared the last chunk
    return RequestRecord(r.task_id, start, tuple(times), prompt, n)


def _failed(r: Request, start: float, times: list[float], error: str) -> RequestRecord:
    return RequestRecord(r.task_id, start, tuple(times), len(r.input_ids or ()), len(times),
                         error)


def sweep(target: Runner | str, requests: Sequence[Request], levels: Sequence[int],
          warmup: int = 2, rate: float | None = None, seed: int = 0, *,
          api: Api = "completions", model: str | None = None, timeout_s: float = 600.0,
          max_batch_size: int | None = None, engine_dir: str | Path | None = None,
          command: str | None = None) -> BenchReport:
    """`measure` at each concurrency level (warm-up repeated per level) into one BenchReport.

    `engine_dir` names the engine an endpoint serves, for the metadata (a Runner knows its own).
    """
    if not levels or len(set(levels)) != len(levels):
        raise BadInput([Problem("concurrency", f"got {list(levels)}; expected distinct levels")])
    out = []
    for c in track(levels, "bench levels", total=len(levels)):
        records = measure(target, requests, c, warmup, rate, seed, api=api, model=model,
                          timeout_s=timeout_s, max_batch_size=max_batch_size)
        out.append(BenchLevel.from_records(c, records))
    facts = engine_facts(Path(engine_dir)) if engine_dir else {"engine": "unknown"}
    if isinstance(target, Runner):
        facts = engine_facts(Path(target.info["path"]))
        if target.info["runtime"] != facts["runtime"]:  # e.g. an RTX engine's CPU fallback
            facts["built_for_runtime"] = facts["runtime"]
        facts["runtime"] = target.info["runtime"]  # what ran, not what the manifest names
    roofline, why_not = (decode_roofline(Path(target.info["path"]), target.info["runtime"],
                                         requests) if isinstance(target, Runner)
                         else (None, "not computed for an endpoint (its device is unknown here)"))
    if why_not:
        facts["roofline"] = why_not
    facts["batching"] = (("inflight" if can_rebatch(target.model) else "static")
                         if isinstance(target, Runner) else _server_batching(target))
    shared = sum(g == 0 for lv in out for r in lv.records for g in r.token_gaps_ms)
    metadata = {
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": now_iso(),
        "target": "in-process runner" if isinstance(target, Runner) else target,
        "api": "runner.generate" if isinstance(target, Runner) else f"{api}, streamed",
        **facts,
        "workload": _workload_facts(requests, warmup, rate, seed),
        "tokens_sharing_a_chunk": shared,
        "versions": package_versions(VERSIONED),
        "device": device_facts(),
        "host": host_name(),
    }
    return BenchReport(metadata=metadata, levels=tuple(out), roofline=roofline)


VERSIONED = ("trt-pipeline", "numpy", "torch", "transformers", "onnxruntime", "tensorrt-rtx-cu12",
             "tensorrt_llm")


GPU_RUNTIMES = ("tensorrt_rtx", "tensorrt_llm")


def decode_roofline(engine_dir: Path, runtime: str, requests: Sequence[Request]
                    ) -> tuple[Roofline | None, str | None]:
    """The decode ceiling of the engine's target GPU (benchmarking.md §7.3), from the planner's
    figures in its manifest: weights, and KV bytes per token = the KV cache over max batch x
    max seq. Only when the engine ran on a GPU runtime: a CPU fallback is not that device."""
    if runtime not in GPU_RUNTIMES:
        return None, f"not computed: {runtime} ran it on this host, not the target GPU"
    if not is_engine_dir(engine_dir):
        return None, "not computed: no engine manifest"
    m = read_engine_manifest(engine_dir)
    est = (m.metrics.get("memory_fit") or {}).get("estimate")
    target = TARGETS.get(m.target)
    rows = m.runtime.get("max_batch_size", 0) * m.runtime.get("max_seq_len", 0)
    if not est or target is None or not rows:
        return None, "not computed: the manifest has no memory estimate or known target"
    isl = [len(r.input_ids) for r in requests if r.input_ids is not None]
    osl = [r.output_tokens for r in requests]
    context = (float(np.mean(isl)) if isl else 0.0) + float(np.mean(osl)) / 2
    return Roofline(weight_bytes=est["weights_bytes"],
                    kv_bytes_per_token=est["kv_cache_bytes"] / rows, context_tokens=context,
                    bandwidth_gbs=target.bandwidth_gbs,
                    source=f"{target.name} {target.bandwidth_gbs} GB/s; weights and KV from the "
                           "planner's estimate in the manifest"), None


def engine_facts(engine_dir: Path) -> dict[str, Any]:
    """Which engine was measured: recipe, backend, runtime, the final stage's key, and one hash
    over every engine file's sha256 (from the manifest; a checkpoint dir, which the reference
    model runs, from its stage manifest if it is a cached artifact, else hashed here)."""
    runtime = "reference"
    if is_engine_dir(engine_dir):
        m = read_engine_manifest(engine_dir)
        files = [(f.path, f.sha256) for f in m.files]
        facts = {"engine": m.recipe, "backend": m.backend, "target_device": m.target,
                 "engine_key": m.stages[-1].key if m.stages else None,
                 "engine_versions": m.versions}
        runtime = str(m.runtime.get("kind"))
    elif (stage := read_manifest(engine_dir)) is not None:
        files = [(f.path, f.sha256) for f in stage.files]
        facts = {"engine": engine_dir.name, "backend": "reference", "engine_key": stage.key,
                 "engine_versions": stage.versions}
    else:
        files = [(p.relative_to(engine_dir).as_posix(), sha256_file(p))
                 for p in sorted(engine_dir.rglob("*")) if p.is_file()]
        facts = {"engine": engine_dir.name, "backend": "reference", "engine_key": None}
    digest = hashlib.sha256(json.dumps(files, separators=(",", ":")).encode()).hexdigest()
    recipe = engine_dir / RECIPE_FILE
    if recipe.is_file():  # the recipe as resolved at build time (extends and overrides applied)
        facts["recipe_sha256"] = sha256_file(recipe)
    return {**facts, "runtime": runtime, "engine_dir": str(engine_dir),
            "engine_hash": digest[:20]}


def device_facts() -> dict[str, Any]:
    """This host's CPU and GPUs (an endpoint's server may run elsewhere: then this is the
    client's)."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                   "--format=csv,noheader"], capture_output=True, text=True,
                                  timeout=10, check=True)
            gpus = [ln.strip() for ln in done.stdout.splitlines() if ln.strip()]
        except (OSError, subprocess.SubprocessError):
            gpus = ["nvidia-smi failed"]
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpus": gpus or ["none"],
            "os": platform.platform()}


def _workload_facts(requests: Sequence[Request], warmup: int, rate: float | None, seed: int
                    ) -> dict[str, Any]:
    isl = [len(r.input_ids) for r in requests if r.input_ids is not None]
    osl = [r.output_tokens for r in requests]
    return {"requests": len(requests), "warmup_requests": warmup,
            "load": f"poisson {rate} req/s, seed {seed}" if rate else "closed loop",
            "isl_tokens_mean": float(np.mean(isl)) if isl else "text prompts",
            "osl_tokens_mean": float(np.mean(osl)), "osl_exact": True,
            "sampling": "greedy, ignore_eos, no stop strings"}
