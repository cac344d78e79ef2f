"""The OpenAI-compatible server over real HTTP on 127.0.0.1, serving the default model through
both CPU runtimes: a real ONNX engine built by the pipeline (ONNX Runtime) and the checkpoint the
pipeline converted (the reference model). Outputs equal the runner's greedy ones, streamed or
not, alone or batched; bad requests get OpenAI-shaped 4xx errors; a client that hangs up
mid-stream harms nobody."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from trt_pipeline.runner import Runner, SamplingParams

REPO = Path(__file__).resolve().parents[1]
RECIPE = """\
name: served-default
model: {{source: {source}, dtype: float32}}
quantize: {{method: none}}
build: {{backend: onnx, target: cpu, max_batch_size: 8, max_input_len: 512, max_seq_len: 1024}}
runner: {{max_new_tokens: 16}}
"""


def build_served(root: Path) -> tuple[Path, Path]:
    """(ONNX engine dir, converted checkpoint dir) of the default model, through the pipeline."""
    from trt_pipeline.cache import Cache
    from trt_pipeline.executor import execute, resolve
    from trt_pipeline.plan import make_plan
    from trt_pipeline.recipe.load import load_recipe

    recipe = root / "served-default.yaml"
    recipe.write_text(RECIPE.format(source=REPO / "trt_pipeline" / "data" / "default_model"))
    plan, cache = make_plan(load_recipe(recipe)), Cache(root / "cache")
    engine = execute(plan, cache, root / "engines").engine_dir
    return engine, {r.spec.stage: r.dir for r in resolve(plan, cache)}["convert"]


class LiveServer:
    """uvicorn on a free loopback port in a daemon thread, stopped by the fixture."""

    def __init__(self, app: object) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, Path]:
    return build_served(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module", params=["onnxruntime", "reference"])
def runtime(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def engine_dir(runtime, served):
    """What the server opens: the engine dir, or the checkpoint dir (run by the reference)."""
    engine, checkpoint = served
    path = engine if runtime == "onnxruntime" else checkpoint
    assert Runner.open(path).info["runtime"] == runtime
    return path


@pytest.fixture(scope="module")
def live(engine_dir, runtime):
    from trt_pipeline.server import create_app

    # a checkpoint dir has no recipe name: that server is told the engine's, so every test
    # sends the same model id (the engine's comes from its manifest)
    name = None if runtime == "onnxruntime" else "served-default"
    server = LiveServer(create_app(engine_dir, model_name=name))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def runner(engine_dir):
    """A second Runner on the same engine: the reference answers, never shared with the server."""
    return Runner.open(engine_dir)


@pytest.fixture
def client(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def greedy(runner: Runner, ids: list[int], n: int) -> list[str]:
    """Per-token texts of the runner's own greedy, exact-length generation."""
    return [e.text for e in runner.generate([ids], SamplingParams(max_new_tokens=n,
                                                                  ignore_eos=True))]


def sse(lines) -> list[dict | str]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def scheduler_stats(client: httpx.Client) -> dict:
    return client.get("/health").json()["scheduler"]


def test_models_lists_the_recipe_name(client):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["served-default"]
    assert client.get("/health").json()["status"] == "ok"


def test_completion_equals_runner_greedy(client, runner):
    prompt = "ROMEO:\nWhat light"
    expected = greedy(runner, runner.encode(prompt), 20)
    body = client.post("/v1/completions", json={"model": "served-default", "prompt": prompt,
                                                "max_tokens": 20, "ignore_eos": True,
                                                "temperature": 0}).json()
    assert body["choices"][0]["text"] == "".join(expected)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(runner.encode(prompt)),
                             "completion_tokens": 20, "total_tokens": 20 + len(
                                 runner.encode(prompt))}


def test_stream_yields_one_chunk_per_token_and_usage(client, runner):
    ids = runner.encode("JULIET:\nO Romeo")
    expected = greedy(runner, ids, 12)
    with client.stream("POST", "/v1/completions", json={
            "prompt": ids, "max_tokens": 12, "min_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    tokens, usage = events[:-2], events[-2]
    assert [c["choices"][0]["text"] for c in tokens] == expected
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 11 + ["length"]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}


def test_chat_applies_the_template(client, runner):
    messages = [{"role": "system", "content": "Speak as a king."},
                {"role": "user", "content": "Who art thou?"}]
    ids = runner.apply_chat(messages)
    expected = greedy(runner, ids, 10)
    body = client.post("/v1/chat/completions", json={
        "messages": messages, "max_completion_tokens": 10, "ignore_eos": True}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "".join(expected)}
    assert body["usage"]["prompt_tokens"] == len(ids)
    # content parts, streamed: a role-only opening chunk, then one chunk per token
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": parts, "max_tokens": 10, "ignore_eos": True, "stream": True}) as r:
        events = sse(r.iter_lines())
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"]["content"] for e in events[1:-1]] == expected
    assert events[-1] == "[DONE]"


def test_concurrent_streams_are_batched_and_match_single_greedy(client, runner, live):
    prompts = ["ROMEO:", "To be, or not", "KING RICHARD III:\nNow is", "O", "What light",
               "Friends, Romans", "JULIET:\nAh me", "My lord"]
    lengths = [24, 9, 17, 30, 5, 21, 12, 26]
    expected = [greedy(runner, runner.encode(p), n) for p, n in zip(prompts, lengths, strict=True)]
    before = scheduler_stats(client)["batches"]
    start = threading.Barrier(len(prompts))

    def stream(i: int) -> list[str]:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            start.wait()
            with c.stream("POST", "/v1/completions", json={
                    "prompt": prompts[i], "max_tokens": lengths[i], "ignore_eos": True,
                    "stream": True}) as r:
                return [e["choices"][0]["text"] for e in sse(r.iter_lines())[:-1]]

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(stream, range(len(prompts))))
    assert got == expected
    stats = scheduler_stats(client)
    assert stats["largest_batch"] > 1  # they really shared batches
    assert stats["batches"] - before < len(prompts)


@pytest.mark.parametrize(("body", "status", "param"), [
    (b'{"prompt": "x", "max_tokens": 4', 400, None),
    (b"[1, 2]", 400, None),
    (b'{"prompt": "x", "model": "gpt-4"}', 404, "model"),
    (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 1024}', 400, "max_tokens"),
    (b'{"prompt": ""}', 400, "prompt"),
    (b'{"prompt": []}', 400, "prompt"),
    (b'{"prompt": [5, 999999]}', 400, "prompt"),
    (b'{"prompt": "x", "n": 2}', 400, "n"),
    (b'{"prompt": "x", "max_tokens": 8, "min_tokens": 3}', 400, "min_tokens"),
    (b'{"prompt": "x", "temprature": 0.5}', 400, "temprature"),
    (b'{"prompt": "x", "logprobs": 1}', 400, "logprobs"),
    (b'{"prompt": "x", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "x", "seed": -1, "temperature": 1}', 400, "seed"),
])
def test_bad_completion_requests_get_openai_errors(client, body, status, param):
    r = client.post("/v1/completions", content=body,
                    headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_bad_chat_requests_and_the_server_still_serves(client):
    for body, status in [({"messages": []}, 400),
                         ({"messages": [{"role": "wizard", "content": "hi"}]}, 400),
                         ({"messages": [{"role": "user", "content": ""}]}, 400),
                         ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                           "max_completion_tokens": 4}, 400),
                         ({"messages": [{"role": "user", "content": "hi"}], "model": "x"}, 404)]:
        assert client.post("/v1/chat/completions", json=body).status_code == status
    ok = client.post("/v1/chat/completions",
                     json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_client_disconnect_mid_stream_leaves_the_server_serving(client, runner, live):
    before = scheduler_stats(client)
    with httpx.Client(base_url=live.url, timeout=60) as c, c.stream(
            "POST", "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 1000,
                                             "ignore_eos": True, "stream": True}) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == 3:
                break  # hang up after three tokens: leaving the client closes the connection
    deadline = time.monotonic() + 20
    while (stats := scheduler_stats(client))["requests_cancelled"] == before["requests_cancelled"]:
        assert time.monotonic() < deadline, "the server never noticed the disconnect"
        time.sleep(0.05)
    assert stats["stopped_early"] == before["stopped_early"] + 1  # not 997 more decode steps
    ids = runner.encode("To be")
    body = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 8,
                                                "ignore_eos": True}).json()
    assert body["choices"][0]["text"] == "".join(greedy(runner, ids, 8))


def test_batch_window_lets_late_arrivals_share_a_batch(runner):
    from trt_pipeline.scheduler import BatchScheduler

    ids, params = runner.encode("ROMEO:"), SamplingParams(max_new_tokens=4, ignore_eos=True)
    for window_s, one_batch in ((0.0, False), (0.5, True)):
        finished = threading.Semaphore(0)
        with BatchScheduler(runner, batch_window_s=window_s) as scheduler:
            for _ in range(3):  # 50 ms apart: each finds the engine idle or done
                scheduler.submit(ids, params,
                                 lambda e, done=finished: e.finished and done.release())
                time.sleep(0.05)
            for _ in range(3):
                assert finished.acquire(timeout=30)
            assert (scheduler.stats.batches == 1) is one_batch


def test_unknown_routes_and_methods_get_openai_errors(client):
    for r, status in ((client.post("/v1/embeddings", json={}), 404),
                      (client.get("/v1/completions"), 405)):
        assert r.status_code == status
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_text_without_a_tokenizer_is_a_400_not_a_crash(served, tmp_path):
    """A checkpoint dir copied without its tokenizer: text prompts and chat are refused with
    the reason; token ids still generate."""
    import shutil

    from fastapi.testclient import TestClient

    from trt_pipeline.server import create_app

    bare = tmp_path / "bare"
    shutil.copytree(served[1], bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_*"))
    with TestClient(create_app(bare, model_name="m")) as c:
        text = c.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 2})
        chat = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        ids = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2})
    assert (text.status_code, text.json()["error"]["param"]) == (400, "prompt")
    assert (chat.status_code, chat.json()["error"]["param"]) == (400, "messages")
    assert "no tokenizer" in chat.json()["error"]["message"]
    assert ids.status_code == 200 and ids.json()["usage"]["completion_tokens"] == 2


def test_batching_mode_is_the_runtimes_unless_asked(engine_dir, client):
    """auto = in-flight on the CPU runtimes; `--batching static` is honoured."""
    from fastapi.testclient import TestClient

    from trt_pipeline.server import create_app

    assert scheduler_stats(client)["mode"] == "inflight"
    with TestClient(create_app(engine_dir, inflight=False)) as c:
        assert c.get("/health").json()["scheduler"]["mode"] == "static"
        body = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4,
                                               "ignore_eos": True}).json()
        assert body["usage"]["completion_tokens"] == 4
