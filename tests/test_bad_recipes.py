"""Broken recipes through the real CLI: each refused with exit 2, its key path named, no
traceback, nothing written (tests/data/bad_recipes/expected.yaml holds the oracle)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEFAULT_MODEL
from reliability_helpers import (
    BAD,
    EXPECTED,
    cli,
    roots,
    write_recipe,
)

# --- (a) the bad-recipe corpus -------------------------------------------------------------------


def test_corpus_is_complete():
    files = {p.name for p in BAD.glob("*.yaml")} - {"expected.yaml"}
    assert files == set(EXPECTED)
    assert len([f for f in files if not EXPECTED[f].get("xfail")]) >= 30


ZYGOTE = """\
import json, os, runpy, sys, traceback
import click, rich.table  # what the CLI imports, less the CLI module itself (runpy runs it)
import trt_pipeline.cache, trt_pipeline.console, trt_pipeline.executor, trt_pipeline.plan
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = ["trt_pipeline.cli", *req["args"]]
            try:
                runpy.run_module("trt_pipeline.cli", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    """Runs `python -m trt_pipeline.cli ARGS` as a fresh process forked from an interpreter that
    has already imported the package: the same entry point, exit code and streams, without an
    interpreter start-up per run (the corpus is ~120 runs)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def run(self, args: list[str], cwd: Path, timeout: float) -> tuple[int | None, str, str]:
        out, err = cwd / "zygote.out", cwd / "zygote.err"
        self.proc.stdin.write(json.dumps({"args": args, "cwd": str(cwd), "env": dict(os.environ),
                                          "out": str(out), "err": str(err)}) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        code = int(self.proc.stdout.readline())
        return (code if ready else None), out.read_text(), err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def assert_refused(run, recipe: Path, exp: dict, timeout: float = 60) -> None:
    """exit 2 through validate and build, no traceback, the key path and message named, and
    nothing written (a known failure stops at its first wrong answer, so it builds nothing)."""
    cache, engines = roots()
    for args in (["validate", str(recipe)], ["build", str(recipe)]):
        code, out, err = run(args, timeout)
        assert code == 2, (args, code, err[-2000:])
        assert "Traceback" not in out + err
        if exp["key"]:
            assert re.search(rf"(^|\s){re.escape(exp['key'])}: ", err), err
        assert exp["message"] in err, err
        assert exp.get("at", "") in err, err
        assert_located(err, args)
    assert not cache.exists() and not engines.exists(), "bad input wrote something"


# `  <file>:<line>  <key.path>: ...` or `  override <text>  <key.path>: ...`, one per problem
LOCATED = re.compile(r"^  (?:override (?P<override>.+?)|(?P<file>/\S+?):(?P<line>\d+))  "
                     r"(?:(?P<key>[\w.]+): )?", re.M)


def assert_located(err: str, args: list[str]) -> None:
    """Every location a problem gives is right, independently of the oracle: the line named holds
    the key's last name (list indexes skipped), or the override named is one that was passed."""
    for m in LOCATED.finditer(err):
        if m["override"]:
            assert m["override"] in args, (m[0], args)
            continue
        lines = Path(m["file"]).read_text(errors="replace").splitlines()
        n = int(m["line"])
        assert 1 <= n <= max(len(lines), 1), (m[0], len(lines))
        names = [k for k in (m["key"] or "").split(".") if k and not k.isdigit()]
        if names:
            assert names[-1] in lines[n - 1], f"{m[0]!r}: line {n} is {lines[n - 1]!r}"


def corpus() -> list:
    params = []
    for name, exp in EXPECTED.items():
        marks = [pytest.mark.slow] if exp.get("slow") else []
        if exp.get("xfail"):
            marks.append(pytest.mark.xfail(reason=exp["xfail"], strict=True))
        params.append(pytest.param(name, exp, id=name, marks=marks))
    return params


@pytest.mark.parametrize(("name", "exp"), corpus())
def test_bad_recipe(name, exp, tmp_path, zygote):
    (tmp_path / "cwd").mkdir()
    assert_refused(lambda args, t: zygote.run(args, tmp_path / "cwd", t), BAD / name, exp,
                   timeout=10 if exp.get("slow") else 120)


def test_the_location_check_catches_a_wrong_line():
    recipe = BAD / "cross_with_type_error.yaml"
    assert_located(f"  {recipe}:7  build.max_input_len: got 4096", [])
    assert_located("  override ~build.backend  build.backend: required key is missing", [
        "validate", str(recipe), "~build.backend"])
    with pytest.raises(AssertionError):
        assert_located(f"  {recipe}:6  build.max_input_len: got 4096", [])
    with pytest.raises(AssertionError):
        assert_located("  override ~build.backend  build.backend: missing", ["validate"])


@pytest.mark.parametrize("override,key", [
    ("quantize.calib.nonexist.deep=1", "quantize.calib.nonexist"),
    ("build.plugins.moe.x=1", "build.plugins.moe"),
    ("~build.backend", "build.backend"),
])
def test_override_errors_are_located_at_the_override(override, key, tmp_path, zygote):
    (tmp_path / "cwd").mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", BASE + "quantize:\n  calib: {samples: 4}\n")
    args = ["validate", str(recipe), override]
    code, out, err = zygote.run(args, tmp_path / "cwd", 60)
    assert code == 2 and "Traceback" not in out + err, err
    assert f"  override {override}  {key}: " in err, err
    assert_located(err, args)


BASE = f"name: bad\nmodel: {{source: {DEFAULT_MODEL}}}\nbuild: {{backend: rtx}}\n"


def _loop(d: Path, a: str, b: str) -> None:
    (d / a).symlink_to(d / b)
    (d / b).symlink_to(d / a)


def make_latin1(d: Path) -> Path:
    return _bytes(d / "latin1.yaml", ("description: café au lait\n" + BASE).encode("latin-1"))


def make_utf16(d: Path) -> Path:
    return _bytes(d / "utf16.yaml", BASE.encode("utf-16"))


def make_nul(d: Path) -> Path:
    return _bytes(d / "nul.yaml", BASE.encode() + b"description: a\x00b\n")


def make_oversized(d: Path) -> Path:
    return _bytes(d / "big.yaml", BASE.encode() + b"#" * 1_000_001 + b"\n")


def make_source_loop(d: Path) -> Path:
    _loop(d, "loop-a", "loop-b")
    return write_recipe(d / "r.yaml", BASE.replace(str(DEFAULT_MODEL), str(d / "loop-a")))


def make_extends_loop(d: Path) -> Path:
    _loop(d, "base-a.yaml", "base-b.yaml")
    return write_recipe(d / "r.yaml", "extends: base-a.yaml\n" + BASE)


def make_recipe_loop(d: Path) -> Path:
    _loop(d, "r.yaml", "s.yaml")
    return d / "r.yaml"


def make_recipe_dir(d: Path) -> Path:
    (d / "r.yaml").mkdir()
    return d / "r.yaml"


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


GENERATED = {  # cases a committed file cannot hold: maker, expectation
    "latin1": (make_latin1, {"key": "", "at": "latin1.yaml:1", "message": "not UTF-8"}),
    "utf16": (make_utf16, {"key": "", "at": "utf16.yaml:1", "message": "not UTF-8"}),
    "nul_byte": (make_nul, {"key": "", "at": "nul.yaml", "message": "unacceptable character"}),
    "oversized": (make_oversized, {"key": "", "at": "big.yaml",
                                   "message": "a recipe is at most 1000000"}),
    "symlink_loop_source": (make_source_loop, {"key": "model.source",
                                               "message": "is not a directory"}),
    "symlink_loop_extends": (make_extends_loop, {"key": "extends",
                                                 "message": "'base-a.yaml' not found"}),
    "symlink_loop_recipe": (make_recipe_loop, {"key": "", "at": "r.yaml",
                                               "message": "recipe file not found"}),
    "recipe_is_a_dir": (make_recipe_dir, {"key": "", "at": "r.yaml",
                                          "message": "not a regular file"}),
}


@pytest.mark.parametrize("case", GENERATED)
def test_bad_recipe_made_at_test_time(case, tmp_path, zygote):
    make, exp = GENERATED[case]
    (tmp_path / "cwd").mkdir()
    (tmp_path / "recipes").mkdir()
    assert_refused(lambda args, t: zygote.run(args, tmp_path / "cwd", t),
                   make(tmp_path / "recipes"), exp)


def test_the_corpus_through_separate_interpreters(tmp_path):
    """A few corpus cases as plain `python -m trt_pipeline.cli` processes, as users run it."""
    for name in ("unknown_key_typo.yaml", "yaml_tab.yaml", "does_not_fit.yaml"):
        assert_refused(lambda args, t: _plain(args, tmp_path, t), BAD / name, EXPECTED[name])


def _plain(args: list[str], cwd: Path, timeout: float) -> tuple[int, str, str]:
    res = cli(*args, cwd=cwd, timeout=timeout)
    return res.returncode, res.stdout, res.stderr


