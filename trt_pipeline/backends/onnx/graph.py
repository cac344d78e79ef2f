"""The ONNX graph builder under lower.py: nodes, initializers streamed to one data file, and the
checkpoint's linears: one linear (float or weight-only quantized) as `DequantizeLinear` +
`MatMul`, linears sharing an input stacked into one, and MoE expert stacks.

Initializers stream one tensor at a time from the checkpoint into the external data file, so
lowering holds a few copies of the largest tensor, not the model (Hunyuan-0.5B shape to float32:
peak anonymous memory 1.1 GB for 2.2 GB of weights, the 0.5 GB embedding being the largest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from ...checkpoint.desc import Linear
from ...checkpoint.io import Checkpoint

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


# The axis of a leaf that holds the output features: float and W4A16_AWQ weights are [out, in]
# (AWQ int4 packed along out), per-channel W8A16/W4A16 ones [in, out] (checkpoint/layout.py).
OUT_AXIS = {"weight": 0, "weights_scaling_factor": 0, "bias": 0}
OUT_AXIS_PER_CHANNEL = {"weight": 1, "per_channel_scale": 0, "bias": 0}


@dataclass(frozen=True)
class Weights:
    """The checkpoint tensors of one linear (or of one expert, sliced from the [E, ...] stacks,
    or of linears sharing an input, stacked along the output), with the names its initializers
    and nodes get."""

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


def stacked(parts: list[Weights]) -> Weights | None:
    """One linear computing `parts` (same input) side by side, named `a.fc+gate`, or None
    when they cannot share one MatMul (different leaves or different AWQ input scales)."""
    import torch

    first = parts[0].tensors
    if any(p.tensors.keys() != first.keys() for p in parts):
        return None
    pqs = first.get("prequant_scaling_factor")
    if pqs is not None and any(not torch.equal(p.tensors["prequant_scaling_factor"], pqs)
                               for p in parts):
        return None
    axes = OUT_AXIS_PER_CHANNEL if "per_channel_scale" in first else OUT_AXIS
    tensors = {k: (pqs if k == "prequant_scaling_factor" else
                   torch.cat([p.tensors[k] for p in parts], axes[k])) for k in first}
    scope, _, _ = parts[0].lin.name.rpartition(".")
    name = f"{scope}.{'+'.join(p.lin.name.rpartition('.')[2] for p in parts)}"
    lin = Linear(name, parts[0].lin.in_features, sum(p.lin.out_features for p in parts))
    return Weights(lin, tensors, name)


def project(g: Graph, ckpt: Checkpoint, x: str, w: Weights, out: str | None = None) -> str:
    """x @ W^T (+ bias) for one 2-D checkpoint linear, float or weight-only quantized; `out`
    names the result."""
    q = ckpt.desc.quant
    t = w.tensors
    dims = [w.lin.in_features, w.lin.out_features]
    if not q.quantized(w.lin.name.split("+")[0]):  # stacked ones share their first's scheme
        b = g.weight(w.name("weight"), t["weight"].T)
    elif q.algo == "W4A16_AWQ":
        pqs = t.get("prequant_scaling_factor")
        # AWQ's activation scale has no DQ slot (facts §3.2); ones (every linear AWQ folded
        # into a norm or the previous linear) are left out: x * 1 is x, and a node per linear.
        if pqs is not None and not bool((pqs == 1).all()):
            x = g.op("Mul", f"{w.module}/prequant/Mul",
                     [x, g.weight(w.name("prequant_scaling_factor"), pqs)])
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
    else:  # lower.lowering_problems rejected every other algo
        raise AssertionError(q.algo)
    bias = "bias" in t
    y = g.op("MatMul", f"{w.module}/MatMul", [x, b], [out] if out and not bias else 1)
    if bias:
        y = g.op("Add", f"{w.module}/Add", [y, g.weight(w.name("bias"), t["bias"])],
                 [out] if out else 1)
    return y


def linear(g: Graph, ckpt: Checkpoint, x: str, lin: Linear, out: str | None = None) -> str:
    return project(g, ckpt, x, Weights.load(ckpt, lin), out)


def silu(g: Graph, scope: str, x: str) -> str:
    # opset 23 has no Swish (added in 24): x * Sigmoid(x), which both runtimes fuse.
    return g.op("Mul", f"{scope}/silu/Mul", [x, g.op("Sigmoid", f"{scope}/Sigmoid", [x])])


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
