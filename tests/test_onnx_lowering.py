"""The ONNX lowering computes what the reference model computes, in standard ops TensorRT for RTX
builds.

The reference model (proved against transformers in test_reference_parity.py) is the oracle: ONNX
Runtime runs the lowered graph of every family's tiny checkpoint, float32 and INT4, and must give
the same logits and the same greedy tokens through its KV cache.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from quant_fixture import rtn_w4a16_awq, rtn_weight_only
from tiny_models import FAMILY_NAMES

from trt_pipeline.backends.onnx.lower import (
    DATA_FILE,
    LOGITS_TO_KEEP,
    MODEL_FILE,
    lower_checkpoint,
    lowering_problems,
)
from trt_pipeline.backends.onnx.ops import TRT_RTX_PARSED_OPS
from trt_pipeline.backends.onnx.runtime import OnnxKVCache, OnnxModel, greedy
from trt_pipeline.checkpoint.io import Checkpoint, expected_tensors
from trt_pipeline.checkpoint.layout import unpack_int4
from trt_pipeline.reference.model import ReferenceModel
from trt_pipeline.reference.model import greedy as reference_greedy

VOCAB = 512  # tiny_models.COMMON
# name -> (checkpoint kind, graph dtype); "int4" is W4A16_AWQ (group 128, prequant scale).
VARIANTS = {"float32": ("float", "float32"), "float16": ("float", "float16"),
            "int4": ("int4", "float32"), "int4_float16": ("int4", "float16"),
            "w8a16": ("W8A16", "float32"), "w4a16": ("W4A16", "float32")}
# Measured on these tiny models (2026-11): fp16 graph vs float32 reference, max |logit diff|
# 0.009-0.018 on the 17-token prompt, <= 0.020 over prompt + 32 greedy tokens (logits span about
# +-5.5); top-1 agreement 100 % for every family.
FP16_MAX_ABS = 0.05
ROUTER_TIE = 0.005  # fp32 router-logit gap below which fp16 may route differently


@pytest.fixture(scope="module")
def quant_ckpts(tiny_ckpt, tmp_path_factory):
    """(kind, family) -> quantized checkpoint dir, made on first use."""
    root = tmp_path_factory.mktemp("onnx_quant")
    made: dict[tuple[str, str], Path] = {}

    def get(kind: str, family: str) -> Path:
        if (kind, family) not in made:
            out = root / f"{kind}-{family}"
            made[kind, family] = (rtn_w4a16_awq(tiny_ckpt[family], out) if kind == "int4"
                                  else rtn_weight_only(tiny_ckpt[family], out, kind))
        return made[kind, family]

    return get


@pytest.fixture(scope="module")
def lowered(tiny_ckpt, quant_ckpts, tmp_path_factory):
    """(family, variant) -> (checkpoint dir, graph dir, metrics); each lowered once."""
    root = tmp_path_factory.mktemp("onnx_graphs")
    made: dict[tuple[str, str], tuple[Path, Path, dict]] = {}

    def get(family: str, variant: str) -> tuple[Path, Path, dict]:
        if (family, variant) not in made:
            kind, dtype = VARIANTS[variant]
            ckpt = tiny_ckpt[family] if kind == "float" else quant_ckpts(kind, family)
            out = root / f"{family}-{variant}"
            made[family, variant] = (ckpt, out, lower_checkpoint(ckpt, out, dtype))
        return made[family, variant]

    return get


def _prompt(n: int = 17, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["float32", "int4"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_and_greedy_match_reference(family, variant, lowered):
    ckpt, graph, _ = lowered(family, variant)
    ref = ReferenceModel.load(ckpt)
    model = OnnxModel.load(graph)
    ids = _prompt()
    diff = np.abs(model.forward(ids) - ref.forward(ids).numpy()).max()
    assert diff <= 1e-4, f"{family} {variant}: max |logit diff| {diff:.3g}"
    np.testing.assert_array_equal(greedy(model, ids, 32), reference_greedy(ref, ids, 32).numpy())


@pytest.mark.parametrize("variant", ["w8a16", "w4a16"])
@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_per_channel_weight_only_matches_reference(family, variant, lowered):
    """Per-channel W8A16/W4A16: dense linears (llama's fc+gate stacked along [in, out]) and MoE
    expert stacks (qwen2_moe)."""
    ckpt, graph, _ = lowered(family, variant)
    ids = _prompt()
    diff = np.abs(OnnxModel.load(graph).forward(ids)
                  - ReferenceModel.load(ckpt).forward(ids).numpy()).max()
    assert diff <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "hunyuan"])
def test_left_padded_batch_matches_unpadded_rows(family, lowered):
    """Each row of a left-padded batch gets its unpadded logits, at prefill and while decoding
    through the shared KV cache."""
    _, graph, _ = lowered(family, "float32")
    model = OnnxModel.load(graph)
    a, b = _prompt(9, seed=2), _prompt(5, seed=3)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False
    cache = OnnxKVCache()
    out = model.forward(batch, cache, valid)
    assert np.abs(out[0] - model.forward(a)[0]).max() < 1e-4
    assert np.abs(out[1, 4:] - model.forward(b)[0]).max() < 1e-4
    steps = [out[:, -1].argmax(-1)[:, None]]
    for _ in range(7):
        steps.append(model.forward(steps[-1], cache)[:, -1].argmax(-1)[:, None])
    tokens = np.concatenate(steps, 1)
    np.testing.assert_array_equal(tokens[0], greedy(model, a, 8)[0])
    np.testing.assert_array_equal(tokens[1], greedy(model, b, 8)[0])


@pytest.mark.parametrize("variant", ["float16", "int4_float16"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_float16_graph_agrees_with_float32_reference(family, variant, lowered, monkeypatch):
    """Logits and top-1 over 8 prompts and the reference's greedy continuations, each fed as one
    sequence (392 positions); the INT4 variant against the reference running the same
    (dequantized) INT4 checkpoint."""
    ckpt, graph, _ = lowered(family, variant)
    ref = ReferenceModel.load(ckpt)
    prompts = [_prompt(seed=seed) for seed in range(1, 9)]
    ids = torch.cat([torch.cat([p, reference_greedy(ref, p, 32)], 1) for p in prompts])
    margins = _router_margins(monkeypatch)
    expected = ref.forward(ids).numpy()
    got = OnnxModel.load(graph).forward(ids)
    diff = np.abs(got - expected).max(-1)
    # An MoE position whose k-th and (k+1)-th router logits (fp32) are closer than fp16's
    # rounding of the hidden state can route to another expert: a discrete jump, not an error.
    # On these models that is at most 1.8 % of positions (gaps at the jumps 0.0014-0.0033, median
    # gap ~0.3).
    tie = (torch.stack(margins).amin(0).reshape(ids.shape).numpy() < ROUTER_TIE) if margins \
        else np.zeros(ids.shape, dtype=bool)
    assert tie.mean() < 0.03, tie.mean()
    assert diff[~tie].max() <= FP16_MAX_ABS, diff[~tie].max()
    same = got.argmax(-1) == expected.argmax(-1)
    # where the reference's top two are closer than twice fp16's error there, rounding may
    # order them either way; everywhere else the choice must be the same
    top2 = np.sort(expected, -1)[..., -2:]
    decisive = top2[..., 1] - top2[..., 0] > 2 * diff
    assert same[decisive].all(), f"{family} {variant}: decisive positions differ"
    assert same.mean() >= 0.99, same.mean()


def _router_margins(monkeypatch) -> list[torch.Tensor]:
    """Records, for every MoE layer the reference runs, the gap between the k-th and (k+1)-th
    router logit of each token."""
    from trt_pipeline.reference import model as reference

    seen: list[torch.Tensor] = []
    route = reference.route

    def spy(logits: torch.Tensor, top_k: int, normalization: str):
        ranked = logits.sort(-1, descending=True).values
        seen.append(ranked[:, top_k - 1] - ranked[:, top_k])
        return route(logits, top_k, normalization)

    monkeypatch.setattr(reference, "route", spy)
    return seen


def _graph(graph_dir: Path) -> onnx.ModelProto:
    return onnx.load(str(graph_dir / MODEL_FILE), load_external_data=False)


GRAPHS = [(f, v) for f in FAMILY_NAMES for v in ("float32", "float16", "int4", "int4_float16")
          ] + [("qwen2_moe", "w8a16"), ("qwen2_moe", "w4a16")]


@pytest.mark.parametrize("family, variant", GRAPHS)
def test_graph_is_standard_opset23_and_named_by_checkpoint(family, variant, lowered):
    ckpt, graph, metrics = lowered(family, variant)
    onnx.checker.check_model(str(graph / MODEL_FILE), full_check=True)
    model = _graph(graph)
    ops = {n.op_type for n in model.graph.node}
    assert {n.domain for n in model.graph.node} <= {""}, "only the default ONNX domain"
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [23]
    unchecked = ops - TRT_RTX_PARSED_OPS
    assert not unchecked, f"op types not checked with TensorRT for RTX: {sorted(unchecked)}"
    assert metrics["ops"] == {op: sum(n.op_type == op for n in model.graph.node) for op in ops}
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert all(n.startswith(("transformer.", "lm_head/")) for n in names)
    ck = Checkpoint(ckpt)
    locations = {e.value for t in model.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == {DATA_FILE}
    for t in model.graph.initializer:  # checkpoint tensors (`[e]`: expert e) or a graph constant
        assert ("/" in t.name or t.name.startswith("rope.") or t.name == LOGITS_TO_KEEP
                or all(ck.has(n) for n in _checkpoint_names(t.name))), t.name
    if VARIANTS[variant][0] == "float":  # every checkpoint tensor lowered exactly once
        specs = expected_tensors(ck.desc)
        assert metrics["parameters"] == sum(int(np.prod(s.shape)) for s in specs.values())


def _checkpoint_names(initializer: str) -> list[str]:
    """The checkpoint tensors an initializer holds: `a.fc+gate.weight` stacks a.fc.weight and
    a.gate.weight; `name[e]` is expert e of `name`."""
    *scope, modules, leaf = initializer.split("[")[0].split(".")
    return [".".join([*scope, m, leaf]) for m in modules.split("+")]


def test_graph_io_contract(lowered):
    _, graph, _ = lowered("qwen2_moe", "float16")
    g = _graph(graph).graph

    def dims(v: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    def elem(v: onnx.ValueInfoProto) -> int:
        return v.type.tensor_type.elem_type

    ins = {v.name: v for v in g.input}
    outs = {v.name: v for v in g.output}
    f16, t = onnx.TensorProto.FLOAT16, onnx.TensorProto
    assert list(ins)[:3] == ["input_ids", "position_ids", "attention_mask"]
    assert (elem(ins["input_ids"]), dims(ins["input_ids"])) == (t.INT64, ["batch", "seq"])
    assert (elem(ins["position_ids"]), dims(ins["position_ids"])) == (t.INT64, ["batch", "seq"])
    assert (elem(ins["attention_mask"]), dims(ins["attention_mask"])) == (
        t.BOOL, ["batch", 1, "seq", "total"])
    assert (elem(outs["logits"]), dims(outs["logits"])) == (t.FLOAT, ["batch", "seq", VOCAB])
    for i in range(2):
        for kind in ("key", "value"):
            past, present = ins[f"past_key_values.{i}.{kind}"], outs[f"present.{i}.{kind}"]
            assert (elem(past), dims(past)) == (f16, ["batch", 2, "past", 64])
            assert (elem(present), dims(present)) == (f16, ["batch", 2, "total", 64])
    assert (elem(ins[LOGITS_TO_KEEP]), dims(ins[LOGITS_TO_KEEP])) == (t.INT64, [1])
    default = {i.name: i for i in g.initializer}[LOGITS_TO_KEEP]  # all positions unless fed
    assert onnx.numpy_helper.to_array(default).tolist() == [0]
    assert len(ins) == len(outs) + 3 == 3 + 4 + 1
    model = OnnxModel.load(graph)  # the runner's StepModel reads the rest from the graph
    assert (model.vocab_size, model.max_seq_len, model.num_layers) == (VOCAB, 4096, 2)


def test_int4_initializer_is_the_checkpoint_nibbles(lowered):
    """int8 [out/2, in] packed along out, transposed, read by onnx as INT4 [in, out], equals
    layout.unpack_int4 of the checkpoint: the packing claim checked numerically."""
    ckpt, graph, _ = lowered("mixtral", "int4")
    model = onnx.load(str(graph / MODEL_FILE))
    inits = {t.name: t for t in model.graph.initializer}
    ck = Checkpoint(ckpt)
    for name, stacked in [("transformer.layers.1.attention.qkv.weight", None),
                          ("transformer.layers.0.mlp.fc.weight", 3)]:
        raw = ck.get(name) if stacked is None else ck.get(name)[stacked]
        key = name if stacked is None else f"{name}[{stacked}]"
        got = onnx.numpy_helper.to_array(inits[key])
        assert got.dtype.name == "int4"
        np.testing.assert_array_equal(got.astype(np.int8), unpack_int4(raw, -2).T.numpy())


def _build_sm86(graph_dir: Path) -> list[str]:
    """Parse with TensorRT for RTX's ONNX parser and build an SM86 engine (no GPU needed);
    returns the network's input names."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 (extra [rtx]) missing")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    net = builder.create_network(0)
    parser = trt.OnnxParser(net, logger)
    ok = parser.parse_from_file(str(graph_dir / MODEL_FILE))
    assert ok, [str(parser.get_error(i)) for i in range(parser.num_errors)]
    cfg = builder.create_builder_config()
    cfg.num_compute_capabilities = 1
    cfg.set_compute_capability(trt.ComputeCapability.SM86, 0)
    profile = builder.create_optimization_profile()
    for i in range(net.num_inputs):
        t = net.get_input(i)

        def shape(b: int, s: int, past: int, t=t) -> tuple[int, ...]:
            if t.name in ("input_ids", "position_ids"):
                return (b, s)
            if t.name == "attention_mask":
                return (b, 1, s, past + s)
            return (b, t.shape[1], past, t.shape[3])

        profile.set_shape(t.name, shape(1, 1, 0), shape(1, 8, 8), shape(2, 16, 32))
    cfg.add_optimization_profile(profile)
    assert builder.build_serialized_network(net, cfg) is not None
    return [net.get_input(i).name for i in range(net.num_inputs)]


@pytest.mark.parametrize("family, variant", [("llama", "float16"), ("qwen2_moe", "float16"),
                                             ("hunyuan", "int4_float16")])
def test_tensorrt_rtx_builds_sm86_engine(family, variant, lowered):
    """The engine's inputs are the I/O contract's: TensorRT takes `logits_to_keep`, backed by an
    initializer, as its constant default (every position's logits)."""
    inputs = _build_sm86(lowered(family, variant)[1])
    assert LOGITS_TO_KEEP not in inputs and inputs[:3] == [
        "input_ids", "position_ids", "attention_mask"]


def test_unsupported_inputs_are_reported_together(tiny_ckpt):
    desc = Checkpoint(tiny_ckpt["llama"]).desc
    bad = replace(desc, tp_size=2, quant=replace(desc.quant, algo="W4A16_AWQ",
                                                 has_zero_point=True))
    assert [p.path for p in lowering_problems(bad, "bfloat16")] == [
        "dtype", "mapping", "quantization.has_zero_point"]
    assert lowering_problems(desc, "float16") == []


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_onnx_runtime_fuses_int4_dequantize_matmul(family, lowered, tmp_path):
    """Every INT4 DequantizeLinear + MatMul pair becomes one MatMulNBits kernel (no float copy
    of the weights at run time), dense linears and per-expert linears alike."""
    import onnxruntime as ort

    _, graph, metrics = lowered(family, "int4")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(graph / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath,
                                        load_external_data=False).graph.node]
    assert "DequantizeLinear" not in ops
    assert ops.count("MatMulNBits") == metrics["ops"]["DequantizeLinear"]


@pytest.mark.parametrize("family, variant", [("llama", "float32"), ("hunyuan", "int4"),
                                             ("qwen2_moe", "int4")])
def test_last_only_logits_are_the_last_row_of_all_logits(family, variant, lowered):
    """`logits_to_keep` = 1 (generation) gives the last position's logits of the full graph, at
    prefill and through the KV cache, with the head computed for that position alone."""
    _, graph, _ = lowered(family, variant)
    model = OnnxModel.load(graph)
    ids = _prompt()
    full_cache, last_cache = OnnxKVCache(), OnnxKVCache()
    full, last = model.forward(ids, full_cache), model.forward(ids, last_cache, last_only=True)
    assert full.shape == (1, 17, VOCAB) and last.shape == (1, 1, VOCAB)
    assert np.abs(last - full[:, -1:]).max() <= 1e-5
    nxt = last[:, -1].argmax(-1)[:, None]
    assert np.abs(model.forward(nxt, last_cache, last_only=True)
                  - model.forward(nxt, full_cache)).max() <= 1e-5


def _as_awq_writes_a_tied_model(int4_ckpt: Path, out: Path) -> Path:
    """What the AWQ quantizer writes for a tied model whose lm_head is not excluded: scales it
    folded into a norm or linear leave prequant_scaling_factor at ones, and the head is an INT4
    tensor of its own (RTN of the embedding, which itself stays float)."""
    from safetensors.torch import load_file, save_file

    from trt_pipeline.checkpoint.desc import ModelDesc
    from trt_pipeline.checkpoint.io import read_config, write_config
    from trt_pipeline.quant.pack import linear_tensors

    out.mkdir()
    t = load_file(str(int4_ckpt / "rank0.safetensors"))
    t.update({k: torch.ones_like(v) for k, v in t.items() if k.endswith("prequant_scaling_factor")})
    cfg = read_config(int4_ckpt)
    cfg["quantization"]["exclude_modules"] = [
        m for m in cfg["quantization"]["exclude_modules"] if m != "lm_head"]
    table = t["transformer.vocab_embedding.weight"]
    t.update(linear_tensors("lm_head", table.float(), ModelDesc.from_config(cfg).quant,
                            table.dtype))
    save_file(t, str(out / "rank0.safetensors"))
    write_config(out, cfg)
    return out


def test_tied_model_with_its_own_int4_head(lowered, tmp_path):
    """The head a tied model's quantizer wrote is lowered as INT4 DQ + MatMul (MatMulNBits in
    ONNX Runtime) instead of the float table; linears and fc+gate without an AWQ input scale get
    no Mul; logits still equal the reference's (which dequantizes the same head)."""
    import onnxruntime as ort

    ckpt = _as_awq_writes_a_tied_model(lowered("hunyuan", "int4")[0], tmp_path / "ckpt")
    metrics = lower_checkpoint(ckpt, tmp_path / "onnx", "float32")
    names = [n.name for n in _graph(tmp_path / "onnx").graph.node]
    assert "lm_head/DequantizeLinear" in names and "Gemm" not in metrics["ops"]
    assert not [n for n in names if n.endswith("prequant/Mul")]
    assert "transformer.layers.1.mlp.fc+gate/MatMul" in names
    assert metrics["ops"]["DequantizeLinear"] == 2 * 4 + 1  # qkv, dense, fc+gate, proj; head
    model = OnnxModel.load(tmp_path / "onnx")
    ref = ReferenceModel.load(ckpt)
    ids = _prompt()
    assert np.abs(model.forward(ids) - ref.forward(ids).numpy()).max() <= 1e-4
    np.testing.assert_array_equal(greedy(model, ids, 16), reference_greedy(ref, ids, 16).numpy())
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "onnx" / MODEL_FILE), opts,
                         providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath,
                                        load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == metrics["ops"]["DequantizeLinear"]
    lower_checkpoint(ckpt, tmp_path / "onnx16", "float16")  # the INT4 head builds for the GPU
    _build_sm86(tmp_path / "onnx16")
