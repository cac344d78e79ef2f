"""Reliability: broken recipes and model inputs, kill -9 inside every stage, two recipes at once,
a full disk, version drift, untrusted input, and a bounded load test of the server on 127.0.0.1.

Every build here runs the real CLI in a subprocess (or the executor in-process where a version
must be patched); the oracles are our own: sha256 recomputed with hashlib, key paths and messages
written down in tests/data/bad_recipes/expected.yaml, greedy outputs of a separate Runner.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import DEFAULT_MODEL, REPO
from reliability_helpers import (
    FLOAT_ONNX,
    STAGE_RE,
    artifacts,
    cli,
    env_roots,
    intact,
    roots,
    spawn,
    temp_dirs,
    write_recipe,
)

from trt_pipeline.cache import Cache
from trt_pipeline.manifest import MANIFEST, read_engine_manifest, read_manifest

# --- (b) bad model inputs ------------------------------------------------------------------------


def test_nan_weights_refused_by_build_end_to_end(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model = Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "model"))
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.2.self_attn.o_proj.weight"][5, 7] = float("inf")
    save_file({k: v.to(torch.float32) for k, v in tensors.items()}, model / "model.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", FLOAT_ONNX.replace(str(DEFAULT_MODEL), str(model)))
    res = cli("-q", "build", str(recipe), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "model.source: transformer.layers.2.attention.dense.weight (from " \
        "model.layers.2.self_attn.o_proj.weight) holds NaN or Inf values" in res.stderr
    cache, engines = roots()
    assert not engines.exists() and not temp_dirs(cache)
    assert Cache(cache).entries() == []


@pytest.fixture(scope="module")
def float16_ckpt(tmp_path_factory) -> Path:
    from trt_pipeline.families.apply import convert_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "float16"
    with env_roots(out.parent):
        convert_checkpoint(DEFAULT_MODEL, out, "float16")
    return out


def quantize_edited(ckpt: Path, tmp_path: Path, edit, method: str = "awq"
                    ) -> tuple[Path, object]:
    """Quantize a copy of `ckpt` whose tensors `edit` changed; returns (out dir, exception)."""
    from safetensors.torch import load_file, save_file

    from trt_pipeline.quant.quantize import QuantParams, quantize_checkpoint

    src = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    tensors = load_file(src / "rank0.safetensors")
    edit(tensors)
    save_file(tensors, src / "rank0.safetensors")
    out = tmp_path / "out"
    try:
        quantize_checkpoint(src, out, QuantParams(method=method, samples=4, seq_len=64))
    except Exception as exc:  # the test says which kind it must be
        return out, exc
    return out, None


def test_quantize_refuses_a_tensor_of_the_wrong_dtype(float16_ckpt, tmp_path):
    import torch

    from trt_pipeline.errors import BadInput

    name = "transformer.layers.0.mlp.fc.weight"
    out, exc = quantize_edited(float16_ckpt, tmp_path,
                               lambda t: t.update({name: t[name].to(torch.int32)}), "rtn")
    assert isinstance(exc, BadInput) and name in exc.render() and "int32" in exc.render()
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_quantize_refuses_nan_before_quantizing(float16_ckpt, tmp_path):
    from trt_pipeline.errors import BadInput

    name = "transformer.layers.1.mlp.proj.weight"
    out, exc = quantize_edited(float16_ckpt, tmp_path,
                               lambda t: t[name].__setitem__((3, 4), float("nan")))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert isinstance(exc, BadInput) and name in exc.render() and "NaN" in exc.render()


def shifted_tokenizer_model(tmp_path: Path) -> Path:
    """The default model with a tokenizer whose ids all lie past the model's vocab_size."""
    model = Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "model"))
    tok = json.loads((model / "tokenizer.json").read_text())
    n = len(tok["model"]["vocab"])
    tok["model"]["vocab"] = {k: v + n for k, v in tok["model"]["vocab"].items()}
    for t in tok["added_tokens"]:
        t["id"] += n
    (model / "tokenizer.json").write_text(json.dumps(tok))
    return model


@pytest.mark.parametrize(("quantize", "failing"), [
    ("awq", "quantize"), pytest.param("none", "verify", marks=pytest.mark.slow)])
def test_tokenizer_that_does_not_match_the_vocab(tmp_path, quantize, failing):
    model = shifted_tokenizer_model(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", FLOAT_ONNX.replace(str(DEFAULT_MODEL), str(model))
                          .replace("method: none", f"method: {quantize}"))
    res = cli("-q", "build", str(recipe), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "but the model has vocab_size 2048" in res.stderr and "tokenizer.json" in res.stderr
    cache, engines = roots()
    assert not engines.exists() and not temp_dirs(cache)
    assert failing not in artifacts(cache)


# --- (c) kill -9 ---------------------------------------------------------------------------------


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120, step: float = 0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got or proc.poll() is not None:
            return got
        time.sleep(step)
    raise AssertionError("timed out")


def test_a_build_waiting_on_a_killed_builder_goes_on(tmp_path):
    """Beyond tests/test_pipeline.py's kill test: a second build already blocked on the killed
    build's lock takes it over (the kernel drops the flock) and builds the stage itself."""
    recipe = write_recipe(tmp_path / "r.yaml", FLOAT_ONNX)
    cache, _ = roots()
    log = tmp_path / "b.log"
    procs: list[subprocess.Popen] = []
    try:
        a = spawn("-q", "build", str(recipe), stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
        procs.append(a)
        assert wait_for(lambda: list((cache / "convert").glob(".tmp-*")), a), "A never converted"
        a.send_signal(signal.SIGSTOP)  # A now holds the convert lock and its temp dir
        with log.open("w") as err:
            b = spawn("build", str(recipe), "--json", stdout=subprocess.PIPE, stderr=err)
            procs.append(b)
            assert wait_for(lambda: "waiting for convert" in log.read_text(), b, step=0.05), \
                log.read_text()
            a.kill()
            out, _ = b.communicate(timeout=300)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert b.returncode == 0, log.read_text()
    stages = {s["stage"]: s["cached"] for s in json.loads(out)["stages"]}
    assert stages == {"source": True, "convert": False, "lower": False, "verify": False}
    assert not temp_dirs(cache)
    assert {k: len(v) for k, v in artifacts(cache).items()} == {"convert": 1, "lower": 1,
                                                               "verify": 1}


RTX_STAGES = ("convert", "quantize", "lower", "build_rtx", "verify")


@pytest.mark.slow
def test_kill_sweep_through_every_stage_of_the_default_recipe(tmp_path):
    """recipes/default.yaml killed at several points inside each stage's temp dir: after each
    kill the cache holds only verified artifacts, the next run goes past it (no lock blocks) and
    the last run reuses every complete artifact."""
    recipe = REPO / "recipes" / "default.yaml"
    cache, engines = roots()
    landed = {s: 0 for s in RTX_STAGES}
    for stage in RTX_STAGES:
        for delay in (0.0, 0.05, 0.3):
            proc = spawn("-q", "build", str(recipe), cwd=tmp_path, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
            try:
                inside = wait_for(lambda s=stage: list((cache / s).glob(".tmp-*")), proc, 300)
                time.sleep(delay)
                proc.kill()
            finally:
                proc.wait()
            landed[stage] += proc.returncode == -signal.SIGKILL and any(p.exists() for p in inside)
            artifacts(cache)  # only complete, verified artifacts
            if (engines / "default" / MANIFEST).is_file():
                assert intact(engines / "default",
                              read_engine_manifest(engines / "default").files)
            if any(not p.name.startswith(".") for p in (cache / stage).glob("*")):
                break  # the stage completed before the kill: later points are past it
    assert all(landed.values()), landed
    res = cli("-q", "build", str(recipe), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cached = {s["stage"]: s["cached"] for s in json.loads(res.stdout)["stages"]}
    assert all(cached[s] for s in RTX_STAGES[:-1]), cached  # built before the last kill
    assert not temp_dirs(cache)
    assert {k: len(v) for k, v in artifacts(cache).items()} == {s: 1 for s in RTX_STAGES}
    from trt_pipeline.ci import check_engine

    assert check_engine(engines / "default").ok


# --- (d) two recipes at once ---------------------------------------------------------------------


def test_two_recipes_sharing_stages_build_at_once(tmp_path):
    """default.yaml (rtx) and default-onnx.yaml share source, convert and quantize."""
    procs = [spawn("-q", "build", str(REPO / "recipes" / name), "--json", cwd=tmp_path,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in ("default.yaml", "default-onnx.yaml")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    runs = [{s["stage"]: s for s in json.loads(o[0])["stages"]} for o in outs]
    for stage in ("convert", "quantize"):
        assert runs[0][stage]["key"] == runs[1][stage]["key"]
        assert sorted(r[stage]["cached"] for r in runs) == [False, True]  # built once
    assert runs[0]["lower"]["key"] != runs[1]["lower"]["key"]  # float16 vs float32 graph
    cache, engines = roots()
    assert {k: len(v) for k, v in artifacts(cache).items()} == {
        "convert": 1, "quantize": 1, "lower": 2, "build_rtx": 1, "verify": 2}
    assert not temp_dirs(cache)
    for name in ("default", "default-onnx"):
        assert intact(engines / name, read_engine_manifest(engines / name).files)


# --- (e) a full disk -----------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)],
                             capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command here; test_a_write_past_the_file_size_limit covers it")
    if res.returncode:
        pytest.skip(f"cannot mount a 2 MiB tmpfs ({res.stderr.strip()}); "
                    "test_a_write_past_the_file_size_limit covers a failing write")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False, timeout=30)


def assert_clean_failure(res: subprocess.CompletedProcess, cache: Path, engines: Path) -> None:
    assert res.returncode in (1, 2), res.stderr
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    stage = STAGE_RE.search(res.stderr)
    assert stage and stage.group(1) == "convert", res.stderr
    assert not temp_dirs(cache)
    assert "convert" not in artifacts(cache)
    assert not (engines / "float-onnx").exists()


def test_disk_full_during_a_write(tiny_fs, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", FLOAT_ONNX)
    cache, engines = tiny_fs / "cache", tiny_fs / "engines"
    res = cli("-q", "build", str(recipe), cwd=tmp_path, env={
        "TRT_PIPELINE_CACHE": str(cache), "TRT_PIPELINE_ENGINES": str(engines)})
    assert "No space left on device" in res.stderr
    assert_clean_failure(res, cache, engines)


def test_a_write_past_the_file_size_limit(tmp_path):
    def limit() -> None:  # CPython ignores SIGXFSZ: the write fails with EFBIG instead
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    recipe = write_recipe(tmp_path / "r.yaml", FLOAT_ONNX)
    res = cli("-q", "build", str(recipe), cwd=tmp_path, preexec_fn=limit)
    assert "File too large" in res.stderr
    assert_clean_failure(res, *roots())


# --- (f) version drift ---------------------------------------------------------------------------


def test_a_changed_vendor_version_rebuilds_the_stages_that_use_it(float_engine, tmp_path,
                                                                  monkeypatch):
    import trt_pipeline.stages.base as base
    from trt_pipeline.executor import execute, resolve
    from trt_pipeline.plan import make_plan
    from trt_pipeline.recipe.load import load_recipe

    recipe, cache_root, _ = float_engine
    plan, cache = make_plan(load_recipe(recipe)), Cache(cache_root)
    before = {r.spec.stage: (r.key, r.cached) for r in resolve(plan, cache)}
    assert all(cached for _, cached in before.values())
    installed = base.package_versions

    def drifted(names):
        versions = installed(names)
        return {**versions, "onnxruntime": "0.0.1"} if "onnxruntime" in versions else versions

    # stages/base.py binds package_versions at import, so that is where the key reads it
    monkeypatch.setattr(base, "package_versions", drifted)
    after = {r.spec.stage: (r.key, r.cached) for r in resolve(plan, cache)}
    assert {s for s in after if after[s][0] != before[s][0]} == {"verify"}  # its vendor
    assert after["verify"][1] is False
    result = execute(plan, cache, tmp_path / "engines")
    assert {r.stage: r.cached for r in result.stages} == {
        "source": True, "convert": True, "lower": True, "verify": False}
    m = read_manifest(cache.artifact_dir("verify", after["verify"][0]))
    assert m.versions["onnxruntime"] == "0.0.1"
    assert read_engine_manifest(result.engine_dir).versions["onnxruntime"] == "0.0.1"


RTX_RUNTIME = {"kind": "tensorrt_rtx", "engine": "model.engine", "sm": 86,
               "target": "rtx3060-12gb", "version": "1.7.1.116", "max_batch_size": 4,
               "max_input_len": 512, "max_seq_len": 1024, "decode_profile": None,
               "cpu_fallback": {"kind": "onnxruntime", "model_dir": "onnx"}}


def test_an_rtx_engine_for_another_gpu_and_version_is_refused_with_both_reasons():
    from trt_pipeline.backends.rtx.engine import Gpu, decide
    from trt_pipeline.errors import BadInput

    with pytest.raises(BadInput) as info:
        decide(RTX_RUNTIME, Gpu("NVIDIA GeForce RTX 4090", 89), "1.8.0.9", (80, 86, 89, 120))
    assert [p.path for p in info.value.problems] == ["runtime.sm", "runtime.version"]
    text = info.value.render()
    assert "built for sm86 with TensorRT for RTX 1.7.1.116" in text and "is sm89" in text
    assert "1.8.0.9 is installed" in text


def test_the_rebuild_command_the_runner_suggests_names_a_real_stage():
    from trt_pipeline.backends.rtx.engine import Gpu, decide
    from trt_pipeline.errors import BadInput
    from trt_pipeline.stages import STAGES

    with pytest.raises(BadInput) as info:
        decide({**RTX_RUNTIME, "version": "1.6.0.1"}, Gpu("RTX 3060", 86), "1.7.1.116", (86,))
    forced = re.findall(r"--force (\w+)", info.value.render())
    assert forced and all(s in STAGES or s == "all" for s in forced), forced


# --- (g) untrusted input -------------------------------------------------------------------------


# Written outside the roots by vendor packages on import, not by us: ONNX Runtime 1.32's OneDS
# telemetry (a device id under ~/.cache/Microsoft and a session file in $TMPDIR, even with
# onnxruntime.disable_telemetry_events()), and torch's empty inductor cache dir.
VENDOR_WRITES = ("home/.cache/Microsoft/DeveloperTools/.onnxruntime/", "tmp/.ses",
                 "tmp/torchinductor_")


def snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime) of every file and the set of dirs under root, less `skip`
    and VENDOR_WRITES; a dir's own mtime is left out (allowed children change it)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(dirpath, d) not in skip]
        for name in [*files, *dirs]:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if any(rel.startswith(v) or f"{rel}/" in v for v in VENDOR_WRITES):
                continue
            st = p.lstat()
            out[rel] = (st.st_size, st.st_mtime_ns) if p.is_file() else (-1, 0)
    return out


def repo_state() -> tuple[str, dict]:
    """What a build could touch in the checkout: its inputs and ./engines. (Others may edit the
    code meanwhile, so trt_pipeline/*.py is not compared; bytecode caches are Python's.)"""
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                             "--untracked-files=all", "--", "recipes", "trt_pipeline/data",
                             "tests/data"], capture_output=True, text=True, check=True).stdout
    engines = REPO / "engines"
    return status, snapshot(engines, ()) if engines.is_dir() else {}


def test_remote_code_allowed_but_recorded_never_run_and_nothing_written_elsewhere(tmp_path):
    model = Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "model"))
    marker = tmp_path / "remote-code-ran"
    for module in ("modeling_evil", "configuration_evil"):
        (model / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(cfg))
    recipe = write_recipe(tmp_path / "r.yaml", FLOAT_ONNX.replace(
        str(DEFAULT_MODEL), f"{model}, trust_remote_code: true"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HOME", "XDG_CACHE_HOME", "TRANSFORMERS_CACHE", "HF_HUB_CACHE")}
    for name in ("home", "tmp", "cwd"):
        (tmp_path / name).mkdir()
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"))
    cache, engines = roots()
    before, repo_before = snapshot(tmp_path, (cache, engines)), repo_state()
    res = subprocess.run([sys.executable, "-m", "trt_pipeline.cli", "-q", "build", str(recipe)],
                         capture_output=True, text=True, cwd=tmp_path / "cwd", env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert not marker.exists(), "the source's own Python code ran"
    assert snapshot(tmp_path, (cache, engines)) == before
    assert repo_state() == repo_before
    saved = yaml.safe_load((engines / "float-onnx" / "recipe.yaml").read_text())
    assert saved["model"]["trust_remote_code"] is True




READER = """
import os, sys
final, stop = sys.argv[1], sys.argv[2]
seen = misses = 0
while not os.path.exists(stop):
    seen += 1
    if not os.path.isfile(os.path.join(final, "manifest.json")):
        misses += 1
print(seen, misses)
"""


def test_republishing_a_dir_never_leaves_it_missing(tmp_path):
    """A reader polling engines/<name>/ in another process while it is replaced 300 times never
    finds it missing: the swap is one rename (RENAME_EXCHANGE), not two with a gap."""
    from trt_pipeline.fsio import replace_dir

    final, stop = tmp_path / "engine", tmp_path / "stop"
    final.mkdir()
    (final / "manifest.json").write_text("0")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(final), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    for i in range(1, 301):
        tmp = tmp_path / f".engine.tmp-{i}"
        tmp.mkdir()
        (tmp / "manifest.json").write_text(str(i))
        replace_dir(tmp, final)
    stop.touch()
    seen, misses = map(int, reader.communicate(timeout=60)[0].split())
    assert seen > 1000 and misses == 0
    assert (final / "manifest.json").read_text() == "300"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "stop"]


def test_republishing_without_rename_exchange_still_replaces(tmp_path, monkeypatch):
    from trt_pipeline import fsio

    monkeypatch.setattr(fsio, "_exchange", lambda a, b: False)
    final = tmp_path / "engine"
    for i in range(2):
        tmp = tmp_path / f".tmp-{i}"
        tmp.mkdir()
        (tmp / "manifest.json").write_text(str(i))
        fsio.replace_dir(tmp, final)
    assert (final / "manifest.json").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]
