"""manifest.json of a stage artifact and of an engine dir: what, from what, how, how long."""

from __future__ import annotations

import json
import platform
import socket
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import BadInput, Problem
from .fsio import sha256_file, write_text_atomic

MANIFEST = "manifest.json"
REPORTS_DIR = "bench"  # where `build --bench` writes reports inside an engine dir: not engine files
RECIPE_FILE = "recipe.yaml"  # the resolved recipe, saved beside every engine


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    path: str
    bytes: int
    sha256: str


class Manifest(_Strict):
    """Beside every cached artifact; written last, so a dir without one is not an artifact."""

    schema_version: Literal[1] = 1
    stage: str
    key: str
    inputs: dict[str, str]
    params: dict[str, Any]
    versions: dict[str, str]
    code: str
    host: str
    started: str
    finished: str
    seconds: float
    files: list[FileEntry]
    metrics: dict[str, Any] = {}


class StageRecord(_Strict):
    stage: str
    key: str
    cached: bool
    seconds: float


class EngineManifest(_Strict):
    """Beside every published engine dir: the runner reads only this and the files it lists."""

    schema_version: Literal[1] = 1
    kind: Literal["engine"] = "engine"
    recipe: str
    backend: str
    target: str
    sm: int
    runtime: dict[str, Any]
    stages: list[StageRecord]
    versions: dict[str, str]
    created: str
    files: list[FileEntry]
    metrics: dict[str, Any] = {}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def host_name() -> str:
    return socket.gethostname()


def package_versions(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Installed distribution versions ('absent' when not installed), plus Python's."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def list_files(root: Path, skip: tuple[str, ...] = (MANIFEST,)) -> list[FileEntry]:
    entries = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in skip:
            entries.append(FileEntry(path=rel, bytes=p.stat().st_size, sha256=sha256_file(p)))
    return entries


def write_manifest(root: Path, manifest: BaseModel) -> None:
    write_text_atomic(root / MANIFEST, manifest.model_dump_json(indent=2) + "\n")


def read_manifest(root: Path) -> Manifest | None:
    """The stage manifest of `root`, or None when there is none or it does not parse."""
    try:
        return Manifest.model_validate_json((root / MANIFEST).read_text())
    except (OSError, ValidationError, ValueError):
        return None


def is_engine_dir(path: Path) -> bool:
    """An engine manifest says kind "engine"; a stage artifact's manifest (a cached checkpoint
    dir) does not."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("kind") == "engine"
    except (OSError, ValueError, AttributeError):
        return False


def read_engine_manifest(engine_dir: Path) -> EngineManifest:
    path = engine_dir / MANIFEST
    if not path.is_file():
        raise BadInput([Problem("", f"no {MANIFEST}: not an engine dir built by build-engine",
                                "Run build-engine build RECIPE first.", str(engine_dir))])
    try:
        return EngineManifest.model_validate(json.loads(path.read_text()))
    except (ValidationError, ValueError) as exc:
        raise BadInput([Problem("", f"{MANIFEST} is not an engine manifest ({exc})", None,
                                str(engine_dir))]) from None


def files_intact(root: Path, files: list[FileEntry]) -> bool:
    """Cheap completeness check (existence and size); `check` verifies the sha256 too."""
    for f in files:
        p = root / f.path
        if not p.is_file() or p.stat().st_size != f.bytes:
            return False
    return True
