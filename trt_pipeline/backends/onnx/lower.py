"""Lower a checkpoint to one standard ONNX opset-23 graph that ONNX Runtime and TensorRT for RTX
both take (facts/onnx.md).

Why the graph looks the way it does:
- TensorRT for RTX parses `Attention` only with one output, so the KV cache lives outside it:
  `present = Concat(past, new, axis=2)` is a graph output and the mask is a bool input.
- INT4 weights are `DequantizeLinear(int4 [in, out], scale [in/g, out], axis=0, block_size=g)` +
  `MatMul`: TensorRT keeps them INT4, ONNX Runtime fuses the pair into MatMulNBits.
- Initializers stream one tensor at a time from the checkpoint into one external data file, so
  lowering holds a few copies of the largest tensor, not the model (Hunyuan-0.5B shape to float32:
  peak anonymous memory 1.1 GB for 2.2 GB of weights, the 0.5 GB embedding being the largest).
Every node and initializer is named by its checkpoint path (`transformer.layers.3.attention.qkv/
MatMul`), so an engine-builder log line points back at a checkpoint tensor.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from ...checkpoint.desc import Linear, ModelDesc
from ...checkpoint.io import Checkpoint
from ...errors import BadInput, Problem
from ...fsio import FILE_MODE, write_bytes_atomic

if TYPE_CHECKING:
    import torch

OPSET = 23
IR_VERSION = 11  # opset 23 needs IR 11; both runtimes accept it (facts/onnx.md)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
INLINE_BYTES = 1024  # shape constants and norms stay inside model.onnx
ALIGN = 4096  # page-aligned offsets let a runtime mmap the data file
QUANT_LEAVES = ("weights_scaling_factor", "prequant_scaling_factor", "per_channel_scale")
ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


class Graph:
    """Nodes and initializers of one graph; initializer bytes go straight to the data file."""

    def __init__(self, data: BinaryIO, dtype: str) -> None:
        import torch

        self.dtype = dtype
        self.elem = ELEM[dtype]
        self.torch_dtype = getattr(torch, dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.parameters = 0
        self._data = data
        self._names: set[str] = set()

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate ONNX name {name}")
        self._names.add(name)
        return name

    def _add(self, tensor: TensorProto, payload: np.ndarray, elements: int, parameter: bool
             ) -> str:
        """Keep `tensor` (holding `payload` as raw_data) inline if small, else append the payload
        to the data file and keep a copy of the tensor without its bytes: protobuf frees a
        cleared field's memory only with its message, so the message with the bytes must go."""
        self._claim(tensor.name)
        if payload.nbytes >= INLINE_BYTES:
            offset = self._data.tell()
            pad = -offset % ALIGN
            self._data.write(b"\0" * pad)
            self._data.write(memoryview(payload.reshape(-1)).cast("B"))
            set_external_data(tensor, DATA_FILE, offset + pad, payload.nbytes)
            tensor.ClearField("raw_data")
            external = TensorProto()
            external.CopyFrom(tensor)
            tensor = external
        self.inits.append(tensor)
        if parameter:
            self.parameters += elements
        return tensor.name

    def array(self, name: str, value: np.ndarray, parameter: bool = False) -> str:
        value = np.ascontiguousarray(value)
        return self._add(numpy_helper.from_array(value, name), value, value.size, parameter)

    def weight(self, name: str, t: torch.Tensor) -> str:
        """A checkpoint float tensor, cast to the graph's activation dtype."""
        return self.array(name, t.to(self.torch_dtype).contiguous().numpy(), parameter=True)

    def int4(self, name: str, packed: torch.Tensor, dims: list[int]) -> str:
        """int8 bytes holding int4 pairs along the last axis, low nibble first: ONNX's INT4."""
        raw = packed.contiguous().numpy()
        tensor = helper.make_tensor(name, TensorProto.INT4, dims, raw.tobytes(), raw=True)
        return self._add(tensor, raw, int(np.prod(dims)), parameter=True)

    def const(self, name: str, values: list[int]) -> str:
        return self.array(name, np.array(values, dtype=np.int64))

    def op(self, op_type: str, name: str, inputs: list[str], outputs: list[str] | int = 1,
           **attrs: Any) -> Any:
        """Add a node named `name`; returns its output name (a list when several)."""
        self._claim(name)
        outs = outputs if isinstance(outputs, list) else (
            [f"{name}/out"] if outputs == 1 else [f"{name}/out{k}" for k in range(outputs)])
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if len(outs) == 1 else outs


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
    h = rms_norm(g, ckpt, h, "transformer.ln_f.weight")
    logits = (tied_head(g, d, h, table) if d.tie_word_embeddings
              else linear(g, ckpt, h, Linear("lm_head", d.hidden_size, d.vocab_size)))
    # float32 logits for every dtype; in a float32 graph ONNX Runtime drops the no-op Cast
    g.op("Cast", "lm_head/Cast", [logits], ["logits"], to=TensorProto.FLOAT)
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
    return out


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
    sizes = g.const(f"{p}/split_sizes", [d.q_size, d.kv_size, d.kv_size])
    q, k, v = g.op("Split", f"{p}/Split", [qkv, sizes], 3, axis=-1)
    heads = {"q": (q, d.num_heads), "k": (k, d.num_kv_heads), "v": (v, d.num_kv_heads)}
    bhsd = {}
    for part, (t, n) in heads.items():
        t = g.op("Reshape", f"{p}/{part}/Reshape", [t, g.const(f"{p}/{part}/shape",
                                                               [0, 0, n, d.head_size])])
        bhsd[part] = g.op("Transpose", f"{p}/{part}/Transpose", [t], perm=[0, 2, 1, 3])
    q, k, v = bhsd["q"], bhsd["k"], bhsd["v"]
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


def silu(g: Graph, scope: str, x: str) -> str:
    # opset 23 has no Swish (added in 24): x * Sigmoid(x), which both runtimes fuse.
    return g.op("Mul", f"{scope}/silu/Mul", [x, g.op("Sigmoid", f"{scope}/Sigmoid", [x])])


def dense_mlp(g: Graph, ckpt: Checkpoint, p: str, x: str, layers: dict[str, Linear]) -> str:
    """fc is the activated branch, gate the linear one (reference.model.mlp)."""
    fc = linear(g, ckpt, x, layers[f"{p}.fc"])
    gate = linear(g, ckpt, x, layers[f"{p}.gate"])
    y = g.op("Mul", f"{p}/Mul", [silu(g, f"{p}.fc", fc), gate])
    return linear(g, ckpt, y, layers[f"{p}.proj"])


def gated_expert(g: Graph, ckpt: Checkpoint, x: str, fc: Weights, proj: Weights) -> str:
    """MoE and shared experts: fc = [up; gate], the second half activated (reference expert_mlp)."""
    up, gate = g.op("Split", f"{fc.module}/Split", [project(g, ckpt, x, fc)], 2, axis=-1,
                    num_outputs=2)
    y = g.op("Mul", f"{fc.module}/up/Mul", [up, silu(g, f"{fc.module}/gate", gate)])
    return project(g, ckpt, y, proj)


def moe(g: Graph, ckpt: Checkpoint, i: int, x: str, layers: dict[str, Linear]) -> str:
    """Every expert runs on every token as its own 2-D linear pair; the router's top-k weights,
    scattered into a dense [T, E] matrix, zero the experts a token did not pick.

    Static ONNX cannot run only the picked experts (no data-dependent control flow both runtimes
    take), and the alternatives measured worse (E=8, H=I=1024, k=2, ONNX Runtime CPU, 2 threads,
    ms per call at T=1 / T=64): gathering the top-k experts' weights [T, k, H, 2I] 10.3 / 570
    (fp32; and Gather has no int4 type in ONNX, so INT4 would be dequantized before the gather);
    one batched 3-D MatMul over [E, H, 2I] 10.5 / 100 (fp32) and 84 / 182 (INT4: ONNX Runtime
    dequantizes the 3-D DQ on every call); per-expert 2-D 3.6 / 24 (fp32) and 2.6 / 23 (INT4,
    fused into MatMulNBits). Per-expert 2-D DQ+MatMul is also the pattern TensorRT for RTX keeps
    INT4 for dense linears. The cost is E/k times the expert work of a routed MoE."""
    d = ckpt.desc
    m = d.moe
    p = f"transformer.layers.{i}.mlp"
    xf = g.op("Reshape", f"{p}/Reshape", [x, g.const(f"{p}/flat_shape", [-1, d.hidden_size])])
    xr = xf if g.elem == TensorProto.FLOAT else g.op("Cast", f"{p}.router/Cast", [xf],
                                                     to=TensorProto.FLOAT)
    router = f"{p}.router.weight"  # float32 like the reference's routing
    logits = g.op("MatMul", f"{p}.router/MatMul",
                  [xr, g.array(router, ckpt.get(router).float().T.numpy(), parameter=True)])
    k = g.const(f"{p}.router/k", [m.top_k])
    if m.normalization == "renormalize":
        top, idx = g.op("TopK", f"{p}.router/TopK", [logits, k], 2, axis=-1)
        top = g.op("Softmax", f"{p}.router/Softmax", [top], axis=-1)
    else:
        probs = g.op("Softmax", f"{p}.router/Softmax", [logits], axis=-1)
        top, idx = g.op("TopK", f"{p}.router/TopK", [probs, k], 2, axis=-1)
    zeros = g.op("ConstantOfShape", f"{p}.router/ConstantOfShape",
                 [g.op("Shape", f"{p}.router/Shape", [logits])],
                 value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    dense = g.op("ScatterElements", f"{p}.router/ScatterElements", [zeros, idx, top], axis=1)
    if g.elem != TensorProto.FLOAT:
        dense = g.op("Cast", f"{p}.router/weights/Cast", [dense], to=g.elem)
    fc = Weights.load(ckpt, layers[f"{p}.fc"])
    proj = Weights.load(ckpt, layers[f"{p}.proj"])
    outs = []
    for e in range(m.num_experts):
        y = gated_expert(g, ckpt, xf, fc.expert(e), proj.expert(e))
        col = g.op("Gather", f"{p}.router[{e}]/Gather", [dense, g.const(f"{p}.router[{e}]/index",
                                                                         [e])], axis=1)
        outs.append(g.op("Mul", f"{p}.router[{e}]/Mul", [y, col]))
    del fc, proj
    if m.shared_intermediate_size:
        shared = gated_expert(g, ckpt, xf, Weights.load(ckpt, layers[f"{p}.shared_expert.fc"]),
                              Weights.load(ckpt, layers[f"{p}.shared_expert.proj"]))
        if m.shared_gate:
            gate = linear(g, ckpt, xf, layers[f"{p}.shared_expert_gate"])
            shared = g.op("Mul", f"{p}.shared_expert_gate/Mul",
                          [g.op("Sigmoid", f"{p}.shared_expert_gate/Sigmoid", [gate]), shared])
        outs.append(shared)
    out = g.op("Sum", f"{p}/Sum", outs)
    return g.op("Reshape", f"{p}/out/Reshape", [out, g.op("Shape", f"{p}/Shape", [x])])


def tied_head(g: Graph, d: ModelDesc, h: str, table: str) -> str:
    """Logits from the embedding table itself: Gemm(transB=1) reads [V, H] as it is stored, where
    MatMul would need a transposed second copy of the largest tensor."""
    flat = g.op("Reshape", "lm_head/Reshape", [h, g.const("lm_head/flat_shape",
                                                          [-1, d.hidden_size])])
    logits = g.op("Gemm", "lm_head/Gemm", [flat, table], transB=1)
    shape = g.op("Concat", "lm_head/Concat", [g.op("Shape", "lm_head/Shape", ["input_ids"]),
                                              g.const("lm_head/vocab", [d.vocab_size])], axis=0)
    return g.op("Reshape", "lm_head/out/Reshape", [logits, shape])


@dataclass(frozen=True)
class Weights:
    """The checkpoint tensors of one linear (or of one expert, sliced from the [E, ...] stacks),
    with the names its initializers and nodes get."""

    lin: Linear
    tensors: dict[str, torch.Tensor]
    module: str  # node prefix: the checkpoint module, `name[e]` for expert e
    suffix: str = ""  # initializer suffix: `[e]` for expert e

    @classmethod
    def load(cls, ckpt: Checkpoint, lin: Linear) -> Weights:
        t = {k: ckpt.get(f"{lin.name}.{k}") for k in ("weight", "bias", *QUANT_LEAVES)
             if ckpt.has(f"{lin.name}.{k}")}
        return cls(lin, t, lin.name)

    def expert(self, e: int) -> Weights:
        return Weights(self.lin, {k: v[e] for k, v in self.tensors.items()},
                       f"{self.lin.name}[{e}]", f"[{e}]")

    def name(self, leaf: str) -> str:
        return f"{self.lin.name}.{leaf}{self.suffix}"


def linear(g: Graph, ckpt: Checkpoint, x: str, lin: Linear) -> str:
    return project(g, ckpt, x, Weights.load(ckpt, lin))


def project(g: Graph, ckpt: Checkpoint, x: str, w: Weights) -> str:
    """x @ W^T (+ bias) for one 2-D checkpoint linear, float or weight-only quantized."""
    q = ckpt.desc.quant
    t = w.tensors
    dims = [w.lin.in_features, w.lin.out_features]
    if not q.quantized(w.lin.name):
        b = g.weight(w.name("weight"), t["weight"].T)
    elif q.algo == "W4A16_AWQ":
        if "prequant_scaling_factor" in t:  # AWQ's activation scale has no DQ slot (facts §3.2)
            pqs = g.weight(w.name("prequant_scaling_factor"), t["prequant_scaling_factor"])
            x = g.op("Mul", f"{w.module}/prequant/Mul", [x, pqs])
        # int8 [out/2, in] packed along out, transposed: int4 [in, out] packed along the last axis
        b = g.op("DequantizeLinear", f"{w.module}/DequantizeLinear", [
            g.int4(w.name("weight"), t["weight"].T, dims),
            g.weight(w.name("weights_scaling_factor"), t["weights_scaling_factor"].T)],
            axis=0, block_size=q.group_size)
    elif q.algo in ("W4A16", "W8A16"):
        raw = t["weight"]  # [in, out] (int4: out/2 bytes, packed along out)
        b = (g.int4(w.name("weight"), raw, dims) if q.algo == "W4A16"
             else g.array(w.name("weight"), raw.numpy(), parameter=True))
        b = g.op("DequantizeLinear", f"{w.module}/DequantizeLinear",
                 [b, g.weight(w.name("per_channel_scale"), t["per_channel_scale"])], axis=1)
    else:  # lowering_problems rejected every other algo
        raise AssertionError(q.algo)
    y = g.op("MatMul", f"{w.module}/MatMul", [x, b])
    if "bias" in t:
        y = g.op("Add", f"{w.module}/Add", [y, g.weight(w.name("bias"), t["bias"])])
    return y
