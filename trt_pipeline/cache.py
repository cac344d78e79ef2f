"""Content-addressed artifact store: <root>/<stage>/<key>/, written as a temp dir and renamed."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .fsio import fsync_tree
from .manifest import MANIFEST, Manifest, files_intact, host_name, read_manifest

log = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-"


def default_cache_root() -> Path:
    env = os.environ.get("TRT_PIPELINE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trt-pipeline"


@dataclass(frozen=True)
class Entry:
    stage: str
    key: str
    path: Path
    bytes: int
    finished: str


class Cache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_cache_root()

    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Manifest | None:
        """The manifest of a complete artifact, or None: a dir without a valid manifest whose
        files are all present at their recorded sizes does not exist."""
        d = self.artifact_dir(stage, key)
        m = read_manifest(d)
        if m is None or m.key != key or m.stage != stage or not files_intact(d, m.files):
            return None
        return m

    @contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Exclusive per-artifact lock. flock is dropped by the kernel when its holder dies,
        so a killed build never leaves a lock that blocks; the file names the holder for humans."""
        lock_dir = self.root / stage / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        path = lock_dir / f"{key}.lock"
        with path.open("a+") as f:
            waited = False
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        f.seek(0)
                        holder = f.read().strip() or "another process"
                        log.info("waiting for %s %s held by %s", stage, key, holder)
                        waited = True
                    time.sleep(0.2)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {host_name()}\n")
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @contextmanager
    def staging(self, stage: str, key: str) -> Iterator[Path]:
        """A fresh temp dir beside the final one. Call under `lock`. On success the caller has
        written the manifest last; the dir is flushed and renamed into place. On any error the
        temp dir is removed, so nothing half-written can be taken for an artifact."""
        parent = self.root / stage
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f"{TMP_PREFIX}{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed writer; we hold the lock
        tmp = parent / f"{TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            if not (tmp / MANIFEST).is_file():
                raise RuntimeError(f"stage {stage} wrote no {MANIFEST}")
            fsync_tree(tmp)
            final = self.artifact_dir(stage, key)
            if final.exists():
                shutil.rmtree(final)  # an incomplete leftover: lookup() rejected it
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def entries(self) -> list[Entry]:
        out = []
        if not self.root.is_dir():
            return out
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for d in sorted(stage_dir.iterdir()):
                if d.name.startswith("."):
                    continue
                m = read_manifest(d)
                if m is None:
                    continue
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                out.append(Entry(stage_dir.name, m.key, d, size, m.finished))
        return out

    def remove(self, stage: str | None = None) -> tuple[int, list[tuple[Path, str]]]:
        """Delete artifacts (of one stage, or all) and stale temp dirs; returns bytes freed and
        the (dir, holder) pairs skipped because a running build holds their lock."""
        freed, busy = 0, []
        if not self.root.is_dir():
            return 0, busy
        for stage_dir in [p for p in self.root.iterdir() if p.is_dir()]:
            if stage and stage_dir.name != stage:
                continue
            for d in stage_dir.iterdir():
                if d.name == ".locks":
                    continue
                with self._unless_locked(stage_dir / ".locks", _key_of(d.name)) as holder:
                    if holder is not None:
                        busy.append((d, holder))
                        continue
                    freed += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                    shutil.rmtree(d, ignore_errors=True)
        return freed, busy

    @contextmanager
    def _unless_locked(self, lock_dir: Path, key: str) -> Iterator[str | None]:
        """Hold `key`'s lock for the block (None), or yield who holds it without waiting."""
        path = lock_dir / f"{key}.lock"
        if not path.is_file():
            yield None  # never locked (logs, or a cache older than locks)
            return
        with path.open("a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                yield f.read().strip() or "another process"
                return
            try:
                yield None
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _key_of(name: str) -> str:
    """The artifact key of a dir in a stage dir: `<key>` or a temp `.tmp-<key>-<pid>-<hex>`."""
    return name[len(TMP_PREFIX):].rsplit("-", 2)[0] if name.startswith(TMP_PREFIX) else name
