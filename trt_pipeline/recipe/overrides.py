"""Parse and apply command-line overrides `a.b=value` and deletions `~a.b` to the raw dict."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import Problem

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True, slots=True)
class Override:
    key: str
    value: Any
    delete: bool
    text: str

    @property
    def where(self) -> str:
        return f"override {self.text}"


def parse_overrides(items: list[str] | tuple[str, ...]) -> tuple[list[Override], list[Problem]]:
    """Values parse as YAML, so `x=4` is an int and `x=[1,2]` a list, as in the file."""
    out: list[Override] = []
    problems: list[Problem] = []
    for text in items:
        delete = text.startswith("~")
        key, sep, raw = text[1:].partition("=") if delete else text.partition("=")
        if delete and sep:
            problems.append(Problem("", f"cannot delete and set at once: {text!r}",
                                    "Write ~key.path alone.", f"override {text}"))
            continue
        if not delete and not sep:
            problems.append(Problem("", f"not an override: {text!r}",
                                    "Write key.path=value, or ~key.path to delete.",
                                    f"override {text}"))
            continue
        key = key.strip()
        if not _KEY.match(key):
            problems.append(Problem(key, "not a dotted key path",
                                    "Write e.g. build.max_batch_size=4.", f"override {text}"))
            continue
        try:
            value = None if delete else yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problems.append(Problem(key, f"value {raw!r} is not valid YAML ({exc})", None,
                                    f"override {text}"))
            continue
        out.append(Override(key, value, delete, text))
    return out, problems


def apply_overrides(
    data: dict[str, Any], overrides: list[Override], origins: dict[str, str]
) -> list[Problem]:
    """Apply in order, recording each touched key's origin (sections an override creates and keys
    it deletes included, so errors about them point at it); unknown keys are left to validation."""
    problems: list[Problem] = []
    for ov in overrides:
        parts = ov.key.split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if ov.delete and part not in node:
                node = None
                break
            if part not in node:
                origins[".".join(parts[: i + 1])] = ov.where
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(Problem(".".join(parts[: i + 1]),
                                        f"is a {type(child).__name__}, not a section", None,
                                        ov.where))
                node = None
                break
            node = child
        if node is None:
            if ov.delete:
                problems.append(Problem(ov.key, "nothing to delete: key not set", None, ov.where))
            continue
        leaf = parts[-1]
        if ov.delete:
            if leaf not in node:
                problems.append(Problem(ov.key, "nothing to delete: key not set", None, ov.where))
                continue
            del node[leaf]
        else:
            node[leaf] = ov.value
        for k in [k for k in origins if k.startswith(ov.key + ".")]:
            del origins[k]  # what the file said below this key is gone
        origins[ov.key] = ov.where
    return problems
