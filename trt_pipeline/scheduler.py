"""Static batching over one Runner: requests that wait together run as one `runner.generate` batch.

The runner batches with left padding and has no way to add a request to a running batch, so the
policy is the simplest one that keeps it busy: a scheduler thread takes every waiting request (up
to max_batch_size) when the previous batch ends; requests arriving meanwhile wait for the next one.
Both the server (per-token asyncio queues) and the in-process bench (timestamps) use it, so the
bench measures the scheduling the server does.

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
    """Counters for /health and tests: how much batching actually happened."""

    batches: int = 0
    requests_done: int = 0  # answered to the end
    requests_failed: int = 0  # ended by an error
    requests_cancelled: int = 0
    largest_batch: int = 0
    stopped_early: int = 0  # batches cut short because every unfinished request was cancelled
    waiting: int = 0
    running: int = 0


class BatchScheduler:
    """Owns the thread that calls `runner.generate`; the runner is not used from anywhere else."""

    def __init__(self, runner: Runner, max_batch_size: int | None = None,
                 batch_window_s: float = 0.0) -> None:
        """A batch starts once `max_batch_size` requests wait or the oldest has waited
        `batch_window_s` (Triton's max_queue_delay). Closed-loop HTTP clients re-send when their
        answers end, a millisecond or more apart; with no window the first re-sent request
        starts a batch alone and the rest wait for all its decode steps. Default: the runtime's
        max_batch_size and no window (no added latency)."""
        limit = runner.model.max_batch_size
        problems = []
        if max_batch_size is not None and max_batch_size < 1:
            problems.append(Problem("max_batch_size", f"got {max_batch_size}; expected >= 1"))
        if not 0 <= batch_window_s <= 10:
            problems.append(Problem("batch_window_s", f"got {batch_window_s}; expected 0..10"))
        if problems:
            raise BadInput(problems)
        self.runner = runner
        self.max_batch_size = min(limit, max_batch_size) if max_batch_size else limit
        self.batch_window_s = batch_window_s
        self._waiting: deque[Ticket] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._running = 0
        self._stats = SchedulerStats()
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

    def _take(self) -> list[Ticket] | None:
        with self._wake:
            while True:
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft()
                    self._stats.requests_cancelled += 1
                if self._stopping:
                    return None
                if self._waiting and self._window_closed():
                    break
                self._wake.wait(self._window_left())
            batch = []
            while self._waiting and len(batch) < self.max_batch_size:
                t = self._waiting.popleft()
                if t.cancelled:
                    self._stats.requests_cancelled += 1
                else:
                    batch.append(t)
            self._running = len(batch)
            self._stats.batches += 1
            self._stats.largest_batch = max(self._stats.largest_batch, len(batch))
            return batch

    def _window_left(self) -> float | None:
        if not self._waiting:
            return None
        return max(0.0, self._waiting[0].arrived + self.batch_window_s - time.monotonic())

    def _window_closed(self) -> bool:
        return len(self._waiting) >= self.max_batch_size or self._window_left() == 0.0

    def _loop(self) -> None:
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
        with self._wake:
            left, self._waiting = list(self._waiting), deque()
        for t in left:
            _deliver(t, RuntimeError("the server is shutting down"))

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
