"""What a stage is: a function of (input artifacts, params) -> an artifact dir, plus its key."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..manifest import package_versions

PKG_ROOT = Path(__file__).resolve().parents[1]
KEY_CHARS = 20


@dataclass(frozen=True)
class Artifact:
    """A complete stage output: its dir (for `source`, the model dir itself) and its key."""

    stage: str
    key: str
    dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """What a running stage gets: a fresh output dir, its inputs and params, a logger."""

    out: Path
    params: Any
    inputs: dict[str, Artifact]
    log: logging.Logger


@dataclass(frozen=True)
class Stage:
    """`run` writes files into ctx.out and returns metrics for the manifest. `code` lists the
    package paths whose source is hashed into the key; `vendors` the distributions whose versions
    are. A stage with `fingerprint` instead of `run` (the source) is resolved, not cached: its
    key is the fingerprint and its artifact dir is what it found."""

    name: str
    run: Callable[[StageContext], dict[str, Any]] | None
    code: tuple[str, ...]
    vendors: tuple[str, ...] = ()
    fingerprint: Callable[[Any, Path], tuple[str, Path, dict[str, Any]]] | None = None


def params_dict(params: Any) -> dict[str, Any]:
    return asdict(params) if is_dataclass(params) else dict(params)


@cache
def code_hash(paths: tuple[str, ...]) -> str:
    """sha256 over the source files under the given package-relative paths."""
    h = hashlib.sha256()
    for rel in paths:
        target = PKG_ROOT / rel
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for f in files:
            h.update(f.relative_to(PKG_ROOT).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def stage_key(stage: Stage, params: Any, inputs: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(key, versions): the hash of everything that can change the stage's output."""
    versions = package_versions(stage.vendors)
    material = {
        "stage": stage.name,
        "params": params_dict(params),
        "inputs": inputs,
        "code": code_hash(stage.code),
        "versions": versions,
    }
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_CHARS], versions
