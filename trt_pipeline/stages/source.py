"""The source stage: find the Hugging Face model (local dir or HF cache) and hash its content."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput, Problem
from ..fsio import sha256_file, write_text_atomic
from .base import Stage

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HASHED_SUFFIXES = (".json", ".safetensors", ".jinja", ".model", ".txt")


@dataclass(frozen=True)
class SourceParams:
    source: str
    revision: str | None = None


def resolve_source(source: str, revision: str | None = None) -> Path:
    """A local directory, or a hub id found in the local Hugging Face cache (downloaded there
    by huggingface_hub if this machine can reach the hub)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if not HUB_ID.match(source) or path.is_absolute() or source.startswith("."):
        raise BadInput([Problem("model.source", f"{source!r} is not a directory",
                                "Point model.source at a Hugging Face model directory "
                                "(relative paths resolve against the recipe) or a hub id.")])
    try:
        from huggingface_hub import snapshot_download

        allow = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
        try:
            local = snapshot_download(source, revision=revision, allow_patterns=allow,
                                      local_files_only=True)
        except Exception:  # not cached yet: try the hub (fails fast when offline)
            local = snapshot_download(source, revision=revision, allow_patterns=allow)
    except Exception as exc:
        raise BadInput([Problem("model.source", f"hub id {source!r} is not in the local "
                                f"Hugging Face cache and could not be downloaded "
                                f"({type(exc).__name__})",
                                "Download it first (huggingface-cli download) or point "
                                "model.source at a local directory.")]) from None
    return Path(local)


class HashMemo:
    """sha256 of big files keyed by (path, size, mtime), so re-planning does not re-read GBs."""

    def __init__(self, root: Path) -> None:
        self.path = root / "hashes.json"
        try:
            self.memo: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.memo = {}
        self.dirty = False

    def digest(self, f: Path) -> str:
        st = f.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self.memo.get(str(f))
        if hit and hit[0] == stamp:
            return hit[1]
        digest = sha256_file(f)
        self.memo[str(f)] = [stamp, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty:
            write_text_atomic(self.path, json.dumps(self.memo))


def fingerprint_dir(model_dir: Path, memo: HashMemo | None = None) -> tuple[str, dict[str, Any]]:
    """Content hash of the files that define the model (weights, configs, tokenizer)."""
    files = sorted(p for p in model_dir.iterdir()
                   if p.is_file() and p.suffix in HASHED_SUFFIXES)
    h = hashlib.sha256()
    listing = {}
    for f in files:
        digest = memo.digest(f) if memo else sha256_file(f)
        listing[f.name] = {"bytes": f.stat().st_size, "sha256": digest}
        h.update(f"{f.name}\0{digest}\n".encode())
    if memo:
        memo.save()
    return h.hexdigest()[:20], listing


def fingerprint(params: SourceParams, root: Path) -> tuple[str, Path, dict[str, Any]]:
    """(content key, model dir, listing); file hashes are memoized under the cache `root`."""
    path = resolve_source(params.source, params.revision)
    try:
        root.mkdir(parents=True, exist_ok=True)
        memo: HashMemo | None = HashMemo(root)
    except OSError:
        memo = None
    key, files = fingerprint_dir(path, memo)
    return key, path, {"path": str(path), "files": files}


STAGE = Stage(name="source", run=None, code=("stages/source.py",), fingerprint=fingerprint)
