"""Atomic writes and content hashing: nothing is ever written straight into its final path."""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import bad_input

CHUNK = 8 << 20
FILE_MODE = 0o644  # mkstemp makes 0600; artifacts are meant to be shared and published


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root, so a rename after it publishes durable data."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ONNX external data (`model.onnx.data`): onnx's loader and checker refuse a data file with more
# than one hard link ("potential hardlink attack", onnx >= 1.19), so it is always copied.
NEVER_LINKED = (".onnx.data",)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when on the same file system (engines share bytes with the cache), else copy;
    files named in NEVER_LINKED are copied."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.name.endswith(NEVER_LINKED):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a complete temp dir into place, replacing an older final dir if one exists. On Linux
    the two are swapped in one rename (RENAME_EXCHANGE), so a reader never finds `final`
    missing; elsewhere there is a window between two renames."""
    if not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old dir
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE): atomically swap two paths. False where the kernel, libc or
    file system does not offer it."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


@contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """For stand-alone commands: build into a temp dir beside `out_dir`, rename on success,
    remove on failure. An existing non-empty `out_dir` is refused, never overwritten."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise bad_input("OUT_DIR", f"{out_dir} exists and is not empty",
                        "Choose a new directory or delete it first.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
