"""In-flight batching: requests join a running batch between decode steps and leave as they end.

With static batching a request that arrives one step after a batch started waits for all of
that batch's decode steps; here it waits for one prefill. Needs a runtime whose KV cache can drop
and join rows (`keep`/`join`, backends/rebatch.py); the others are batched statically.

Each step, every row feeds the token it sampled last; new requests are prefilled together as
their own left-padded batch, sample their first token, and their cache is joined to the
running one. Numerically a row sees the same tokens at the same positions as it would alone:
positions count valid tokens and padding is masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import Runner, SamplingParams, TokenEvent, _Stream, left_padded
from .step import StepModel


@runtime_checkable
class Rebatching(Protocol):
    """What a StepModel offers for in-flight batching."""

    def keep(self, cache: Any, rows: list[int]) -> Any:
        """The cache of `rows` only (in that order)."""

    def join(self, caches: list[Any]) -> Any:
        """One cache with the rows of every cache, in order."""


def can_rebatch(model: StepModel) -> bool:
    return isinstance(model, Rebatching)


class InflightBatch:
    """The running rows of one runner. `add` and `step` return the TokenEvents they produce;
    event.request is the key the row was added with. Not thread-safe: one owner calls it."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.model: Any = runner.model
        self.keys: list[Any] = []
        self.streams: list[_Stream] = []
        self.cache: Any = None

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: Sequence[Any], prompts: Sequence[Sequence[int]],
            params: Sequence[SamplingParams]) -> list[TokenEvent]:
        """Prefill the new requests together and sample their first tokens."""
        ids, valid = left_padded(prompts, self.runner.pad_id)
        cache = self.model.new_cache(len(prompts))
        logits = self.model.step(ids, cache, valid, last_only=True)[:, -1]
        streams = [_Stream(self.runner, list(p), q)
                   for p, q in zip(prompts, params, strict=True)]
        events = [s.advance(logits[i], keys[i]) for i, s in enumerate(streams)]
        live = [i for i, e in enumerate(events) if not e.finished]
        if live:
            new = cache if len(live) == len(prompts) else self.model.keep(cache, live)
            self.cache = new if not self.keys else self.model.join([self.cache, new])
            self.keys += [keys[i] for i in live]
            self.streams += [streams[i] for i in live]
        return events

    def step(self) -> list[TokenEvent]:
        """One decode step of every running row; finished rows leave the batch."""
        if not self.keys:
            return []
        ids = np.array([[s.out[-1]] for s in self.streams], dtype=np.int64)
        logits = self.model.step(ids, self.cache, np.ones_like(ids, dtype=bool),
                                 last_only=True)[:, -1]
        rows = zip(self.streams, self.keys, strict=True)
        events = [s.advance(logits[i], k) for i, (s, k) in enumerate(rows)]
        self.drop([k for k, e in zip(self.keys, events, strict=True) if e.finished])
        return events

    def drop(self, keys: Sequence[Any]) -> None:
        """Remove rows (finished or cancelled) and the cache columns only they used."""
        gone = set(keys)
        rows = [i for i, k in enumerate(self.keys) if k not in gone]
        if len(rows) == len(self.keys):
            return
        self.cache = self.model.keep(self.cache, rows) if rows else None
        self.keys = [self.keys[i] for i in rows]
        self.streams = [self.streams[i] for i in rows]
