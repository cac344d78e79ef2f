"""TensorRT for RTX backend: build an engine from the lowered ONNX graph (build.py) on any machine,
with or without a GPU, and run it with a KV cache on an RTX GPU (engine.py), falling back to ONNX
Runtime on the same graph where no suitable GPU is present.

`tensorrt_rtx` is imported only inside functions of this package (STYLE.md §2).
"""
