"""Lower a checkpoint to one standard ONNX opset-23 graph that ONNX Runtime and TensorRT for RTX
both take (facts/onnx.md).

Why the graph looks the way it does:
- TensorRT for RTX parses `Attention` only with one output, so the KV cache lives outside it:
  `present = Concat(past, new, axis=2)` is a graph output and the mask is a bool input.
- INT4 weights are `DequantizeLinear(int4 [in, out], scale [in/g, out], axis=0, block_size=g)` +
  `MatMul` (graph.py): TensorRT keeps them INT4, ONNX Runtime fuses the pair into MatMulNBits.
- Linears reading one input share one MatMul (`qkv` in the checkpoint; `fc+gate` here): one
  weight-streaming kernel instead of two per token.
- `logits_to_keep` (int64 [1], HF's name and meaning: the last N positions, 0 = all) is a graph
  input with a default of 0: ONNX Runtime lets a caller override it, so generation computes the
  vocabulary projection for the last position only; TensorRT for RTX takes an input backed by an
  initializer as that constant, so its engines keep `logits` [batch, seq, vocab].
Every node and initializer is named by its checkpoint path (`transformer.layers.3.attention.qkv/
MatMul`), so an engine-builder log line points back at a checkpoint tensor.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from ...checkpoint.desc import Linear, ModelDesc
from ...checkpoint.io import Checkpoint
from ...errors import BadInput, Problem
from ...fsio import FILE_MODE, write_bytes_atomic
from .graph import (
    DATA_FILE,
    ELEM,
    IR_VERSION,
    MODEL_FILE,
    OPSET,
    Graph,
    Weights,
    linear,
    moe,
    project,
    silu,
    stacked,
)

__all__ = ["DATA_FILE", "LOGITS_TO_KEEP", "MODEL_FILE", "lower_checkpoint", "lowering_problems"]
LOGITS_TO_KEEP = "logits_to_keep"


def lower_checkpoint(ckpt_dir: Path, out_dir: Path, dtype: str = "float32") -> dict[str, Any]:
    """Write out_dir/model.onnx + model.onnx.data for the checkpoint; return graph metrics."""
    start = time.perf_counter()
    ckpt = Checkpoint(Path(ckpt_dir))
    problems = lowering_problems(ckpt.desc, dtype)
    if problems:
        raise BadInput(problems, str(ckpt_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{DATA_FILE}.", suffix=".tmp", dir=out_dir)
    os.chmod(tmp, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as data:
            g = Graph(data, dtype)
            model = build_model(g, ckpt)
            data.flush()
            os.fsync(data.fileno())
        os.replace(tmp, out_dir / DATA_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    path = out_dir / MODEL_FILE
    write_bytes_atomic(path, model.SerializeToString())
    onnx.checker.check_model(str(path), full_check=True)
    return {
        "ops": dict(sorted(Counter(n.op_type for n in g.nodes).items())),
        "nodes": len(g.nodes),
        "graph_bytes": path.stat().st_size,
        "data_bytes": (out_dir / DATA_FILE).stat().st_size,
        "parameters": g.parameters,
        "dtype": dtype,
        "lower_s": round(time.perf_counter() - start, 3),
    }


def lowering_problems(d: ModelDesc, dtype: str) -> list[Problem]:
    """What in this checkpoint the ONNX lowering cannot express, all at once."""
    out = []
    if dtype not in ELEM:
        out.append(Problem("dtype", f"got {dtype!r}", f"Use one of {sorted(ELEM)}."))
    if d.tp_size * d.pp_size != 1:
        out.append(Problem("mapping", f"tp_size={d.tp_size}, pp_size={d.pp_size}: the ONNX "
                           "graph is one unsharded model", "Convert with tp_size=pp_size=1."))
    if d.quant.algo not in (None, "W4A16_AWQ", "W4A16", "W8A16"):
        out.append(Problem("quantization.quant_algo", f"got {d.quant.algo!r}; the ONNX lowering "
                           "takes W4A16_AWQ, W4A16, W8A16 or none"))
    if d.quant.has_zero_point:
        out.append(Problem("quantization.has_zero_point", "DequantizeLinear weights are symmetric "
                           "here (facts/tensorrt-rtx.md §3.2)", "Fold zero points before "
                           "lowering."))
    return out


def build_model(g: Graph, ckpt: Checkpoint) -> onnx.ModelProto:
    d = ckpt.desc
    table = g.weight("transformer.vocab_embedding.weight",
                     ckpt.get("transformer.vocab_embedding.weight"))
    h = g.op("Gather", "transformer.vocab_embedding/Gather", [table, "input_ids"])
    cos, sin = rope_caches(g, d)
    for i in range(d.num_layers):
        h = decoder_layer(g, ckpt, i, h, (cos, sin))
    lm_head(g, ckpt, rms_norm(g, ckpt, h, "transformer.ln_f.weight"), table)
    graph = helper.make_graph(g.nodes, f"{d.family}-{g.dtype}", graph_inputs(g, d),
                              graph_outputs(g, d), g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="trt_pipeline")
    model.ir_version = IR_VERSION
    # what a runtime needs and cannot read from the graph's inputs and outputs
    helper.set_model_props(model, {"max_position_embeddings": str(d.max_position_embeddings),
                                   "family": d.family})
    return model


def _value(name: str, elem: int, dims: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def graph_inputs(g: Graph, d: ModelDesc) -> list[onnx.ValueInfoProto]:
    kv = ["batch", d.num_kv_heads, "past", d.head_size]
    out = [_value("input_ids", TensorProto.INT64, ["batch", "seq"]),
           _value("position_ids", TensorProto.INT64, ["batch", "seq"]),
           _value("attention_mask", TensorProto.BOOL, ["batch", 1, "seq", "total"])]
    for i in range(d.num_layers):
        out += [_value(f"past_key_values.{i}.key", g.elem, kv),
                _value(f"past_key_values.{i}.value", g.elem, kv)]
    return [*out, _value(LOGITS_TO_KEEP, TensorProto.INT64, [1])]  # its default: lm_head()


def graph_outputs(g: Graph, d: ModelDesc) -> list[onnx.ValueInfoProto]:
    kv = ["batch", d.num_kv_heads, "total", d.head_size]
    out = [_value("logits", TensorProto.FLOAT, ["batch", "seq", d.vocab_size])]
    for i in range(d.num_layers):
        out += [_value(f"present.{i}.key", g.elem, kv), _value(f"present.{i}.value", g.elem, kv)]
    return out


def rope_caches(g: Graph, d: ModelDesc) -> tuple[str, str]:
    """cos/sin [max_pos, head/2] from the reference's inverse frequencies (family scaling baked
    in), angles in float64 so the table is exact before the one rounding to the graph dtype."""
    import torch

    from ...reference.model import rope_inv_freq

    pos = torch.arange(d.max_position_embeddings, dtype=torch.float64)
    angles = pos[:, None] * rope_inv_freq(d).to(torch.float64)
    return (g.array("rope.cos_cache", angles.cos().to(g.torch_dtype).numpy()),
            g.array("rope.sin_cache", angles.sin().to(g.torch_dtype).numpy()))


def rms_norm(g: Graph, ckpt: Checkpoint, x: str, weight: str) -> str:
    module = weight.removesuffix(".weight")
    return g.op("RMSNormalization", f"{module}/RMSNormalization",
                [x, g.weight(weight, ckpt.get(weight))], axis=-1,
                epsilon=ckpt.desc.norm_epsilon)


def decoder_layer(g: Graph, ckpt: Checkpoint, i: int, h: str, rope: tuple[str, str]) -> str:
    d = ckpt.desc
    p = f"transformer.layers.{i}"
    x = rms_norm(g, ckpt, h, f"{p}.input_layernorm.weight")
    h = g.op("Add", f"{p}.attention/Add", [h, attention(g, ckpt, i, x, rope)])
    x = rms_norm(g, ckpt, h, f"{p}.post_layernorm.weight")
    layers = {lin.name: lin for lin in d.layer_linears(i)}
    m = moe(g, ckpt, i, x, layers) if d.moe else dense_mlp(g, ckpt, f"{p}.mlp", x, layers)
    return g.op("Add", f"{p}.mlp/Add", [h, m])


def attention(g: Graph, ckpt: Checkpoint, i: int, x: str, rope: tuple[str, str]) -> str:
    """Fused-QKV GQA attention; K/V concatenated with the past outside the Attention op."""
    d = ckpt.desc
    p = f"transformer.layers.{i}.attention"
    qkv = linear(g, ckpt, x, Linear(f"{p}.qkv", d.hidden_size, d.q_size + 2 * d.kv_size))
    # one Reshape + Transpose to [B, heads, S, D] for q, k and v together, then split the heads
    heads = d.num_heads + 2 * d.num_kv_heads
    qkv = g.op("Reshape", f"{p}/qkv/Reshape", [qkv, g.const(f"{p}/qkv/shape",
                                                            [0, 0, heads, d.head_size])])
    qkv = g.op("Transpose", f"{p}/qkv/Transpose", [qkv], perm=[0, 2, 1, 3])
    sizes = g.const(f"{p}/split_sizes", [d.num_heads, d.num_kv_heads, d.num_kv_heads])
    q, k, v = g.op("Split", f"{p}/Split", [qkv, sizes], 3, axis=1)
    if d.qk_norm == "before_rope":
        q, k = _qk_norm(g, ckpt, p, q, k)
    q = g.op("RotaryEmbedding", f"{p}/q/RotaryEmbedding", [q, *rope, "position_ids"])
    k = g.op("RotaryEmbedding", f"{p}/k/RotaryEmbedding", [k, *rope, "position_ids"])
    if d.qk_norm == "after_rope":
        q, k = _qk_norm(g, ckpt, p, q, k)
    k = g.op("Concat", f"{p}/k/Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"],
             axis=2)
    v = g.op("Concat", f"{p}/v/Concat", [f"past_key_values.{i}.value", v],
             [f"present.{i}.value"], axis=2)
    o = g.op("Attention", f"{p}/Attention", [q, k, v, "attention_mask"],
             q_num_heads=d.num_heads, kv_num_heads=d.num_kv_heads)
    o = g.op("Transpose", f"{p}/o/Transpose", [o], perm=[0, 2, 1, 3])
    o = g.op("Reshape", f"{p}/o/Reshape", [o, g.const(f"{p}/o/shape", [0, 0, d.q_size])])
    return linear(g, ckpt, o, Linear(f"{p}.dense", d.q_size, d.hidden_size))


def _qk_norm(g: Graph, ckpt: Checkpoint, p: str, q: str, k: str) -> tuple[str, str]:
    return (rms_norm(g, ckpt, q, f"{p}.q_layernorm.weight"),
            rms_norm(g, ckpt, k, f"{p}.k_layernorm.weight"))


def dense_mlp(g: Graph, ckpt: Checkpoint, p: str, x: str, layers: dict[str, Linear]) -> str:
    """fc is the activated branch, gate the linear one (reference.model.mlp); both read x, so
    one MatMul over their stacked weights computes them (Hunyuan-0.5B shape, INT4, one token:
    one 7168-wide MatMulNBits instead of two 3584-wide ones per layer)."""
    fc, gate = (Weights.load(ckpt, layers[f"{p}.{n}"]) for n in ("fc", "gate"))
    both = stacked([fc, gate])
    if both is None:
        a, b = project(g, ckpt, x, fc), project(g, ckpt, x, gate)
    else:
        a, b = g.op("Split", f"{both.module}/Split", [project(g, ckpt, x, both)], 2, axis=-1,
                    num_outputs=2)
    y = g.op("Mul", f"{p}/Mul", [silu(g, f"{p}.fc", a), b])
    return linear(g, ckpt, y, layers[f"{p}.proj"])


def lm_head(g: Graph, ckpt: Checkpoint, h: str, table: str) -> None:
    """`logits` [batch, kept, vocab] float32 (every graph dtype) of the last `logits_to_keep`
    positions of h (all for the default 0). A checkpoint's own `lm_head` wins over the tied table:
    the quantizer writes an INT4 head for a tied model too (the embedding it keeps in float)."""
    d = ckpt.desc
    g.const(LOGITS_TO_KEEP, [0])
    start = g.op("Neg", "lm_head/keep/Neg", [LOGITS_TO_KEEP])  # -0 = 0: from the first position
    h = g.op("Slice", "lm_head/keep/Slice", [h, start, g.const("lm_head/keep/ends", [2**63 - 1]),
                                            g.const("lm_head/keep/axes", [1])])
    out = "logits" if g.elem == TensorProto.FLOAT else None
    if ckpt.has("lm_head.weight"):
        logits = linear(g, ckpt, h, Linear("lm_head", d.hidden_size, d.vocab_size), out)
    else:
        logits = tied_head(g, d, h, table, out)
    if out is None:
        g.op("Cast", "lm_head/Cast", [logits], ["logits"], to=TensorProto.FLOAT)


def tied_head(g: Graph, d: ModelDesc, h: str, table: str, out: str | None) -> str:
    """Logits from the float embedding table itself: Gemm(transB=1) reads [V, H] as it is stored,
    where MatMul would need a transposed second copy of the largest tensor in the data file.
    ONNX Runtime packs the constant B once at load, not per call: Gemm and MatMul on a transposed
    copy ran alike (V=120818, H=1024: one row and 128 rows). The packed copy is the price (RSS
    1.37 GB for the Hunyuan-0.5B-shape graph, 0.49 GB with an INT4 head: the table itself is
    mmapped and only Gather'd rows are touched), and the whole float table is read per token."""
    flat = g.op("Reshape", "lm_head/Reshape", [h, g.const("lm_head/flat_shape",
                                                          [-1, d.hidden_size])])
    logits = g.op("Gemm", "lm_head/Gemm", [flat, table], transB=1)
    shape = g.op("Concat", "lm_head/Concat", [g.op("Shape", "lm_head/Shape", [h], end=2),
                                              g.const("lm_head/vocab", [d.vocab_size])], axis=0)
    return g.op("Reshape", "lm_head/out/Reshape", [logits, shape], [out] if out else 1)
