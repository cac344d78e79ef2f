"""OpenAI-compatible HTTP server over one engine dir: completions and chat, streamed or not.

Clients (AIPerf, vLLM's bench, the OpenAI SDK, our own bench) drive the engine through the same
protocol they use against production servers. Concurrent requests are batched by the scheduler
(scheduler.py); each request's tokens reach its handler through its own asyncio queue.

Supported beyond the OpenAI fields: `top_k`, `repetition_penalty`, `ignore_eos` (vLLM's: the
engine's EOS does not end the request) and `min_tokens` (vLLM's) when it is 0 or equal to
`max_tokens`, which is how benchmarks ask for an exact output length; other values would need
EOS suppression the runner does not have, so they are refused. Omitted sampling fields take the
engine's defaults (its recipe's `runner:` section, else greedy), not OpenAI's temperature 1.
An omitted `max_tokens` is that default capped to the context left after the prompt.

Every stream sends one chunk per generated token (its text may be empty: a special token, or
bytes of a character not yet complete), so a client counting chunks counts tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import BadInput, did_you_mean
from .runner import Runner, SamplingParams, TokenEvent
from .runner.defaults import sampling_params
from .scheduler import BatchScheduler, Ticket

log = logging.getLogger(__name__)

# OpenAI fields this server knows and does not implement: named in the 400 instead of "unknown".
_UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "logit_bias", "suffix",
                "presence_penalty", "frequency_penalty", "tools", "tool_choice", "response_format",
                "user", "parallel_tool_calls", "stream_options.continuous_usage_stats")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: StrictStr | None = Field(None, description="Must be the served model's id if given.")
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0, description="Extension; 0 = off.")
    repetition_penalty: float | None = Field(None, gt=0, description="Extension.")
    seed: StrictInt | None = Field(None, ge=0)
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    ignore_eos: bool = False
    min_tokens: StrictInt = Field(0, ge=0)


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[Annotated[StrictInt, Field(ge=0)]] = Field(
        description="Text, or token ids (exact input length for benchmarks).")


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[TextPart]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="= max_tokens.")


class ApiError(Exception):
    """An OpenAI-shaped error response: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse({"error": {"message": self.message, "type": kind,
                                       "param": self.param, "code": self.code}}, self.status)


def _bad_input(exc: BadInput) -> ApiError:
    return ApiError(400, "; ".join(p.render() for p in exc.problems),
                    exc.problems[0].path if exc.problems else None)


class _Engine:
    """What the routes share: the runner, its scheduler, the model id and sampling defaults."""

    def __init__(self, engine_dir: Path, max_batch_size: int | None, batch_window_s: float,
                 model_name: str | None = None, inflight: bool | None = None) -> None:
        self.runner = Runner.open(engine_dir)
        self.scheduler = BatchScheduler(self.runner, max_batch_size, batch_window_s, inflight)
        self.model_id = model_name or str(self.runner.info.get("recipe")
                                          or Path(engine_dir).resolve().name)
        self.defaults = sampling_params(engine_dir, {})
        self.created = int(time.time())

    def parse(self, raw: bytes, schema: type[_Sampling]) -> Any:
        try:
            body = schema.model_validate_json(raw)
        except ValidationError as exc:
            raise ApiError(400, *_validation_message(exc, schema)) from None
        if body.model is not None and body.model != self.model_id:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves "
                           f"{self.model_id!r}", "model", "model_not_found")
        if body.n != 1:
            raise ApiError(400, f"n={body.n}: this server returns one choice per request; "
                           "send n=1 or omit it", "n")
        return body

    def params(self, body: _Sampling, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        d = self.defaults
        room = self.runner.model.max_seq_len - prompt_len
        if max_tokens is None:
            max_tokens = max(1, min(d.max_new_tokens, room))
        ignore_eos = body.ignore_eos
        if body.min_tokens not in (0, max_tokens):
            raise ApiError(400, f"min_tokens={body.min_tokens}: only 0 or max_tokens "
                           f"({max_tokens}, an exact output length) is supported", "min_tokens")
        stop = d.stop if body.stop is None else (
            (body.stop,) if isinstance(body.stop, str) else tuple(body.stop))
        if body.min_tokens:
            if body.stop:
                raise ApiError(400, "min_tokens = max_tokens asks for an exact length; a stop "
                               "string could end it early. Drop one of them.", "stop")
            ignore_eos, stop = True, ()  # the recipe's default stop strings too
        picked = {k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p),
                                    ("top_k", body.top_k), ("seed", body.seed),
                                    ("repetition_penalty", body.repetition_penalty))
                  if v is not None}
        return dataclasses.replace(d, max_new_tokens=max_tokens, stop=stop,
                                   ignore_eos=ignore_eos, **picked)

    def submit(self, ids: list[int], params: SamplingParams
               ) -> tuple[Ticket, asyncio.Queue[TokenEvent | BaseException]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        try:
            ticket = self.scheduler.submit(
                ids, params, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        except BadInput as exc:
            raise _bad_input(exc) from None
        return ticket, queue


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods in OpenAI's error shape, not FastAPI's {"detail"}."""
    what = {404: f"no route {request.url.path}; this server has /v1/completions, "
                 "/v1/chat/completions, /v1/models and /health",
            405: f"{request.method} is not allowed on {request.url.path}"}.get(
                exc.status_code, str(exc.detail))
    response = ApiError(exc.status_code, what).response()
    response.headers.update(exc.headers or {})
    return response


def _validation_message(exc: ValidationError, schema: type[BaseModel]) -> tuple[str, str | None]:
    parts, first = [], None
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        first = first or key or None
        if err["type"] == "json_invalid":
            return f"the body is not valid JSON ({err['ctx']['error']})", None
        if err["type"] == "extra_forbidden":
            why = ("an OpenAI field this server does not support" if key in _UNSUPPORTED else
                   f"unknown field. {did_you_mean(key, schema.model_fields)}".strip())
            parts.append(f"{key}: {why}")
        else:
            parts.append(f"{key}: {err['msg']}" if key else err["msg"])
    return "; ".join(parts), first


async def _tokens(ticket: Ticket, queue: asyncio.Queue[TokenEvent | BaseException]
                  ) -> AsyncIterator[TokenEvent]:
    """The request's events until it finishes; however the consumer stops, the request is
    cancelled, so a vanished client never holds the batch."""
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise ApiError(500, f"generation failed: {item}")
            yield item
            if item.finished:
                return
    finally:
        ticket.cancel()


class _EventStream(StreamingResponse):
    """A StreamingResponse that always closes its body iterator: under ASGI spec 2.4 servers a
    disconnect ends the response with an exception and the generator would only be closed by GC,
    leaving its request generating."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, events: AsyncIterator[TokenEvent]) -> list[TokenEvent] | None:
    """All events of a non-streamed request, or None if the client left first."""
    async def gather() -> list[TokenEvent]:
        return [e async for e in events]

    task, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


def create_app(engine_dir: str | Path, max_batch_size: int | None = None,
               batch_window_s: float = 0.0, model_name: str | None = None,
               inflight: bool | None = None) -> FastAPI:
    """The app for one engine dir; the scheduler thread runs while the app's lifespan does.
    `max_batch_size`, `batch_window_s` and `inflight` are the scheduler's (scheduler.py). The
    model id clients send is `model_name`, else the engine's recipe name, else the directory's
    name."""
    engine = _Engine(Path(engine_dir), max_batch_size, batch_window_s, model_name, inflight)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.scheduler.stop)

    app = FastAPI(title="build-engine serve", lifespan=lifespan)
    app.state.engine = engine
    app.add_exception_handler(ApiError, lambda _, exc: exc.response())  # type: ignore[arg-type]
    app.add_exception_handler(  # a request the engine cannot take (no tokenizer, no template)
        BadInput, lambda _, exc: _bad_input(exc).response())  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(
        Exception, lambda _, exc: ApiError(500, f"internal error: {exc!r}").response())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id,
                "scheduler": dataclasses.asdict(engine.scheduler.stats)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                            "created": engine.created, "owned_by": "trt-pipeline",
                                            "max_model_len": engine.runner.model.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body: CompletionRequest = engine.parse(await request.body(), CompletionRequest)
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise ApiError(400, "prompt: empty; send text or token ids", "prompt")
            ids = engine.runner.encode(body.prompt)
        else:
            ids = list(body.prompt)
        return await _respond(request, engine, body, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body: ChatRequest = engine.parse(await request.body(), ChatRequest)
        if body.max_tokens and body.max_completion_tokens and (
                body.max_tokens != body.max_completion_tokens):
            raise ApiError(400, "max_tokens and max_completion_tokens differ; send one",
                           "max_completion_tokens")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(p.text for p in m.content)} for m in body.messages]
        if not any(m["content"] for m in messages):
            raise ApiError(400, "messages: every message is empty", "messages")
        ids = engine.runner.apply_chat(messages)
        return await _respond(request, engine, body, ids,
                              body.max_completion_tokens or body.max_tokens, chat=True)

    return app


async def _respond(request: Request, engine: _Engine, body: _Sampling, ids: list[int],
                   max_tokens: int | None, chat: bool) -> Any:
    params = engine.params(body, max_tokens, len(ids))
    ticket, queue = engine.submit(ids, params)
    events = _tokens(ticket, queue)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": engine.model_id}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _EventStream(_stream(head, events, len(ids), chat, usage),
                            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    got = await _collect(request, events)
    if got is None:
        return JSONResponse({}, 499)  # nobody is listening; nginx's "client closed request"
    text, reason = "".join(e.text for e in got), got[-1].finish_reason
    choice = ({"index": 0, "message": {"role": "assistant", "content": text},
               "finish_reason": reason} if chat else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
    return {**head, "object": "chat.completion" if chat else "text_completion",
            "choices": [choice], "usage": _usage(len(ids), len(got))}


async def _stream(head: dict[str, Any], events: AsyncIterator[TokenEvent], prompt_len: int,
                  chat: bool, include_usage: bool) -> AsyncIterator[str]:
    n = 0
    if chat:  # OpenAI's first chat chunk carries the role and no token
        yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                               "content": ""},
                                         "finish_reason": None}]})
    try:
        async for e in events:
            n += 1
            choice = ({"index": 0, "delta": {"content": e.text}} if chat else
                      {"index": 0, "text": e.text, "logprobs": None})
            yield _sse({**head, "choices": [{**choice, "finish_reason": e.finish_reason}]})
    except ApiError as exc:
        yield _sse({"error": {"message": exc.message, "type": "server_error", "param": None,
                              "code": None}})
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(prompt_len, n)})
    yield "data: [DONE]\n\n"


def serve(engine_dir: str | Path, host: str = "127.0.0.1", port: int = 8080,
          max_batch_size: int | None = None, batch_window_s: float = 0.0,
          model_name: str | None = None, inflight: bool | None = None) -> None:
    """Run the server until interrupted. Access logs are off: stdout carries results only, and a
    log line per request would cost the benchmark it serves."""
    import uvicorn

    # Keep-alive longer than clients' own (httpx 5 s, aiohttp 15 s): a server closing an idle
    # connection as a client reuses it fails that request.
    uvicorn.run(create_app(engine_dir, max_batch_size, batch_window_s, model_name, inflight),
                host=host, port=port, access_log=False, log_level="info", timeout_keep_alive=75)
