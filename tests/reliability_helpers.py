"""Shared by the reliability tests: run the real CLI, look at cache and engines roots."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import DEFAULT_MODEL, REPO

from trt_pipeline.cache import Cache
from trt_pipeline.manifest import read_manifest

BAD = REPO / "tests" / "data" / "bad_recipes"
EXPECTED = yaml.safe_load((BAD / "expected.yaml").read_text())
FLOAT_ONNX = f"""\
name: float-onnx
model: {{source: {DEFAULT_MODEL}, dtype: float32}}
quantize: {{method: none}}
build: {{backend: onnx, target: cpu}}
"""
STAGE_RE = re.compile(r"stage (\w+) \(key")


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
        **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trt_pipeline.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout,
                          **kw)


def spawn(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trt_pipeline.cli", *args], text=True,
                            env={**os.environ, **kw.pop("env", {})}, **kw)


def roots() -> tuple[Path, Path]:
    return Path(os.environ["TRT_PIPELINE_CACHE"]), Path(os.environ["TRT_PIPELINE_ENGINES"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def intact(root: Path, files: list) -> bool:
    return all((root / f.path).is_file() and sha256(root / f.path) == f.sha256 for f in files)


def artifacts(cache_root: Path) -> dict[str, list[str]]:
    """stage -> keys of the artifact dirs in the cache; each one must be complete and verify
    (a dir that looks like an artifact but is not is the failure these tests hunt)."""
    out: dict[str, list[str]] = {}
    for stage_dir in sorted(p for p in cache_root.iterdir() if p.is_dir() and p.name != "logs"):
        for d in sorted(p for p in stage_dir.iterdir() if not p.name.startswith(".")):
            m = read_manifest(d)
            assert m is not None and m.key == d.name, f"{d} looks like an artifact but is not"
            assert Cache(cache_root).lookup(stage_dir.name, d.name) is not None
            assert intact(d, m.files), f"{d}: a file does not match its manifest's sha256"
            out.setdefault(stage_dir.name, []).append(d.name)
    return out


def temp_dirs(cache_root: Path) -> list[Path]:
    return [p for p in cache_root.glob("*/.tmp-*")] if cache_root.is_dir() else []


@contextmanager
def env_roots(root: Path):
    """For module-scoped builds, which run before the per-test roots exist: the source stage
    memoizes hashes under TRT_PIPELINE_CACHE whatever Cache the executor is given."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRT_PIPELINE_CACHE", str(root / "cache"))
        mp.setenv("TRT_PIPELINE_ENGINES", str(root / "engines"))
        yield


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


