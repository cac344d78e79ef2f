"""The portable lowering: checkpoint -> standard ONNX opset-23 graph, run by ONNX Runtime (CPU) and
parsed by TensorRT for RTX (facts/onnx.md). Only the default ONNX domain is used."""
