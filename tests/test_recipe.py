"""Recipe loading: schema, extends, overrides, and every error located by key path and line."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from conftest import DEFAULT_MODEL, REPO

from trt_pipeline.errors import BadInput
from trt_pipeline.plan import make_plan
from trt_pipeline.recipe.load import load_recipe

BASE = f"""\
name: demo
model:
  source: {DEFAULT_MODEL}
build:
  backend: onnx
  target: cpu
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems(path: Path, overrides=()) -> list[str]:
    with pytest.raises(BadInput) as info:
        make_plan(load_recipe(path, overrides))
    return [p.render() for p in info.value.problems]


def test_defaults_and_resolved_source(tmp_path):
    r = load_recipe(write(tmp_path, BASE)).recipe
    assert r.quantize.method == "none" and r.quantize.group_size == 128
    assert r.build.max_batch_size == 1 and r.runner.max_new_tokens == 64
    assert Path(r.model.source) == DEFAULT_MODEL


def test_relative_source_resolves_against_the_recipe_file(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    rel = Path("..") / "model"
    (tmp_path / "model").symlink_to(DEFAULT_MODEL)
    r = load_recipe(write(sub, BASE.replace(str(DEFAULT_MODEL), str(rel)))).recipe
    assert Path(r.model.source) == (tmp_path / "model").resolve()


def test_every_error_at_once_with_line_numbers(tmp_path):
    p = write(tmp_path, BASE + """\
    max_batch_sise: 4
  max_seq_len: "long"
quantize:
  group_size: 96
""".replace("    max_batch_sise", "  max_batch_sise"))
    msgs = problems(p)
    assert len(msgs) == 3
    assert any("build.max_batch_sise: unknown key. Did you mean build.max_batch_size?" in m
               and f"{p}:7" in m for m in msgs)
    assert any("build.max_seq_len: got 'long' (str); expected an integer" in m for m in msgs)
    assert any("quantize.group_size: got 96; expected one of -1, 64 or 128" in m
               and f"{p}:10" in m for m in msgs)


@pytest.mark.parametrize("text,key,needle", [
    ("build:\n  backend: tensorrt\n", "build.backend", "expected one of 'onnx', 'rtx'"),
    ("build:\n  target: rtx3061\n", "build.target", "Did you mean rtx3060-12gb"),
    ("build:\n  max_batch_size: 0\n", "build.max_batch_size", "expected >= 1"),
    ("build:\n  max_batch_size: 99999999999\n", "build.max_batch_size", "expected <= 4096"),
    ("build:\n  max_input_len: 4096\n  max_seq_len: 1024\n", "build.max_input_len",
     "larger than build.max_seq_len"),
    ("quantize:\n  method: awq\n  bits: 8\n", "quantize.bits", "awq produces 4-bit"),
    ("build:\n  kv_cache:\n    dtype: fp8\n", "build.kv_cache.dtype", "fp8 needs SM89"),
])
def test_field_and_cross_field_errors(tmp_path, text, key, needle):
    base = BASE.replace("backend: onnx\n  target: cpu\n", "backend: rtx\n")
    merged = _merge_yaml(base, text)
    msgs = problems(write(tmp_path, merged))
    assert any(key in m and needle in m for m in msgs), msgs


def _merge_yaml(base: str, extra: str) -> str:
    import yaml

    def merge(a, b):
        for k, v in b.items():
            a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) else v
        return a

    return yaml.safe_dump(merge(yaml.safe_load(base), yaml.safe_load(extra)), sort_keys=False)


def test_model_dependent_rules(tmp_path):
    msgs = problems(write(tmp_path, BASE), ["build.plugins.moe=float16", "quantize.method=rtn",
                                            "quantize.group_size=64",
                                            "quantize.skip_indivisible=false",
                                            "build.max_seq_len=4096"])
    assert any("build.plugins.moe" in m and "dense model" in m for m in msgs)
    assert any("build.max_seq_len" in m and "1024 positions" in m for m in msgs)
    # the default model's widths (128, 384) are multiples of 64: no group problem
    assert not any("quantize.group_size" in m for m in msgs)


def test_group_size_that_divides_nothing(tmp_path, tiny_hf):
    import json

    model = tmp_path / "odd"
    model.mkdir()
    cfg = json.loads((tiny_hf["llama"] / "config.json").read_text())
    cfg.update(hidden_size=96, intermediate_size=160, head_dim=24)
    (model / "config.json").write_text(json.dumps(cfg))
    p = write(tmp_path, BASE.replace(str(DEFAULT_MODEL), str(model)))
    msgs = problems(p, ["quantize.method=rtn"])
    assert any("quantize.group_size: got 128; it divides no layer's input width (96, 160)" in m
               for m in msgs), msgs


def test_extends_merges_and_overrides_win(tmp_path):
    write(tmp_path, BASE + "runner:\n  max_new_tokens: 5\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nname: child\nbuild:\n  max_batch_size: 2\n")
    r = load_recipe(child, ["build.max_batch_size=3", "runner.top_k=7"]).recipe
    assert (r.name, r.build.max_batch_size, r.build.backend) == ("child", 3, "onnx")
    assert (r.runner.max_new_tokens, r.runner.top_k) == (5, 7)


def test_extends_cycle(tmp_path):
    write(tmp_path, BASE + "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    msgs = problems(tmp_path / "a.yaml")
    assert any(m.startswith(f"{tmp_path / 'b.yaml'}:1  extends: cycle:") and "a.yaml -> " in m
               for m in msgs), msgs
    write(tmp_path, BASE + "extends: self.yaml\n", "self.yaml")
    assert any(m.startswith(f"{tmp_path / 'self.yaml'}:7  extends: cycle:")
               for m in problems(tmp_path / "self.yaml"))


def test_cross_field_rules_run_next_to_field_errors(tmp_path):
    p = write(tmp_path, BASE + "  max_batch_size: x\n  max_input_len: 4096\n")
    msgs = problems(p)
    assert any(f"{p}:7  build.max_batch_size: got 'x'" in m for m in msgs), msgs
    assert any(f"{p}:8  build.max_input_len: got 4096, larger than build.max_seq_len (1024)" in m
               for m in msgs), msgs
    # a rule whose own field is invalid is skipped, not run on a default
    msgs = problems(write(tmp_path, BASE + "  max_seq_len: long\n  max_input_len: 4096\n"))
    assert len(msgs) == 1 and "max_seq_len: got 'long'" in msgs[0]
    # a required key missing (placeholder) and a bad section: the other rules still run
    msgs = problems(write(tmp_path, "name: ../x\nmodel: {source: m}\nquantize: 5\n"
                          "build: {target: cpu, backend: rtx, tp_size: 2}\n"))
    assert {m.split("  ")[1].split(":")[0] for m in msgs} == {"name", "quantize", "build.target",
                                                             "build.tp_size"}, msgs


def test_errors_about_overrides_point_at_the_override(tmp_path):
    p = write(tmp_path, BASE + "quantize:\n  calib:\n    samples: 4\n")
    msgs = problems(p, ["quantize.calib.nonexist.deep=1", "build.plugins.moe.x=1",
                        "~build.backend"])
    for where, key in (("quantize.calib.nonexist.deep=1", "quantize.calib.nonexist"),
                       ("build.plugins.moe.x=1", "build.plugins.moe"),
                       ("~build.backend", "build.backend")):
        assert any(m.startswith(f"override {where}  {key}: ") for m in msgs), (where, msgs)
    # a section replaced by an override: its old lines no longer locate anything
    msgs = problems(p, ["quantize.calib={samples: 0}"])
    assert any(m.startswith("override quantize.calib={samples: 0}  quantize.calib.samples")
               for m in msgs), msgs


def test_bench_workload_is_checked_before_the_build(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # relative paths resolve against the recipe, not here
    (tmp_path / "w.jsonl").write_text("")
    (tmp_path / "w.csv").write_text("")
    p = write(tmp_path, BASE + "bench:\n  workload: w.jsonl\n")
    assert load_recipe(p).recipe.bench.workload == str(tmp_path / "w.jsonl")
    assert load_recipe(p, ["bench.workload=synthetic"]).recipe.bench.workload == "synthetic"
    msgs = problems(write(tmp_path, BASE + "bench:\n  workload: gone.jsonl\n"))
    assert any(f"{tmp_path / 'r.yaml'}:8  bench.workload: gone.jsonl does not exist" in m
               for m in msgs), msgs
    msgs = problems(p, ["bench.workload=w.csv"])
    assert any("override bench.workload=w.csv  bench.workload: got 'w.csv'; expected synthetic"
               in m for m in msgs), msgs


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_bench_workload(tmp_path):
    w = tmp_path / "w.txt"
    w.write_text("text")
    w.chmod(0)
    msgs = problems(write(tmp_path, BASE + f"bench:\n  workload: {w}\n"))
    assert any("bench.workload" in m and "is not readable" in m for m in msgs), msgs


def _model_with(tmp_path: Path, name: str, config: str = "llama-3.2-1b.json", **changes) -> Path:
    """A model directory whose config.json is a shipped test config with `changes` (a value of
    ... removes the key); the plan reads nothing else."""
    cfg = json.loads((REPO / "tests" / "data" / "configs" / config).read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not ...}
    model = tmp_path / name
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize("config,changes,needle", [
    ("llama-3.2-1b.json", {"num_attention_heads": ...},
     "config.json has no num_attention_heads; expected a positive integer"),
    ("llama-3.2-1b.json", {"hidden_size": "big"},
     "config.json hidden_size: got 'big' (str); expected a positive integer"),
    ("llama-3.2-1b.json", {"num_hidden_layers": True},
     "config.json num_hidden_layers: got True (bool); expected a positive integer"),
    ("llama-3.2-1b.json", {"rms_norm_eps": "small"},
     "config.json rms_norm_eps: got 'small' (str); expected a positive number"),
    ("hunyuan-0.5b.json", {"rope_scaling": "dynamic"},
     "config.json rope_scaling: got 'dynamic' (str); expected a mapping or null"),
    ("mixtral-8x7b.json", {"num_local_experts": ...},
     "config.json has no num_local_experts, which the mixtral family needs"),
    ("llama-3.2-1b.json", {"architectures": [{"a": 1}]},
     "config.json architectures: got [{'a': 1}]; expected a list of class names"),
    ("llama-3.2-1b.json", {"quantization_config": "gptq"}, "already quantized (?)"),
])
def test_broken_model_config_is_bad_input(tmp_path, config, changes, needle):
    model = _model_with(tmp_path, "m", config, **changes)
    p = write(tmp_path, BASE.replace(str(DEFAULT_MODEL), str(model)))
    msgs = problems(p)
    assert any("model.source: " + needle in m for m in msgs), msgs


def test_override_deletion_and_unknown_keys(tmp_path):
    p = write(tmp_path, BASE + "runner:\n  top_k: 3\n")
    assert load_recipe(p, ["~runner.top_k"]).recipe.runner.top_k == 0
    msgs = problems(p, ["build.max_batch_sise=4", "~runner.nothing", "nonsense"])
    assert any("override build.max_batch_sise=4  build.max_batch_sise: unknown key. Did you "
               "mean build.max_batch_size?" in m for m in msgs)
    assert any("runner.nothing: nothing to delete" in m for m in msgs)
    assert any("not an override: 'nonsense'" in m for m in msgs)


@pytest.mark.parametrize("content,needle", [
    (b"name: x\nbuild: [\n", ":3  YAML syntax error"),
    (b"name: \xff\xfe\n", ":1  not UTF-8"),
    (b"- a\n- b\n", "top level is a list"),
    (b"name: a\nname: b\n", "name: duplicate key"),
])
def test_unreadable_files(tmp_path, content, needle):
    p = tmp_path / "bad.yaml"
    p.write_bytes(content)
    msgs = problems(p)
    assert any(needle in m for m in msgs), msgs


def test_missing_file_and_bad_sources(tmp_path, tiny_hf):
    assert any("recipe file not found" in m for m in problems(tmp_path / "nope.yaml"))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    msgs = problems(write(tmp_path, BASE.replace(str(DEFAULT_MODEL), str(empty))))
    assert any("model.source" in m and "has no config.json" in m for m in msgs)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    msgs = problems(write(tmp_path, BASE.replace(str(DEFAULT_MODEL), str(gpt2))))
    assert any("unsupported architecture 'GPT2LMHeadModel'" in m and "HunYuanDenseV1" in m
               for m in msgs)
    msgs = problems(write(tmp_path, BASE), ["model.family=lama"])
    assert any("model.family: unknown family 'lama'. Did you mean llama?" in m for m in msgs)
    msgs = problems(write(tmp_path, BASE.replace(str(DEFAULT_MODEL), str(tiny_hf["hunyuan"]))),
                    ["build.backend=trtllm", "build.target=rtx3060-12gb"])
    assert any("build.backend: hunyuan cannot be built by the trtllm backend" in m
               and "rtx" in m for m in msgs)


def test_recipe_name_cannot_escape_the_engines_dir(tmp_path):
    msgs = problems(write(tmp_path, BASE.replace("name: demo", "name: ../../etc")))
    assert any(m.startswith(f"{tmp_path / 'r.yaml'}:1  name: got '../../etc'") for m in msgs)


def shipped_recipes() -> list[Path]:
    return sorted((REPO / "recipes").rglob("*.yaml"))


def tiny_source_overrides(path: Path, tiny_hf) -> list[str]:
    """Recipes whose source is a hub id name their family; tests swap in that family's tiny
    model (nothing is downloaded)."""
    r = load_recipe(path).recipe
    if Path(r.model.source).is_dir():
        return []
    assert r.model.family != "auto", f"{path.name}: a hub source needs model.family"
    return [f"model.source={tiny_hf[r.model.family]}"]


def test_every_shipped_recipe_plans(tiny_hf):
    recipes = shipped_recipes()
    assert len(recipes) >= 3
    for path in recipes:
        text = path.read_text()
        assert text.startswith("#") and path.name in text.split("name:")[0], path.name
        plan = make_plan(load_recipe(path, tiny_source_overrides(path, tiny_hf)))
        assert [s.stage for s in plan.specs][:2] == ["source", "convert"]
