"""TensorRT for RTX: real SM86 engines from the lowered float16 graphs, built on this CPU-only
machine; the INT4 weights stay INT4; bad requests fail before any work; engines run on an RTX GPU
or fall back to ONNX Runtime on the same graph.

Expected weight bytes are computed here from the checkpoint's own tensors (safetensors header), not
from memory_fit: packed int4 bytes as stored, every float tensor at 2 bytes (routers at 4), plus
the RoPE cos/sin tables the graph adds.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from quant_fixture import rtn_w4a16_awq
from tiny_models import FAMILY_NAMES

from trt_pipeline.backends import open_runtime
from trt_pipeline.backends.onnx.lower import lower_checkpoint
from trt_pipeline.backends.onnx.runtime import OnnxModel
from trt_pipeline.backends.rtx.build import (
    ENGINE_FILE,
    LOG_FILE,
    RtxBuildSpec,
    build_engine,
    parse_layers,
    precision_problems,
)
from trt_pipeline.backends.rtx.engine import Gpu, decide, find_gpu
from trt_pipeline.checkpoint.io import Checkpoint
from trt_pipeline.errors import BadInput, StageFailed
from trt_pipeline.memory_fit import compare, estimate
from trt_pipeline.reference.model import ReferenceModel
from trt_pipeline.reference.model import greedy as reference_greedy
from trt_pipeline.targets import TARGETS

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 (extra [rtx]) missing")

SPEC = RtxBuildSpec("rtx3060-12gb", 86, max_batch_size=2, max_input_len=64, max_seq_len=64)
SMS = tuple(int(m[2:]) for m in trt.ComputeCapability.__members__ if m.startswith("SM"))
FP16_MAX_ABS = 0.05  # test_onnx_lowering.py: fp16 graph vs float32 reference on these models


def graph_weight_bytes(ckpt_dir: Path) -> dict[str, int]:
    """Bytes the float16 graph's weights take, from the checkpoint's safetensors header."""
    raw = (ckpt_dir / "rank0.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    out = {"int4": 0, "float": 0}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        numel = int(np.prod(info["shape"]))
        if info["dtype"] == "I8":  # W4A16_AWQ: two int4 values per byte
            out["int4"] += numel
        else:
            out["float"] += numel * (4 if name.endswith("router.weight") else 2)
    head = cfg.get("head_size") or cfg["hidden_size"] // cfg["num_attention_heads"]
    out["rope"] = 2 * cfg["max_position_embeddings"] * (head // 2) * 2
    out["total"] = sum(out.values())
    return out


def build(ckpt: Path, root: Path, spec: RtxBuildSpec = SPEC) -> tuple[Path, dict]:
    graph = root / "onnx"
    if not (graph / "model.onnx").is_file():
        lower_checkpoint(ckpt, graph, "float16")
    return root / "engine", build_engine(graph, root / "engine", spec)


@pytest.fixture(scope="module")
def engines(tiny_ckpt, tmp_path_factory):
    """(family, variant) -> (checkpoint, engine dir, metrics); float16 or int4 (W4A16_AWQ)."""
    root = tmp_path_factory.mktemp("rtx")
    made: dict[tuple[str, str], tuple[Path, Path, dict]] = {}

    def get(family: str, variant: str) -> tuple[Path, Path, dict]:
        if (family, variant) not in made:
            ckpt = tiny_ckpt[family] if variant == "float16" else rtn_w4a16_awq(
                tiny_ckpt[family], root / f"ckpt-{family}-int4")
            made[family, variant] = (ckpt, *build(ckpt, root / f"{family}-{variant}"))
        return made[family, variant]

    return get


@pytest.mark.parametrize("variant", ["float16", "int4"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_builds_an_sm86_engine(family, variant, engines):
    ckpt, out, m = engines(family, variant)
    assert (out / ENGINE_FILE).stat().st_size == m["engine_bytes"] > 0
    expected = graph_weight_bytes(ckpt)
    assert abs(m["trt"]["weights_bytes"] / expected["total"] - 1) < 0.10, (m["trt"], expected)
    # the graph the engine was built from travels with it: the graph hard-linked, its external
    # data copied (onnx refuses data files with several links) and loadable by onnx itself
    assert os.path.samefile(out / "onnx" / "model.onnx", out.parent / "onnx" / "model.onnx")
    data = out / "onnx" / "model.onnx.data"
    assert data.stat().st_nlink == 1
    assert data.read_bytes() == (out.parent / "onnx" / "model.onnx.data").read_bytes()
    onnx.checker.check_model(str(out / "onnx" / "model.onnx"), full_check=True)
    rt = m["runtime"]
    assert rt == {**rt, "kind": "tensorrt_rtx", "engine": ENGINE_FILE, "sm": 86,
                  "version": trt.__version__, "max_batch_size": 2, "max_seq_len": 64,
                  "cpu_fallback": {"kind": "onnxruntime", "model_dir": "onnx", "accuracy_level": 4}}
    assert m["layers"] and m["trt"]["activation_bytes"] > 0
    est = estimate(Checkpoint(ckpt).desc, None, "float16", 2, 64, 64, TARGETS["rtx3060-12gb"])
    assert abs(compare(est, m["trt"])["weights"]["rel_diff"]) < 0.10


@pytest.mark.parametrize("family", ["hunyuan", "qwen2_moe"])
def test_layer_listing_shows_int4_weights_stayed_int4(family, engines):
    """Every quantized linear's DequantizeLinear node ends in a kernel reading an Int4 constant
    (the fused `ReplCastMulCastFc` FC for dense linears); the float16 engine has none."""
    ckpt, out, m = engines(family, "int4")
    layers = parse_layers((out / LOG_FILE).read_text())
    int4_nodes = {n for x in layers if any(dt == "Int4" for *_, dt in x["constants"])
                  for n in x["onnx_nodes"]}
    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    dq = {n.name for n in graph.graph.node if n.op_type == "DequantizeLinear"}
    assert dq and dq <= int4_nodes
    assert m["int4_weight_bytes"] == graph_weight_bytes(ckpt)["int4"]
    assert m["int4_kernel_families"].get("ReplCastMulCastFc", 0) > 0
    _, _, fp16 = engines(family, "float16")
    assert fp16["int4_weight_bytes"] == 0 and fp16["constant_bytes_listed"].get("Half", 0) > 0


def _wide_llama(root: Path) -> Path:
    """A llama whose linear weights (22.5 M parameters) dwarf what an engine holds besides."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=128, max_position_embeddings=256, tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "hf")
    from trt_pipeline.families.apply import convert_checkpoint

    convert_checkpoint(root / "hf", root / "ckpt", "float32")
    return root / "ckpt"


def test_int4_engine_is_smaller_by_what_the_checkpoint_says(tmp_path):
    """Engine bytes fp16 - int4 vs the graphs' weight bytes fp16 - int4: if INT4 silently became
    fp16 the engines would be the same size."""
    ckpt = _wide_llama(tmp_path)
    int4 = rtn_w4a16_awq(ckpt, tmp_path / "ckpt-int4")
    _, f = build(ckpt, tmp_path / "f16")
    _, q = build(int4, tmp_path / "int4")
    want = graph_weight_bytes(ckpt)["total"] - graph_weight_bytes(int4)["total"]
    got = f["engine_bytes"] - q["engine_bytes"]
    assert want > 30e6 and abs(got / want - 1) < 0.10, (got, want)
    assert q["int4_weight_bytes"] == graph_weight_bytes(int4)["int4"]


def test_build_rss_is_sampled_during_the_build(engines, tmp_path):
    """In a fresh process the sampled build peak matches the OS's own high-water mark (VmHWM,
    which exec resets; ru_maxrss would carry over pytest's RSS from the fork)."""
    _, out, _ = engines("hunyuan", "int4")
    code = (f"from pathlib import Path\n"
            f"from trt_pipeline.backends.rtx.build import RtxBuildSpec, build_engine\n"
            f"m = build_engine(Path({str(out.parent / 'onnx')!r}), Path({str(tmp_path)!r}), "
            f"RtxBuildSpec('rtx3060-12gb', 86, 2, 64, 64))\n"
            f"hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]\n"
            f"print(m['rss_before_mb'], m['build_peak_rss_mb'], int(hwm.split()[1]) / 1024)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, peak, hwm = map(float, res.stdout.split())
    assert before < peak <= hwm + 1 and peak > 0.9 * hwm and hwm < 1024  # MB, tiny model


def test_stage_builds_engine_dir(engines, tmp_path):
    from trt_pipeline.stages.base import Artifact, StageContext
    from trt_pipeline.stages.build_rtx import STAGE, BuildRtxParams

    _, out, _ = engines("qwen2", "float16")
    src = out.parent / "onnx"
    (src / "tokenizer.json").write_text("{}")
    ctx = StageContext(tmp_path / "out", BuildRtxParams("rtx3060-12gb", 86, 2, 64, 64),
                       {"onnx": Artifact("lower", "k", src)}, logging.getLogger("test"))
    ctx.out.mkdir()
    m = STAGE.run(ctx)
    assert m["runtime"]["kind"] == "tensorrt_rtx"
    assert {p.name for p in ctx.out.iterdir()} == {ENGINE_FILE, LOG_FILE, "onnx",
                                                   "tokenizer.json"}


def test_decode_profile_is_a_second_profile(engines, tmp_path):
    _, out, one = engines("llama", "float16")
    spec = RtxBuildSpec("rtx3060-12gb", 86, 2, 64, 64, decode_profile=True)
    two = build_engine(out.parent / "onnx", tmp_path, spec)
    assert [p["max"][1] for p in two["profiles"]] == [64, 1]
    assert two["runtime"]["decode_profile"] == 1
    assert two["myelin_graphs"] == 2 and one["myelin_graphs"] == 1
    assert two["engine_bytes"] > one["engine_bytes"]  # measured: 5.8 -> 7.5 MB


# ---- bad input: each refused before any work -------------------------------------------------

def test_target_without_a_tensorrt_for_rtx_sm_is_refused(engines, tmp_path):
    _, out, _ = engines("llama", "float16")
    spec = RtxBuildSpec("h100-80gb", 90, 1, 16, 8)  # and bad limits, reported together
    with pytest.raises(BadInput) as e:
        build_engine(out.parent / "onnx", tmp_path / "never", spec)
    msg = str(e.value)
    assert "sm90" in msg and "no SM90" in msg and "build.max_input_len" in msg
    assert not (tmp_path / "never").exists()


def test_precision_check_refuses_fp8_on_sm86():
    (p,) = precision_problems(86, {"fp16", "fp8"})
    assert "fp8" in p.message and "sm89" in (p.fix or "")
    assert precision_problems(89, {"fp16", "fp8"}) == []
    assert precision_problems(86, {"fp16", "int4", "fp32"}) == []
    assert "fp4" in precision_problems(89, {"fp4"})[0].message


def test_float32_graph_and_too_long_seq_are_refused(tiny_ckpt, tmp_path):
    lower_checkpoint(tiny_ckpt["llama"], tmp_path / "f32", "float32")
    spec = RtxBuildSpec("rtx3060-12gb", 86, 1, 64, 8192)  # tiny models have 4096 positions
    with pytest.raises(BadInput) as e:
        build_engine(tmp_path / "f32", tmp_path / "never", spec)
    assert {p.path for p in e.value.problems} == {"build.dtype", "build.max_seq_len"}
    assert not (tmp_path / "never").exists()


def test_parser_errors_are_quoted_whole_with_the_node(tmp_path):
    """An Attention with present outputs (facts/onnx.md: the parser takes one output only)."""
    kv = [1, 2, 3, 8]
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT16, [1, 2, 4, 8])
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT16, kv)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [1, 2, d, 8])
            for n, d in (("o", 4), ("k", 7), ("v", 7))]
    node = helper.make_node("Attention", ["q", "q", "q", "", "past_key_values.0.key",
                                          "past_key_values.0.key"], ["o", "k", "v"],
                            name="transformer.layers.0.attention/Attention")
    model = helper.make_model(helper.make_graph([node], "g", [q, past], outs),
                              opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    onnx.save(model, str(tmp_path / "model.onnx"))
    (tmp_path / "model.onnx.data").write_bytes(b"")
    with pytest.raises(StageFailed) as e:
        build_engine(tmp_path, tmp_path / "out", RtxBuildSpec("rtx3060-12gb", 86, 1, 4, 8))
    msg = str(e.value)
    assert ("In node 0 with name: transformer.layers.0.attention/Attention and operator: "
            "Attention (importAttention): INVALID_NODE: Assertion failed: node.output().size() "
            "== 1: TensorRT only supports Attention nodes with one output.") in msg
    assert str(tmp_path / "out" / LOG_FILE) in msg


# ---- running: GPU or the ONNX Runtime fallback -----------------------------------------------

def test_decide_gpu_or_fallback_or_rebuild():
    rt = {"sm": 86, "version": "1.7.1.116"}
    v = "1.7.1.116"
    assert "not installed" in decide(rt, None, None, ())
    assert "no CUDA GPU" in decide(rt, None, v, SMS)
    assert "Hopper" in decide(rt, Gpu("NVIDIA H200", 90), v, SMS)
    assert decide(rt, Gpu("NVIDIA GeForce RTX 3060", 86), v, SMS) is None
    with pytest.raises(BadInput, match="Rebuild the engine for this GPU"):
        decide(rt, Gpu("NVIDIA GeForce RTX 4090", 89), v, SMS)
    with pytest.raises(BadInput, match="1.6.1.120"):
        decide({**rt, "version": "1.6.1.120"}, Gpu("NVIDIA GeForce RTX 3060", 86), v, SMS)


def test_without_a_gpu_the_same_graph_runs_on_onnx_runtime(engines, caplog):
    gpu = find_gpu()
    if gpu is not None and gpu.sm in SMS:
        pytest.skip(f"{gpu.name} (sm{gpu.sm}) runs the engine itself; see the gpu test")
    ckpt, out, m = engines("hunyuan", "int4")
    runtime = m["runtime"]  # the fallback's int8-activation level (4) is not what we compare:
    exact = {**runtime, "cpu_fallback": {**runtime["cpu_fallback"], "accuracy_level": 1}}
    with caplog.at_level(logging.WARNING):
        model = open_runtime(out, exact)
    assert isinstance(model, OnnxModel)
    assert "not running the TensorRT for RTX engine" in caplog.text
    ids = np.arange(1, 12)[None]
    got = model.step(ids, model.new_cache(1), np.ones_like(ids, dtype=bool))
    ref = ReferenceModel.load(ckpt).forward(torch.from_numpy(ids)).numpy()
    assert np.abs(got - ref).max() <= FP16_MAX_ABS


@pytest.mark.gpu
@pytest.mark.parametrize("family, variant", [("llama", "float16"), ("hunyuan", "int4"),
                                             ("qwen2_moe", "int4")])
def test_engine_on_an_rtx_gpu_matches_the_reference(family, variant, tiny_ckpt, tmp_path):
    gpu = find_gpu()
    if gpu is None or gpu.sm not in SMS or gpu.sm < 86:
        pytest.skip(f"needs an SM86+ RTX GPU (TensorRT for RTX targets {SMS}); found "
                    f"{'none' if gpu is None else f'{gpu.name}, sm{gpu.sm}'}")
    from trt_pipeline.backends.rtx.engine import RtxModel

    ckpt = tiny_ckpt[family] if variant == "float16" else rtn_w4a16_awq(
        tiny_ckpt[family], tmp_path / "ckpt")
    out, m = build(ckpt, tmp_path, RtxBuildSpec("gpu", gpu.sm, 2, 64, 64))
    model = open_runtime(out, m["runtime"])
    assert isinstance(model, RtxModel)
    ref = ReferenceModel.load(ckpt)
    prompt = torch.randint(0, 512, (1, 17), generator=torch.Generator().manual_seed(1))
    want = reference_greedy(ref, prompt, 24).numpy()[0]
    ids = torch.cat([prompt, torch.from_numpy(want)[None]], 1)
    full = model.step(ids.numpy(), model.new_cache(1), np.ones(ids.shape, dtype=bool))
    assert np.abs(full - ref.forward(ids).numpy()).max() <= FP16_MAX_ABS
    cache = model.new_cache(1)
    logits = model.step(prompt.numpy(), cache, np.ones(prompt.shape, dtype=bool))
    got = []
    for _ in range(24):  # prefill, then one token per step through the swapped KV buffers
        got.append(int(logits[0, -1].argmax()))
        logits = model.step(np.array([[got[-1]]]), cache, np.ones((1, 1), dtype=bool))
    np.testing.assert_array_equal(got, want)


# ---- real shape --------------------------------------------------------------------------------

@pytest.mark.slow
def test_hunyuan_05b_int4_engine_for_sm86(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from common import make_random_model

    from trt_pipeline.families.apply import convert_checkpoint

    hf = make_random_model("hunyuan-0.5b", tmp_path / "hf")
    convert_checkpoint(hf, tmp_path / "fp16", "float16")
    int4 = rtn_w4a16_awq(tmp_path / "fp16", tmp_path / "int4")
    spec = RtxBuildSpec("rtx3060-12gb", 86, 1, 512, 4096)
    out, m = build(int4, tmp_path, spec)
    expected = graph_weight_bytes(int4)
    assert m["int4_weight_bytes"] == expected["int4"]
    assert abs(m["trt"]["weights_bytes"] / expected["total"] - 1) < 0.02
    assert m["engine_bytes"] / expected["total"] < 1.10, (m["engine_bytes"], expected)
    assert m["build_s"] < 120

