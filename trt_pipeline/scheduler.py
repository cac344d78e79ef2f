"""Batching over one Runner, for the server and the in-process bench alike (so the bench measures
the scheduling the server does).

In-flight (runtimes whose KV cache can drop and join rows: the reference model and ONNX Runtime,
runner/inflight.py): between two decode steps, waiting requests (up to max_batch_size running)
are prefilled and join the batch; finished and cancelled ones leave it at once.

Static (the others: TensorRT for RTX's fixed cache buffers, TensorRT-LLM's executor): a
scheduler thread takes every waiting request (up to max_batch_size) when the previous batch
ends, runs them as one `runner.generate` batch; requests arriving meanwhile wait for the next.

Each request gets its TokenEvents through its own `sink`, called on the scheduler thread; a sink
must be quick (it runs between decode steps of the whole batch) and must not raise. A request that
fails gets the exception instead of an event, once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from .errors import BadInput, Problem
from .runner import Runner, SamplingParams, TokenEvent
from .runner.inflight import InflightBatch, can_rebatch

log = logging.getLogger(__name__)

Sink = Callable[[TokenEvent | BaseException], None]


class Ticket:
    """One submitted request. `cancel()` is safe from any thread: a waiting request never runs, a
    running one gets no more events, and a batch whose live requests are all cancelled stops."""

    def __init__(self, prompt: list[int], params: SamplingParams, sink: Sink) -> None:
        self.prompt = prompt
        self.params = params
        self.sink = sink
        self.cancelled = False
        self.finished = False
        self.failed = False
        self.arrived = time.monotonic()

    def cancel(self) -> None:
        if not self.finished:
            self.cancelled = True


@dataclasses.dataclass
class SchedulerStats:
    """Counters for /health and tests: how much batching actually happened. `batches`: batches
    run (static) or prefills that joined the running batch (in-flight); `largest_batch`: most
    requests decoding together."""

    mode: str = "static"
    batches: int = 0
    requests_done: int = 0  # answered to the end
    requests_failed: int = 0  # ended by an error
    requests_cancelled: int = 0
    largest_batch: int = 0
    stopped_early: int = 0  # decoding cut short for cancelled requests (static: whole batches)
    waiting: int = 0
    running: int = 0


class BatchScheduler:
    """Owns the thread that calls `runner.generate`; the runner is not used from anywhere else."""

    def __init__(self, runner: Runner, max_batch_size: int | None = None,
                 batch_window_s: float = 0.0, inflight: bool | None = None) -> None:
        """When the engine is idle, a batch starts once `max_batch_size` requests wait or the
        oldest has waited `batch_window_s` (Triton's max_queue_delay). Closed-loop HTTP clients
        re-send when their answers end, a millisecond or more apart; with static batching and no
        window the first re-sent request starts a batch alone and the rest wait for all its
        decode steps. `inflight`: None = whenever the runtime can. Default: the runtime's
        max_batch_size and no window (no added latency)."""
        limit = runner.model.max_batch_size
        problems = []
        if max_batch_size is not None and max_batch_size < 1:
            problems.append(Problem("max_batch_size", f"got {max_batch_size}; expected >= 1"))
        if not 0 <= batch_window_s <= 10:
            problems.append(Problem("batch_window_s", f"got {batch_window_s}; expected 0..10"))
        if inflight and not can_rebatch(runner.model):
            problems.append(Problem("inflight", f"the {runner.model.runtime} runtime cannot add "
                                    "requests to a running batch", "Use static batching."))
        if problems:
            raise BadInput(problems)
        self.inflight = can_rebatch(runner.model) if inflight is None else inflight
        self.runner = runner
        self.max_batch_size = min(limit, max_batch_size) if max_batch_size else limit
        self.batch_window_s = batch_window_s
        self._waiting: deque[Ticket] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._running = 0
        self._stats = SchedulerStats(mode="inflight" if self.inflight else "static")
        self._thread: threading.Thread | None = None

    def start(self) -> BatchScheduler:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="batch-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the current decode step; requests not finished get a RuntimeError."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> BatchScheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stats(self) -> SchedulerStats:
        with self._wake:
            s = self._stats
            return dataclasses.replace(s, waiting=len(self._waiting), running=self._running)

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """The runner's own limits, checked per request here so one bad request never fails the
        batch it would have joined (runner.generate rejects a whole batch)."""
        model = self.runner.model
        if not prompt:
            raise BadInput([Problem("prompt", "empty prompt", "Send at least one token.")])
        bad = [t for t in prompt if not 0 <= t < model.vocab_size]
        if bad:
            raise BadInput([Problem("prompt", f"token id {bad[0]} is outside the vocabulary "
                                    f"[0, {model.vocab_size})", None)])
        if len(prompt) + params.max_new_tokens > model.max_seq_len:
            raise BadInput([Problem("max_tokens", f"prompt ({len(prompt)} tokens) + max_tokens "
                                    f"({params.max_new_tokens}) exceeds the engine's max_seq_len "
                                    f"{model.max_seq_len}", "Lower max_tokens or the prompt.")])

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Sink) -> Ticket:
        """Queue a request for the next batch; raises BadInput (nothing queued) if it cannot run."""
        self.check(prompt, params)
        ticket = Ticket(list(prompt), params, sink)
        with self._wake:
            if self._stopping or self._thread is None:
                raise RuntimeError("the batch scheduler is not running")
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    def _take(self, running: int = 0) -> list[Ticket] | None:
        """Waiting requests to start (None when stopping). With nothing running it waits for a
        request and the batch window; beside `running` in-flight requests it takes what waits."""
        with self._wake:
            while True:
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft()
                    self._stats.requests_cancelled += 1
                if self._stopping:
                    return None
                if running or (self._waiting and self._window_closed()):
                    break
                self._wake.wait(self._window_left())
            batch = []
            while self._waiting and running + len(batch) < self.max_batch_size:
                t = self._waiting.popleft()
                if t.cancelled:
                    self._stats.requests_cancelled += 1
                else:
                    batch.append(t)
            self._running = running + len(batch)
            self._stats.batches += bool(batch)
            self._stats.largest_batch = max(self._stats.largest_batch, self._running)
            return batch

    def _window_left(self) -> float | None:
        if not self._waiting:
            return None
        return max(0.0, self._waiting[0].arrived + self.batch_window_s - time.monotonic())

    def _window_closed(self) -> bool:
        return len(self._waiting) >= self.max_batch_size or self._window_left() == 0.0

    def _loop(self) -> None:
        if self.inflight:
            self._loop_inflight()
            return
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except Exception as exc:  # a runtime failure fails its batch, not the server
                log.exception("batch of %d failed", len(batch))
                for t in batch:
                    if not t.finished:
                        _deliver(t, exc)
            finally:
                with self._wake:
                    self._running = 0
                    self._stats.requests_done += sum(t.finished and not (t.cancelled or t.failed)
                                                     for t in batch)
                    self._stats.requests_failed += sum(t.failed and not t.cancelled
                                                       for t in batch)
                    self._stats.requests_cancelled += sum(t.cancelled for t in batch)
        self._fail_waiting()

    def _loop_inflight(self) -> None:
        batch = InflightBatch(self.runner)
        running: dict[int, Ticket] = {}  # by id(ticket), the key of its row
        while (new := self._take(len(batch))) is not None:
            gone = [k for k, t in running.items() if t.cancelled]
            if gone:
                batch.drop(gone)
                for k in gone:
                    del running[k]
                with self._wake:
                    self._stats.requests_cancelled += len(gone)
                    self._stats.stopped_early += len(gone)
            try:
                if new:
                    running.update((id(t), t) for t in new)
                    self._deliver_all(running, batch.add([id(t) for t in new],
                                                         [t.prompt for t in new],
                                                         [t.params for t in new]))
                self._deliver_all(running, batch.step())
            except Exception as exc:  # a runtime failure fails the running requests only
                log.exception("in-flight batch of %d failed", len(running))
                for t in running.values():
                    _deliver(t, exc)
                with self._wake:
                    self._stats.requests_failed += len(running)
                running.clear()
                batch = InflightBatch(self.runner)
            with self._wake:
                self._running = len(batch)
        for t in running.values():
            _deliver(t, RuntimeError("the server is shutting down"))
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        with self._wake:
            left, self._waiting = list(self._waiting), deque()
            self._running = 0
        for t in left:
            _deliver(t, RuntimeError("the server is shutting down"))

    def _deliver_all(self, running: dict[int, Ticket], events: list[TokenEvent]) -> None:
        done = cancelled = 0
        for event in events:
            t = running[event.request]
            if not t.cancelled:
                t.finished = event.finished
                _deliver(t, event)
            if event.finished:
                del running[event.request]
                done += not t.cancelled
                cancelled += t.cancelled
        if done or cancelled:
            with self._wake:
                self._stats.requests_done += done
                self._stats.requests_cancelled += cancelled

    def _run(self, batch: list[Ticket]) -> None:
        events = self.runner.generate([t.prompt for t in batch], [t.params for t in batch])
        unfinished = set(range(len(batch)))
        try:
            for event in events:
                t = batch[event.request]
                if event.finished:
                    unfinished.discard(event.request)
                if not t.cancelled:
                    t.finished = event.finished
                    _deliver(t, event)
                # Stopping early is the only saving a static batch offers: once no unfinished
                # request wants tokens, the batch's remaining decode steps are skipped.
                elif all(batch[i].cancelled for i in unfinished):
                    with self._wake:
                        self._stats.stopped_early += 1
                    break
                if self._stopping:
                    break
        finally:
            events.close()
        for i in unfinished:
            if self._stopping and not batch[i].cancelled:
                _deliver(batch[i], RuntimeError("the server is shutting down"))


def _deliver(ticket: Ticket, item: TokenEvent | BaseException) -> None:
    try:
        ticket.sink(item)
    except Exception:  # a broken consumer loses its own request only
        log.exception("a request's sink failed; cancelling that request")
        ticket.cancel()
    if isinstance(item, BaseException):
        ticket.finished = ticket.failed = True
