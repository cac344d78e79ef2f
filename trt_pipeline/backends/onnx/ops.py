"""The ONNX op types the lowering may emit: those TensorRT for RTX 1.7.1 parses and builds.

How this table is checked (tests/test_onnx_lowering.py): every family's tiny checkpoint is lowered
as float32, float16 and INT4 (W4A16_AWQ), and every op type in those graphs must be listed here;
the float16 graphs of a tiny dense model and a tiny MoE model are parsed by
`tensorrt_rtx.OnnxParser` and built into an SM86 engine on a CPU-only machine
(`build_serialized_network` returns an engine). Measured 2026-11, tensorrt-rtx-cu12 1.7.1.116,
onnx 1.23.2: all six families x {float16, float16 + W4A16_AWQ} and llama/qwen2_moe x float16 +
{W8A16, W4A16 per-channel} parsed and built (0.4-4 s each, SM86 profile batch 1-2, seq 1-16,
past 0-32). Per-expert INT4 stays INT4: an E=8, H=I=1024 MoE block built to a 14.3 MB engine
(12.6 MB of int4 weights; float32 weights: 103 MB). Rechecked the same way (tests/test_rtx_build.py,
all six families x {float16, INT4}) after fc+gate became one stacked INT4 linear and the head
gained `logits_to_keep` (Neg, Slice): TensorRT takes that initializer-backed input as its
constant default, so it is no engine input and engines keep every position's logits.

Per dtype, not per op: the float32 graphs parse but do not build, because TensorRT for RTX has no
float32 attention kernel:
  "Error Code 1: Myelin ([myelin_graph.h:1295: attachExceptionMsgToGraph] MyelinCheckException:
  decompose_composite_ops.cpp:59: CHECK(composite_op->is_decomposable()) failed. Attention
  operation was not supported by a dedicated kernel. ..."
They build when the parsed attention is marked decomposable (IAttentionOutputLayer.attention
.decomposable = True), which is the rtx builder's choice; the float32 graph is meant for CPU.

Never emitted: `Attention` with past/present outputs ("TensorRT only supports Attention nodes
with one output", facts/onnx.md), any com.microsoft op, `Gather` on int4 (not an ONNX type).
"""

TRT_RTX_PARSED_OPS = frozenset({
    "Add",
    "Attention",  # one output, 4-D q/k/v, bool mask; float16 only (see above)
    "Cast",
    "Concat",
    "ConstantOfShape",
    "DequantizeLinear",  # int4 blocked (axis 0, block_size 128) and int8/int4 per-axis
    "Gather",
    "Gemm",  # tied lm_head, transB=1
    "MatMul",
    "Mul",
    "Neg",  # of logits_to_keep, an initializer-backed input TensorRT takes as a constant
    "RMSNormalization",
    "Reshape",
    "RotaryEmbedding",  # position_ids int64: the parser asks for an int64 binding
    "ScatterElements",
    "Shape",
    "Sigmoid",
    "Slice",  # the last logits_to_keep positions before the lm_head
    "Softmax",
    "Split",
    "Sum",
    "TopK",
    "Transpose",
})
