"""Registries are data: one name -> item dict per concern, built here so duplicates are an error."""

from __future__ import annotations

from typing import Protocol, TypeVar


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


def registry(kind: str, *items: T) -> dict[str, T]:
    """{item.name: item} in order; a repeated name is our bug, raised at import."""
    out: dict[str, T] = {}
    for item in items:
        if item.name in out:
            raise ValueError(f"duplicate {kind} {item.name!r}")
        out[item.name] = item
    return out
