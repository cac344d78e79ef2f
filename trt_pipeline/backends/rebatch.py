"""KV-cache rows for in-flight batching: keep some rows of a batch's cache, or join caches.

Every CPU runtime keeps per-layer keys and values [B, n_kv, T, D] and `valid` [B, T], with
positions taken from the running count of valid tokens (not the column), so rows of different
lengths share one cache by left padding: joining pads the shorter caches on the left with masked
zeros, and dropping rows trims the columns no remaining row uses. A row's real tokens are
contiguous and end at the last column, so T never exceeds the longest remaining row.

Written once over the array operations the runtimes differ in (torch for the reference model,
numpy for ONNX Runtime's fetched outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

A = TypeVar("A")


@dataclass(frozen=True)
class Rows(Generic[A]):
    """One cache as plain arrays: keys and values per layer, and valid [B, T]."""

    keys: list[A]
    values: list[A]
    valid: A


@dataclass(frozen=True)
class ArrayOps(Generic[A]):
    cat: Callable[[Sequence[A], int], A]  # concatenate along an axis
    zeros: Callable[[tuple[int, ...], A], A]  # zeros of a shape, with the dtype of an array


def keep_rows(c: Rows[A], rows: Sequence[int]) -> Rows[A]:
    """Rows `rows` (in that order), without the leading columns none of them uses."""
    idx = list(rows)
    valid = c.valid[idx]
    used = valid.any(0)
    first = int(used.nonzero()[0][0]) if bool(used.any()) else valid.shape[1]
    return Rows([k[idx][:, :, first:] for k in c.keys], [v[idx][:, :, first:] for v in c.values],
                valid[:, first:])


def join_rows(parts: Sequence[Rows[A]], ops: ArrayOps[A]) -> Rows[A]:
    """One cache holding the rows of every part in order, left-padded to the longest."""
    t = max(p.valid.shape[1] for p in parts)
    padded = [_pad_left(p, t, ops) for p in parts]
    layers = range(len(parts[0].keys))
    return Rows([ops.cat([p.keys[i] for p in padded], 0) for i in layers],
                [ops.cat([p.values[i] for p in padded], 0) for i in layers],
                ops.cat([p.valid for p in padded], 0))


def _pad_left(p: Rows[A], t: int, ops: ArrayOps[A]) -> Rows[A]:
    b, short = p.valid.shape[0], t - p.valid.shape[1]
    if short == 0:
        return p

    def pad(x: Any) -> A:
        return ops.cat([ops.zeros((b, x.shape[1], short, x.shape[3]), x), x], 2)

    return Rows([pad(k) for k in p.keys], [pad(v) for v in p.values],
                ops.cat([ops.zeros((b, short), p.valid), p.valid], 1))
