"""The trtllm backend against the recorded TensorRT-LLM 1.2.1 contract: emitted trtllm-build
commands vs the argparse flag set (tests/data/trtllm_1_2_1_build_flags.json), tensor-parallel
shards vs facts/trtllm.md §7-§8, the doctor's refusals, Dockerfile.ngc, and (on a GPU with
tensorrt_llm) a real engine."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import FAMILY_NAMES

from trt_pipeline.backends import trtllm
from trt_pipeline.checkpoint.desc import ModelDesc
from trt_pipeline.checkpoint.io import (
    StreamWriter,
    TensorSpec,
    rank_file,
    read_config,
    write_config,
)
from trt_pipeline.checkpoint.shard import merge_checkpoint, merge_ranks, split_checkpoint
from trt_pipeline.errors import BadInput, StageFailed
from trt_pipeline.plan import make_plan
from trt_pipeline.plan import max_num_tokens as plan_max_num_tokens
from trt_pipeline.quant.schemes import select_scheme
from trt_pipeline.recipe.load import load_recipe
from trt_pipeline.reference.model import ReferenceModel
from trt_pipeline.stages.base import Artifact, StageContext
from trt_pipeline.stages.build_trtllm import BuildTrtllmParams, make_spec
from trt_pipeline.stages.build_trtllm import run as run_stage
from trt_pipeline.targets import TARGETS

REPO = Path(__file__).resolve().parents[1]
FLAGS = json.loads((REPO / "tests/data/trtllm_1_2_1_build_flags.json").read_text())
# Every shipped trtllm recipe and the tiny family that stands in for its hub source.
TRTLLM_RECIPES = {"llama-3.2-1b-int4-awq-trtllm.yaml": "llama",
                  "mixtral-8x7b-int4-trtllm.yaml": "mixtral"}
HAVE_QUANT_FIXTURE = (Path(__file__).parent / "quant_fixture.py").is_file()


# --- the recorded 1.2.1 flag set ------------------------------------------------------------


def check_command(argv: list[str]) -> list[str]:
    """Every reason argv is not a valid trtllm-build 1.2.1 command line."""
    flags = FLAGS["flags"]
    alias = {a: f for f, rule in flags.items() for a in rule.get("aliases", ())}
    errors = [] if argv[:1] == [FLAGS["program"]] else [f"program {argv[:1]}"]
    seen: set[str] = set()
    i = 1
    while i < len(argv):
        flag = argv[i]
        i += 1
        name = alias.get(flag, flag)
        rule = flags.get(name, {})
        values = []
        while rule.get("action") != "store_true" and i < len(argv) \
                and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if flag in FLAGS["deprecated"] or flag in FLAGS["removed"]:
            kind = "deprecated" if flag in FLAGS["deprecated"] else "removed"
            errors.append(f"{flag}: {kind} in 1.2.1")
            continue
        if name not in flags:
            errors.append(f"{flag}: unknown flag")
            continue
        if name in seen:
            errors.append(f"{flag}: given twice")
        seen.add(name)
        if rule.get("action") == "store_true":
            continue
        if len(values) != 1 and rule.get("nargs") != "+" or not values:
            errors.append(f"{flag}: {len(values)} values")
            continue
        for v in values:
            errors += [f"{flag} {v}: {e}" for e in _value_errors(rule, v)]
    return errors


def _value_errors(rule: dict, v: str) -> list[str]:
    if rule.get("type") == "int":
        if not v.lstrip("-").isdigit():
            return ["not an int"]
        n = int(v)
        if n < rule.get("min", n) or n > rule.get("max", n):
            return ["out of range"]
        if rule.get("power_of_two") and n & (n - 1):
            return ["not a power of two"]
    choices = rule.get("choices")
    got = v.lower() if rule.get("case_insensitive") else v
    if choices and got not in choices:
        return [f"not one of {choices}"]
    if got in rule.get("rejected", ()):
        return ["rejected by build.py"]
    return []


def _recipe_spec(path: Path, tiny_hf, tiny_ckpt, tmp_path: Path):
    """recipe -> stage params -> spec, with the checkpoint config the quantize stage writes."""
    fam = TRTLLM_RECIPES[path.name]
    loaded = load_recipe(path, [f"model.source={tiny_hf[fam]}"])
    r = loaded.recipe
    params = BuildTrtllmParams.from_build(r.build, target_sm=TARGETS[r.build.target].sm,
                                          max_num_tokens=plan_max_num_tokens(loaded))
    cfg = read_config(tiny_ckpt[fam])
    cfg["dtype"] = r.model.dtype
    if r.quantize.method != "none":
        scheme, problems = select_scheme(r.quantize.method, r.quantize.bits, r.quantize.group_size)
        assert not problems
        cfg["quantization"]["quant_algo"] = scheme.quant_algo
    return loaded, make_spec(params, cfg, tmp_path / "ckpt", tmp_path / "engine")


def test_every_trtllm_recipe_is_listed():
    import yaml

    shipped = {p.name for p in (REPO / "recipes").rglob("*.yaml")
               if yaml.safe_load(p.read_text())["build"]["backend"] == "trtllm"}
    assert shipped == set(TRTLLM_RECIPES)


@pytest.mark.parametrize("recipe", sorted(TRTLLM_RECIPES))
def test_recipe_command_parses_against_1_2_1(recipe, tiny_hf, tiny_ckpt, tmp_path):
    loaded, spec = _recipe_spec(REPO / "recipes" / recipe, tiny_hf, tiny_ckpt, tmp_path)
    argv = trtllm.build_command(spec)
    assert check_command(argv) == []
    args = dict(zip(argv[1::2], argv[2::2], strict=True))
    # consumer limits from the recipe, never upstream's 2048 / 8192
    assert 1 <= int(args["--max_batch_size"]) <= 8
    assert int(args["--max_num_tokens"]) <= 2048
    assert 2048 <= int(args["--max_seq_len"]) <= 4096
    assert Path(args["--output_timing_cache"]).parent == spec.output_dir
    assert args["--input_timing_cache"] == args["--output_timing_cache"]
    assert args["--gemm_plugin"] == "disable"  # weight-only: the groupwise plugin is trtllm-build's
    assert args["--moe_plugin"] == ("auto" if TRTLLM_RECIPES[recipe] == "mixtral" else "disable")
    # and the recipe plans (limits shrunk to the tiny model's 512 positions)
    plan = make_plan(load_recipe(REPO / "recipes" / recipe, [
        f"model.source={tiny_hf[TRTLLM_RECIPES[recipe]]}", "build.max_seq_len=512",
        "build.max_input_len=256"]))
    assert plan.family.name == TRTLLM_RECIPES[recipe]


def test_llama_recipe_command(tiny_hf, tiny_ckpt, tmp_path):
    _, spec = _recipe_spec(REPO / "recipes/llama-3.2-1b-int4-awq-trtllm.yaml", tiny_hf, tiny_ckpt,
                           tmp_path)
    c, e = spec.checkpoint_dir, spec.output_dir
    assert shlex.join(trtllm.build_command(spec)) == (
        f"trtllm-build --checkpoint_dir {c} --output_dir {e} --max_batch_size 4 "
        "--max_input_len 2048 --max_seq_len 4096 --max_num_tokens 2048 --max_beam_width 1 "
        "--kv_cache_type paged --gpt_attention_plugin auto --gemm_plugin disable "
        "--moe_plugin disable --context_fmha enable --remove_input_padding enable "
        "--use_paged_context_fmha enable --tokens_per_block 32 "
        f"--input_timing_cache {e}/timing.cache --output_timing_cache {e}/timing.cache "
        "--workers 1 --log_level info")


def test_checker_rejects_deprecated_removed_and_bad_values(tiny_hf, tiny_ckpt, tmp_path):
    _, spec = _recipe_spec(REPO / "recipes/llama-3.2-1b-int4-awq-trtllm.yaml", tiny_hf, tiny_ckpt,
                           tmp_path)
    argv = trtllm.build_command(spec)
    assert check_command([*argv, "--paged_kv_cache", "enable"]) == [
        "--paged_kv_cache: deprecated in 1.2.1"]
    assert check_command([*argv, "--use_custom_all_reduce", "enable"]) == [
        "--use_custom_all_reduce: removed in 1.2.1"]
    assert check_command([*argv, "--strongly_typed"]) == ["--strongly_typed: removed in 1.2.1"]
    assert check_command([*argv, "--max_tokens", "8"]) == ["--max_tokens: unknown flag"]
    bad = [x if x != "paged" else "pagd" for x in argv]
    assert check_command(bad)[0].startswith("--kv_cache_type pagd: not one of")
    assert check_command([*argv[:-2], "--log_level", "loud"])[0].startswith("--log_level loud")
    i = argv.index("--max_batch_size")
    assert check_command([*argv[:i + 1], "0", *argv[i + 2:]]) == [
        "--max_batch_size 0: out of range"]
    assert check_command([*argv, "--streamingllm", "enable"]) == [
        "--streamingllm enable: rejected by build.py"]


def _spec(**kw) -> trtllm.TrtllmBuildSpec:
    base = dict(checkpoint_dir=Path("/c"), output_dir=Path("/e"), timing_cache=Path("/e/t"),
                checkpoint_dtype="float16", quant_algo=None, kv_cache_quant_algo=None, moe=False,
                max_batch_size=2, max_input_len=512, max_seq_len=1024, max_num_tokens=1024,
                gpt_attention_plugin="auto", gemm_plugin="auto", moe_plugin="auto",
                kv_cache_type="paged", workers=1, target_sm=86)
    return trtllm.TrtllmBuildSpec(**{**base, **kw})


def test_gemm_plugin_rule():
    assert trtllm.gemm_plugin(_spec()) == "auto"
    for algo in ("W4A16_AWQ", "W4A16", "W8A16"):
        assert trtllm.gemm_plugin(_spec(quant_algo=algo)) == "disable"
    assert trtllm.gemm_plugin(_spec(quant_algo="W4A16_AWQ", gemm_plugin="float16")) == "float16"
    with pytest.raises(BadInput) as e:
        trtllm.build_command(_spec(gemm_plugin="bfloat16", max_input_len=2048))
    msg = str(e.value)
    assert "build.plugins.gemm: got bfloat16; the checkpoint is float16" in msg
    assert "build.max_input_len: got 2048, more than build.max_seq_len (1024)" in msg
    with pytest.raises(BadInput, match="MoeOOTB raises"):
        trtllm.build_command(_spec(moe=True, moe_plugin="disable", quant_algo="W4A16"))
    argv = trtllm.build_command(_spec(kv_cache_type="continuous"))
    assert argv[argv.index("--use_paged_context_fmha") + 1] == "disable"
    assert check_command(argv) == []
    # builder.build raises for INT4/INT8 weight-only on SM100-SM119 (facts §5): refused up front
    for algo in ("W4A16_AWQ", "W8A16"):
        with pytest.raises(BadInput, match=f"quantize.method: {algo} weight-only GEMMs raise on "
                           "SM100"):
            trtllm.build_command(_spec(quant_algo=algo, target_sm=100))
    assert check_command(trtllm.build_command(_spec(quant_algo="W4A16_AWQ", target_sm=120))) == []
    assert check_command(trtllm.build_command(_spec(target_sm=100))) == []


def test_plan_prints_the_trtllm_command(tiny_hf):
    """`build-engine plan RECIPE --backend trtllm`: the command the build stage will run, with
    the recipe's limits and the cache dirs of the stages the plan resolved."""
    from click.testing import CliRunner

    from trt_pipeline.cli import cli

    args = ["plan", str(REPO / "recipes/default.yaml"), "--backend", "trtllm",
            "build.max_batch_size=3", "build.max_input_len=200", "build.max_seq_len=300"]
    done = CliRunner().invoke(cli, [*args, "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    argv = summary["command"]
    assert check_command(argv) == []
    flags = dict(zip(argv[1::2], argv[2::2], strict=True))
    dirs = {s["stage"]: s["dir"] for s in summary["stages"]}
    assert summary["backend"] == "trtllm" and "build_trtllm" in dirs
    assert flags["--checkpoint_dir"] == dirs["quantize"]
    assert flags["--output_dir"] == dirs["build_trtllm"]  # built in a staging dir, renamed to it
    assert flags["--output_timing_cache"] == f"{dirs['build_trtllm']}/timing.cache"
    assert (flags["--max_batch_size"], flags["--max_input_len"], flags["--max_seq_len"]) == (
        "3", "200", "300")
    assert flags["--gemm_plugin"] == "disable" and flags["--moe_plugin"] == "disable"
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "trtllm-build command:" in text.output
    assert " ".join(argv) in " ".join(text.output.split())


# --- the doctor and refusals ------------------------------------------------------------------


def test_pinned_triple():
    assert (trtllm.TRTLLM_VERSION, trtllm.TENSORRT_VERSION, trtllm.CUDA_VERSION) == (
        "1.2.1", "10.14.1", "13.1")
    assert trtllm.NGC_IMAGE == "nvcr.io/nvidia/tensorrt-llm/release:1.2.1"


def test_parse_nvidia_smi():
    gpus = trtllm.parse_nvidia_smi("0, NVIDIA GeForce RTX 3060, 8.6, 11802, 12288, 580.95.05\n"
                                   "1, NVIDIA H200, 9.0, 140000, 143771, 590.44.01\n")
    assert [(g.index, g.sm, g.free_mib, g.driver) for g in gpus] == [
        (0, 86, 11802, "580.95.05"), (1, 90, 140000, "590.44.01")]


@pytest.mark.skipif(trtllm._trtllm_version() is not None, reason="tensorrt_llm is installed")
def test_doctor_and_run_build_without_tensorrt_llm(tmp_path):
    report = trtllm.doctor()
    assert report.versions["tensorrt_llm"] == "absent" and not report.ok
    first = report.problems[0]
    assert first.path == "tensorrt_llm" and "not installed" in first.message
    assert "Dockerfile.ngc" in first.fix and trtllm.NGC_IMAGE in first.fix
    log = tmp_path / "build.log"
    with pytest.raises(StageFailed) as e:
        trtllm.run_build(_spec(output_dir=tmp_path / "engine"), log)
    assert "tensorrt_llm: not installed" in str(e.value) and trtllm.NGC_IMAGE in str(e.value)
    assert not log.exists() and not (tmp_path / "engine").exists()
    with pytest.raises(BadInput):  # a bad spec is refused before the environment is looked at
        trtllm.run_build(_spec(gemm_plugin="float32"), log)


def test_doctor_refuses_a_wrong_tensorrt_llm(tmp_path):
    fake = tmp_path / "site" / "tensorrt_llm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "1.1.0"\n')
    script = (
        "from pathlib import Path\n"
        "from trt_pipeline.backends import trtllm\n"
        "from trt_pipeline.errors import StageFailed\n"
        "print(trtllm.doctor().render())\n"
        "from trt_pipeline.doctor import report\n"
        "print('DOCTOR OK', report()[1])\n"
        "spec = trtllm.TrtllmBuildSpec(Path('c'), Path('e'), Path('e/t'), 'float16', None, None,"
        " False, 1, 8, 16, 16, 'auto', 'auto', 'auto', 'paged', 1, 86)\n"
        "try:\n    trtllm.run_build(spec, Path('log'))\n"
        "except StageFailed as exc:\n    print('REFUSED', exc)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tensorrt_llm: 1.1.0" in out.stdout
    assert "tensorrt_llm: got 1.1.0; this pipeline pins 1.2.1" in out.stdout
    assert "pip install tensorrt-llm==1.2.1" in out.stdout and trtllm.NGC_IMAGE in out.stdout
    assert "REFUSED trtllm backend: the build cannot run here." in out.stdout
    assert "DOCTOR OK False" in out.stdout  # `build-engine doctor` exits 1 in that container
    assert not (tmp_path / "log").exists()


def test_doctor_refuses_a_driver_of_an_older_cuda_major(monkeypatch):
    row = "0, NVIDIA GeForce RTX 3060, 8.6, 11000, 12288, 575.57.08"
    monkeypatch.setattr(trtllm, "_nvidia_smi", lambda: (trtllm.parse_nvidia_smi(row), "", "12.9"))
    monkeypatch.setattr(trtllm, "_trtllm_version", lambda: trtllm.TRTLLM_VERSION)
    problems = {p.path: p.message for p in trtllm.doctor().problems}
    assert "CUDA 12.9" in problems["driver CUDA"] and "13.1" in problems["driver CUDA"]
    assert "driver" in problems  # 575 < R580 too


def test_stage_refuses_before_splitting(tiny_ckpt, tmp_path):
    params = BuildTrtllmParams(target_sm=86, dtype="auto", max_batch_size=1, max_input_len=128,
                               max_seq_len=256, max_num_tokens=256, gpt_attention_plugin="auto",
                               gemm_plugin="auto", moe_plugin="auto", kv_cache_type="paged",
                               kv_cache_dtype="auto", tp_size=2, pp_size=1, workers=1)
    ckpt = Artifact("convert", "k", tiny_ckpt["llama"])
    ctx = StageContext(tmp_path / "out", params, {"checkpoint": ckpt}, logging.getLogger("t"))
    ctx.out.mkdir()
    if trtllm._trtllm_version() is None:
        with pytest.raises(StageFailed, match="tensorrt_llm: not installed"):
            run_stage(ctx)
        assert list(ctx.out.iterdir()) == []
    with pytest.raises(BadInput, match="build.kv_cache.dtype: got int8; the checkpoint's "
                       "kv_cache_quant_algo is None"):
        run_stage(replace(ctx, params=replace(params, kv_cache_dtype="int8")))


def test_hunyuan_is_refused_for_trtllm(tiny_hf):
    with pytest.raises(BadInput) as e:
        make_plan(load_recipe(REPO / "recipes/llama-3.2-1b-int4-awq-trtllm.yaml", [
            f"model.source={tiny_hf['hunyuan']}", "model.family=auto", "build.max_seq_len=512",
            "build.max_input_len=256"]))
    msg = str(e.value)
    assert "build.backend: hunyuan cannot be built by the trtllm backend" in msg
    assert "build.backend=rtx" in msg


def test_dockerfile_ngc():
    lines = [ln.strip() for ln in (REPO / "Dockerfile.ngc").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    assert [ln for ln in lines if ln.startswith("FROM")] == [f"FROM {trtllm.NGC_IMAGE}"]
    text = "\n".join(lines)
    assert "pip install --no-cache-dir --no-deps ." in text
    pip_args = " ".join(ln for ln in lines if "pip install" in ln).split()
    assert not any(a.strip('"').split(">")[0].split("=")[0] in ("torch", "tensorrt",
                                                                 "tensorrt-llm") for a in pip_args)
    assert "TRT_PIPELINE_CACHE=/cache" in text and "TRT_PIPELINE_ENGINES=/engines" in text
    volume = next(ln for ln in lines if ln.startswith("VOLUME"))
    assert set(json.loads(volume.removeprefix("VOLUME"))) == {"/cache", "/engines"}
    entry = next(ln for ln in lines if ln.startswith("ENTRYPOINT"))
    assert json.loads(entry.removeprefix("ENTRYPOINT")) == ["build-engine"]


# --- tensor-parallel shards -------------------------------------------------------------------


def rank_shapes_from_facts(desc: ModelDesc, tp: int) -> dict[str, tuple[int, ...]]:
    """Float shapes per rank, written from facts/trtllm.md §7's formulas (pp=1)."""
    h, hd, nq, v = desc.hidden_size, desc.head_size, desc.num_heads, desc.vocab_size
    kv = max(desc.num_kv_heads, tp)  # K/V heads duplicated up to tp (dup_kv_weight)
    out = {"transformer.vocab_embedding.weight": (v, h), "transformer.ln_f.weight": (h,)}
    if tp > 1 or not desc.tie_word_embeddings:
        out["lm_head.weight"] = (math.ceil(v / tp), h)  # pad_vocab_size(v, tp) / tp
    for i in range(desc.num_layers):
        p = f"transformer.layers.{i}"
        out |= {f"{p}.input_layernorm.weight": (h,), f"{p}.post_layernorm.weight": (h,),
                f"{p}.attention.qkv.weight": ((nq + 2 * kv) * hd // tp, h),
                f"{p}.attention.dense.weight": (h, nq * hd // tp)}
        if desc.attn_bias:
            out[f"{p}.attention.qkv.bias"] = ((nq + 2 * kv) * hd // tp,)
        if desc.qk_norm:
            out |= {f"{p}.attention.q_layernorm.weight": (hd,),
                    f"{p}.attention.k_layernorm.weight": (hd,)}
        if desc.moe is None:
            inter = desc.intermediate_size
            out |= {f"{p}.mlp.fc.weight": (inter // tp, h), f"{p}.mlp.gate.weight":
                    (inter // tp, h), f"{p}.mlp.proj.weight": (h, inter // tp)}
            continue
        e, i_, s = desc.moe.num_experts, desc.moe.intermediate_size, \
            desc.moe.shared_intermediate_size
        out |= {f"{p}.mlp.router.weight": (e, h), f"{p}.mlp.fc.weight": (e, 2 * i_ // tp, h),
                f"{p}.mlp.proj.weight": (e, h, i_ // tp)}
        if s:
            out |= {f"{p}.mlp.shared_expert.fc.weight": (2 * s // tp, h),
                    f"{p}.mlp.shared_expert.proj.weight": (h, s // tp)}
        if desc.moe.shared_gate:
            out[f"{p}.mlp.shared_expert_gate.weight"] = (1, h)
    return out


def quantized_shapes(desc: ModelDesc, float_shapes: dict, algo: str, group: int) -> dict:
    """facts §8: W4A16_AWQ weight [out/2, in] int8, weights_scaling_factor [out, in/group],
    prequant_scaling_factor [in]; W8A16/W4A16 weight [in, out(/2)], per_channel_scale [out]."""
    out = {}
    for name, shape in float_shapes.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and len(shape) >= 2 and desc.quant.quantized(module)
                and not name.startswith(("transformer.vocab_embedding", "lm_head"))):
            out[name] = shape
            continue
        *lead, o, i = shape
        if algo == "W4A16_AWQ":
            out |= {name: (*lead, o // 2, i), f"{module}.weights_scaling_factor":
                    (*lead, o, i // group), f"{module}.prequant_scaling_factor": (*lead, i)}
        else:
            out |= {name: (*lead, i, o // 2 if algo == "W4A16" else o),
                    f"{module}.per_channel_scale": (*lead, o)}
    return out


def _rank_shapes(ckpt_dir: Path, rank: int) -> dict[str, tuple[int, ...]]:
    with safe_open(str(ckpt_dir / rank_file(rank)), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _assert_roundtrip(src: Path, split_dir: Path, tmp_path: Path) -> None:
    tp1 = _load_all(src)
    merged = merge_ranks(split_dir)
    assert set(merged) == set(tp1)
    assert all(torch.equal(merged[n], tp1[n]) and merged[n].dtype == tp1[n].dtype for n in tp1)
    ids = torch.tensor([[1, 5, 9, 200, 33, 7, 64]])
    want = ReferenceModel.load(src).forward(ids)
    got = ReferenceModel.load(merge_checkpoint(split_dir, tmp_path / "merged")).forward(ids)
    assert torch.equal(got, want)


def _load_all(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt_dir / rank_file(0)), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tp2_float_split(family, tiny_ckpt, tmp_path):
    out = tmp_path / "tp2"
    split_checkpoint(tiny_ckpt[family], out, 2)
    cfg = read_config(out)
    assert cfg["mapping"] == {"world_size": 2, "gpus_per_node": 8, "cp_size": 1, "tp_size": 2,
                              "pp_size": 1, "moe_tp_size": 2, "moe_ep_size": 1,
                              "moe_cluster_size": 1, "attn_tp_size": 2, "attn_cp_size": 1,
                              "cp_config": {}, "enable_attention_dp": False,
                              "enable_lm_head_tp_in_adp": False}
    desc = ModelDesc.from_config(read_config(tiny_ckpt[family]))
    want = rank_shapes_from_facts(desc, 2)
    for r in range(2):
        assert _rank_shapes(out, r) == want
    _assert_roundtrip(tiny_ckpt[family], out, tmp_path)


@pytest.mark.skipif(not HAVE_QUANT_FIXTURE, reason="tests/quant_fixture.py is not there yet")
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tp2_awq_split(family, tiny_ckpt, tmp_path):
    from quant_fixture import rtn_w4a16_awq

    # group 64: the tiny MLPs (384, and 128 per expert) leave 192 / 64 input columns per rank
    src = rtn_w4a16_awq(tiny_ckpt[family], tmp_path / "awq", group=64)
    out = tmp_path / "tp2"
    split_checkpoint(src, out, 2)
    desc = ModelDesc.from_config(read_config(src))
    want = quantized_shapes(desc, rank_shapes_from_facts(desc, 2), "W4A16_AWQ", 64)
    for r in range(2):
        assert _rank_shapes(out, r) == want
    _assert_roundtrip(src, out, tmp_path)


@pytest.mark.skipif(not HAVE_QUANT_FIXTURE, reason="tests/quant_fixture.py is not there yet")
@pytest.mark.parametrize("family,algo", [("llama", "W4A16"), ("mixtral", "W4A16"),
                                         ("qwen2_moe", "W8A16")])
def test_tp2_weight_only_split(family, algo, tiny_ckpt, tmp_path):
    from quant_fixture import rtn_weight_only

    src = rtn_weight_only(tiny_ckpt[family], tmp_path / "wo", algo)
    out = tmp_path / "tp2"
    split_checkpoint(src, out, 2)
    desc = ModelDesc.from_config(read_config(src))
    want = quantized_shapes(desc, rank_shapes_from_facts(desc, 2), algo, 0)
    for r in range(2):
        assert _rank_shapes(out, r) == want
    _assert_roundtrip(src, out, tmp_path)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_tp2_split_of_float_weights_under_weight_only(family, tiny_ckpt, tmp_path):
    """What the quantize stage writes for trtllm per channel: float weights under a W4A16
    config (trtllm-build quantizes them). They split as float: the float split's shapes."""
    src = tmp_path / "wo-float"
    shutil.copytree(tiny_ckpt[family], src)
    cfg = read_config(src)
    cfg["quantization"] = {**(cfg.get("quantization") or {}), "quant_algo": "W4A16",
                           "group_size": -1, "exclude_modules": ["lm_head"]}
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "tp2"
    split_checkpoint(src, out, 2)
    assert read_config(out)["quantization"]["quant_algo"] == "W4A16"
    want = rank_shapes_from_facts(ModelDesc.from_config(read_config(tiny_ckpt[family])), 2)
    for r in range(2):
        assert _rank_shapes(out, r) == want
    _assert_roundtrip(src, out, tmp_path)


@pytest.mark.skipif(not HAVE_QUANT_FIXTURE, reason="tests/quant_fixture.py is not there yet")
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_tp2_contents_follow_the_converters(family, tiny_ckpt, tmp_path):
    """Rank tensors rebuilt here from the tp=1 ones by the converters' rules (llama/convert.py,
    qwen/convert.py): q/k/v split separately, fc = [w3 | w1] split per half, proj on its input,
    router replicated; AWQ scales and pre-quant scales follow their linear."""
    from quant_fixture import rtn_w4a16_awq

    src = rtn_w4a16_awq(tiny_ckpt[family], tmp_path / "awq", group=64)
    split_checkpoint(src, tmp_path / "tp2", 2)
    desc = ModelDesc.from_config(read_config(src))
    full = _load_all(src)
    q, kv = desc.q_size, desc.kv_size
    p = "transformer.layers.1"
    for r in range(2):
        got = _load_all_rank(tmp_path / "tp2", r)

        def half(t, dim, r=r):
            return t.chunk(2, dim=dim)[r]

        for leaf, packed in (("weight", 2), ("weights_scaling_factor", 1)):
            w = full[f"{p}.attention.qkv.{leaf}"]
            parts = w.split([q // packed, kv // packed, kv // packed])
            assert torch.equal(got[f"{p}.attention.qkv.{leaf}"],
                               torch.cat([half(x, 0) for x in parts]))
        assert torch.equal(got[f"{p}.attention.qkv.prequant_scaling_factor"],
                           full[f"{p}.attention.qkv.prequant_scaling_factor"])
        for leaf in ("weight", "weights_scaling_factor", "prequant_scaling_factor"):
            name = f"{p}.attention.dense.{leaf}"
            assert torch.equal(got[name], half(full[name], -1))
            name = f"{p}.mlp.proj.{leaf}"
            assert torch.equal(got[name], half(full[name], -1))
        for leaf in ("weight", "weights_scaling_factor"):
            name = f"{p}.mlp.fc.{leaf}"
            w3, w1 = full[name].chunk(2, dim=-2)
            assert torch.equal(got[name], torch.cat([half(w3, -2), half(w1, -2)], dim=-2))
        assert torch.equal(got[f"{p}.mlp.router.weight"], full[f"{p}.mlp.router.weight"])
        assert torch.equal(got["lm_head.weight"], half(full["lm_head.weight"], 0))
        if desc.moe.shared_intermediate_size:
            name = f"{p}.mlp.shared_expert.fc.weight"
            up, gate = full[name].chunk(2, dim=0)
            assert torch.equal(got[name], torch.cat([half(up, 0), half(gate, 0)]))
        if desc.attn_bias:
            b = full[f"{p}.attention.qkv.bias"].split([q, kv, kv])
            assert torch.equal(got[f"{p}.attention.qkv.bias"], torch.cat([half(x, 0) for x in b]))


@pytest.mark.parametrize("family", ["qwen2", "mixtral"])
def test_tp4_duplicates_kv_heads(family, tiny_ckpt, tmp_path):
    out = tmp_path / "tp4"  # 2 KV heads over 4 ranks: each head on two ranks
    split_checkpoint(tiny_ckpt[family], out, 4)
    desc = ModelDesc.from_config(read_config(tiny_ckpt[family]))
    for r in range(4):
        assert _rank_shapes(out, r) == rank_shapes_from_facts(desc, 4)
    ranks = [_load_all_rank(out, r) for r in range(4)]
    hd, q = desc.head_size, desc.num_heads * desc.head_size // 4
    k = [t["transformer.layers.0.attention.qkv.weight"][q:q + hd] for t in ranks]
    assert torch.equal(k[0], k[1]) and torch.equal(k[2], k[3]) and not torch.equal(k[1], k[2])
    _assert_roundtrip(tiny_ckpt[family], out, tmp_path)


def _load_all_rank(ckpt_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt_dir / rank_file(rank)), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_pp2_tp2_stages(tiny_ckpt, tmp_path):
    out = tmp_path / "pp2"
    split_checkpoint(tiny_ckpt["qwen3"], out, 2, 2)
    assert read_config(out)["mapping"]["world_size"] == 4
    first, last = _rank_shapes(out, 1), _rank_shapes(out, 3)  # tp rank 1 of each stage
    assert "transformer.vocab_embedding.weight" in first and "lm_head.weight" not in first
    assert "transformer.ln_f.weight" in last and "lm_head.weight" in last  # tied: a copy
    assert {n.split(".")[2] for n in last if n.startswith("transformer.layers.")} == {"0"}
    _assert_roundtrip(tiny_ckpt["qwen3"], out, tmp_path)


def test_vocab_is_padded_to_a_multiple_of_tp(tiny_ckpt, tmp_path):
    src = tmp_path / "v509"  # the tiny llama with 509 tokens
    cfg = read_config(tiny_ckpt["llama"])
    cfg["vocab_size"] = 509
    tensors = _load_all(tiny_ckpt["llama"])
    for n in ("transformer.vocab_embedding.weight", "lm_head.weight"):
        tensors[n] = tensors[n][:509].clone()
    specs = {n: TensorSpec(tuple(t.shape), "float32") for n, t in tensors.items()}
    with StreamWriter(src / rank_file(0), specs) as w:
        for n in specs:
            w.write(n, tensors[n])
    write_config(src, cfg)
    split_checkpoint(src, tmp_path / "tp2", 2)
    heads = [_load_all_rank(tmp_path / "tp2", r)["lm_head.weight"] for r in range(2)]
    assert [tuple(h.shape) for h in heads] == [(255, 256), (255, 256)]
    assert torch.equal(heads[1][-1], torch.zeros(256))  # pad_vocab_size rows are zero
    _assert_roundtrip(src, tmp_path / "tp2", tmp_path)


@pytest.mark.skipif(not HAVE_QUANT_FIXTURE, reason="tests/quant_fixture.py is not there yet")
def test_split_refuses_groups_that_do_not_divide(tiny_ckpt, tmp_path):
    from quant_fixture import rtn_w4a16_awq

    src = rtn_w4a16_awq(tiny_ckpt["llama"], tmp_path / "awq", group=128)
    with pytest.raises(BadInput) as e:
        split_checkpoint(src, tmp_path / "tp2", 2)
    assert ("tp_size: transformer.layers.{i}.mlp.proj.weights_scaling_factor [256, 3]: 3 is "
            "not divisible by tp_size=2") in str(e.value)
    assert not (tmp_path / "tp2").exists()
    with pytest.raises(BadInput, match="4 query / 2 key-value heads cannot be split over "
                       "tp_size=3"):
        split_checkpoint(tiny_ckpt["llama"], tmp_path / "tp3", 3)


# --- the ModelRunnerCpp adapter, against a stand-in with ModelRunnerCpp.generate's contract ----


class FakeModelRunnerCpp:
    """generate(batch_input_ids, ...) as ModelRunnerCpp 1.2.1 returns it with return_dict and
    output_sequence_lengths (facts §12): output_ids [batch, beams, max_len] holding the prompt,
    then the generated ids, padded with pad_id; sequence_lengths [batch, beams]. Streaming yields
    one such dict per step; ranks other than 0 get empty dicts."""

    def __init__(self, continuations: list[list[int]], rank0: bool = True) -> None:
        self.continuations = continuations
        self.rank0 = rank0
        self.calls: list[dict] = []

    def generate(self, batch_input_ids, **kw):
        self.calls.append({"ids": [t.tolist() for t in batch_input_ids], **kw})
        steps = [self._out(batch_input_ids, n, kw["pad_id"])
                 for n in range(1, kw["max_new_tokens"] + 1)]
        if kw["streaming"]:
            return iter(s if self.rank0 else {} for s in steps)
        return steps[-1]

    def _out(self, prompts, n: int, pad: int) -> dict:
        width = max(len(p) for p in prompts) + max(map(len, self.continuations))
        ids = torch.full((len(prompts), 1, width), pad, dtype=torch.int32)
        lengths = torch.zeros((len(prompts), 1), dtype=torch.int32)
        for b, (p, c) in enumerate(zip(prompts, self.continuations, strict=True)):
            row = [*p.tolist(), *c[:n]]
            ids[b, 0, :len(row)] = torch.tensor(row, dtype=torch.int32)
            lengths[b, 0] = len(row)
        return {"output_ids": ids, "sequence_lengths": lengths}


def test_modelrunnercpp_adapter_slices_prompts_and_sets_every_argument():
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    cont = [[10, 11, 12], [20, 21, 22]]
    fake = FakeModelRunnerCpp(cont)
    runner = trtllm.TrtllmRunner(fake, {"max_batch_size": 2, "max_seq_len": 64})
    greedy = trtllm.Request(max_new_tokens=3, end_id=2, pad_id=0)
    assert runner.generate(prompts, greedy) == cont
    call = fake.calls[-1]
    assert call["ids"] == prompts
    # greedy is top_k=1 at temperature 1 (ModelRunnerCpp has no temperature-0 mode)
    assert {k: call[k] for k in ("max_new_tokens", "end_id", "pad_id", "top_k", "temperature",
                                 "num_beams", "return_dict", "output_sequence_lengths",
                                 "streaming")} == {
        "max_new_tokens": 3, "end_id": 2, "pad_id": 0, "top_k": 1, "temperature": 1.0,
        "num_beams": 1, "return_dict": True, "output_sequence_lengths": True, "streaming": False}
    sampled = trtllm.Request(max_new_tokens=3, end_id=2, pad_id=0, temperature=0.7, top_k=40,
                             top_p=0.9, repetition_penalty=1.1, seed=5)
    runner.generate(prompts, sampled)
    call = fake.calls[-1]
    assert (call["temperature"], call["top_k"], call["top_p"], call["repetition_penalty"],
            call["random_seed"]) == (0.7, 40, 0.9, 1.1, 5)
    assert list(runner.stream(prompts, greedy)) == [[c[:n] for c in cont] for n in (1, 2, 3)]
    assert fake.calls[-1]["streaming"] is True
    other_rank = trtllm.TrtllmRunner(FakeModelRunnerCpp(cont, rank0=False))
    assert list(other_rank.stream(prompts, greedy)) == []


# --- a real engine (GPU with tensorrt_llm 1.2.1 only) --------------------------------------------


@pytest.mark.gpu
def test_engine_generates(tiny_hf, tmp_path):
    report = trtllm.doctor()
    if report.versions["tensorrt_llm"] == "absent":
        pytest.skip("tensorrt_llm is not installed (use the Dockerfile.ngc container)")
    if not report.gpus:
        pytest.skip("no NVIDIA GPU visible")
    from trt_pipeline.families.apply import convert_checkpoint

    ckpt = tmp_path / "ckpt"
    convert_checkpoint(tiny_hf["llama"], ckpt, "float16")
    spec = _spec(checkpoint_dir=ckpt, output_dir=tmp_path / "engine",
                 timing_cache=tmp_path / "engine/timing.cache", target_sm=report.gpus[0].sm,
                 max_seq_len=256, max_input_len=128, max_num_tokens=256)
    metrics = trtllm.run_build(spec, tmp_path / "build.log")
    assert metrics["runtime"]["version"] == trtllm.TRTLLM_VERSION
    runner = trtllm.load_runner(spec.output_dir)
    prompt = [1, 5, 9, 200, 33]
    out = runner.generate([prompt], trtllm.Request(max_new_tokens=8, end_id=-1, pad_id=0))
    assert len(out[0]) == 8
    logits = ReferenceModel.load(ckpt).forward(torch.tensor([prompt]))
    assert out[0][0] == int(logits[0, -1].argmax())
