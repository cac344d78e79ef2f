"""The pipeline machinery: cache keys, reuse, partial rebuilds, kills, concurrent builds, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEFAULT_MODEL

from trt_pipeline.cache import Cache
from trt_pipeline.executor import execute, resolve
from trt_pipeline.manifest import read_engine_manifest, read_manifest
from trt_pipeline.plan import make_plan
from trt_pipeline.recipe.load import load_recipe

RECIPE = f"""\
name: demo
model:
  source: {DEFAULT_MODEL}
  dtype: float16
build:
  backend: onnx
  target: cpu
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    p = tmp_path / "demo.yaml"
    p.write_text(RECIPE)
    return p


def build(recipe: Path, *overrides: str, force: tuple[str, ...] = ()):
    plan = make_plan(load_recipe(recipe, overrides))
    return execute(plan, Cache(), Path(os.environ["TRT_PIPELINE_ENGINES"]), force)


def test_build_then_everything_cached(recipe):
    first = build(recipe)
    assert [(r.stage, r.cached) for r in first.stages] == [
        ("source", True), ("convert", False), ("lower", False), ("verify", False)]
    second = build(recipe)
    assert [r.cached for r in second.stages] == [True, True, True, True]
    assert [r.key for r in first.stages] == [r.key for r in second.stages]
    m = read_engine_manifest(first.engine_dir)
    assert m.recipe == "demo" and m.backend == "onnx" and m.target == "cpu"
    names = {f.path for f in m.files}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "recipe.yaml"} <= names
    assert m.runtime["kind"] == "onnxruntime"
    assert m.metrics["verify"]["top1_agreement"] == 1.0  # float32 graph vs transformers


def test_manifest_records_inputs_params_versions_and_hashes(recipe):
    import hashlib

    result = build(recipe)
    convert = result.stages[1]
    art = Cache().artifact_dir("convert", convert.key)
    m = read_manifest(art)
    assert m.inputs == {"source": result.stages[0].key}
    assert m.params == {"dtype": "float16", "family": "llama"}
    assert {"torch", "safetensors", "python"} <= set(m.versions)
    for f in m.files:
        data = (art / f.path).read_bytes()
        assert len(data) == f.bytes and hashlib.sha256(data).hexdigest() == f.sha256
    assert m.seconds > 0 and m.started <= m.finished


def test_keys_change_only_with_what_a_stage_depends_on(recipe):
    def keys(*ov):
        return {r.spec.stage: r.key for r in resolve(make_plan(load_recipe(recipe, ov)), Cache())}

    base = keys()
    assert keys("build.max_batch_size=4") == base  # the onnx graph has no build limits
    assert keys("runner.max_new_tokens=3") == base  # nor do runner settings
    changed = keys("model.dtype=float32")
    assert changed["source"] == base["source"] and changed["convert"] != base["convert"]
    lowered = keys("build.dtype=float16")
    assert lowered["convert"] == base["convert"] and lowered["lower"] != base["lower"]


def test_source_key_follows_content_not_path(recipe, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(DEFAULT_MODEL, copy)
    a = resolve(make_plan(load_recipe(recipe)), Cache())[0].key
    b = resolve(make_plan(load_recipe(recipe, [f"model.source={copy}"])), Cache())[0].key
    assert a == b
    (copy / "generation_config.json").write_text("{}")
    c = resolve(make_plan(load_recipe(recipe, [f"model.source={copy}"])), Cache())[0].key
    assert c != a


def test_force_rebuilds_one_stage(recipe):
    build(recipe)
    again = build(recipe, force=("convert",))
    assert [r.cached for r in again.stages] == [True, False, True, True]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trt_pipeline.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_cli_exit_codes_and_no_traceback(recipe, tmp_path):
    cache = Path(os.environ["TRT_PIPELINE_CACHE"])
    engines = Path(os.environ["TRT_PIPELINE_ENGINES"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("target: cpu", "target: cpu\n  max_batch_sise: 2"))
    for args in (["validate", str(bad)], [str(bad)], ["build", str(tmp_path / "missing.yaml")],
                 ["plan", str(recipe), "build.nope=1"], ["build", str(recipe), "--force", "x"]):
        res = cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr and res.stderr.strip()
    assert not cache.exists() and not engines.exists()  # bad input writes nothing
    res = cli(str(recipe), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert Path(summary["engine_dir"]).name == "demo"
    assert [s["stage"] for s in summary["stages"]] == ["source", "convert", "lower", "verify"]


def test_convert_command_refuses_to_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    assert cli("convert", str(DEFAULT_MODEL), str(out), "--dtype", "float32").returncode == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    res = cli("convert", str(DEFAULT_MODEL), str(out))
    assert res.returncode == 2 and "exists and is not empty" in res.stderr
    res = cli("convert", str(DEFAULT_MODEL), str(tmp_path / "x"), "--dtype", "int8")
    assert res.returncode == 2 and not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """Large enough (about 90 MB of float32) that a kill lands inside the convert write."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("big") / "model"
    cfg = LlamaConfig(vocab_size=16000, hidden_size=512, intermediate_size=1536,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=2048)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def test_killed_builds_never_leave_a_complete_looking_artifact(tmp_path, big_model):
    recipe = tmp_path / "big.yaml"
    recipe.write_text(RECIPE.replace(str(DEFAULT_MODEL), str(big_model)).replace(
        "float16", "float32"))
    cache = Cache()
    stage_dir = cache.root / "convert"
    kills_inside = 0
    for delay in (0.0, 0.1, 0.25):  # after the temp dir appears: inside the tensor writes
        proc = subprocess.Popen([sys.executable, "-m", "trt_pipeline.cli", "-q", str(recipe)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if stage_dir.is_dir() and any(p.name.startswith(".tmp-") for p in stage_dir.iterdir()):
                break
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for d in stage_dir.iterdir() if stage_dir.is_dir() else []:
            if d.name.startswith(".tmp-"):
                kills_inside += 1
            elif not d.name.startswith("."):
                assert cache.lookup("convert", d.name) is not None, "complete-looking but broken"
    assert kills_inside, "no kill landed inside the write; make the model bigger"
    result = build(recipe)  # rebuilds (or reuses) and sweeps the leftovers
    assert not any(p.name.startswith(".tmp-") for p in (cache.root / "convert").iterdir())
    assert read_engine_manifest(result.engine_dir).files


def test_two_builds_of_one_recipe_at_once(recipe):
    procs = [subprocess.Popen([sys.executable, "-m", "trt_pipeline.cli", "-q", str(recipe),
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    summaries = [json.loads(o[0]) for o in outs]
    for i in (1, 2, 3):  # each stage built once; the other build waited on its lock and reused it
        assert sorted(s["stages"][i]["cached"] for s in summaries) == [False, True]
    entries = Cache().entries()
    assert sorted(e.stage for e in entries) == ["convert", "lower", "verify"]
    assert read_engine_manifest(Path(summaries[0]["engine_dir"])).files


def _fake_artifacts(root: Path) -> dict[str, Path]:
    dirs = {"done": root / "convert" / "aaaa", "tmp": root / "convert" / ".tmp-bbbb-123-0123abcd",
            "other": root / "source" / "cccc"}
    for d in dirs.values():
        d.mkdir(parents=True)
        (d / "w.bin").write_bytes(b"x" * 1000)
    return dirs


def test_clean_keeps_what_a_running_build_holds():
    cache = Cache()
    dirs = _fake_artifacts(cache.root)
    with cache.lock("convert", "aaaa"), cache.lock("convert", "bbbb"):
        freed, busy = cache.remove()
        res = cli("clean")  # another process: the same locks, held here
    assert freed == 1000 and {d for d, _ in busy} == {dirs["done"], dirs["tmp"]}
    assert all(f"pid {os.getpid()}" in holder for _, holder in busy)
    assert dirs["done"].is_dir() and dirs["tmp"].is_dir() and not dirs["other"].exists()
    assert res.returncode == 0 and res.stdout.count("in use by a running build") == 2, res.stdout
    assert cache.remove("convert") == (2000, [])
    assert not dirs["done"].exists() and not dirs["tmp"].exists()


def test_clean_refuses_an_unknown_stage():
    cache = Cache()
    dirs = _fake_artifacts(cache.root)
    res = cli("clean", "--stage", "nosuch")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--stage: unknown stage 'nosuch'" in res.stderr and "convert" in res.stderr
    assert all(d.is_dir() for d in dirs.values())
    res = cli("clean", "--stage", "source")
    assert res.returncode == 0 and not dirs["other"].exists() and dirs["done"].is_dir()
