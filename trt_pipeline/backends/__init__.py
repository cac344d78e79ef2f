"""BACKENDS: runtime kind -> module, imported lazily; the only home of vendor engine packages.

A runtime module provides `open_runtime(engine_dir, runtime) -> StepModel`: a model that takes
token ids and a KV cache and returns next-token logits (runner/step.py). `runtime` is the dict the
engine manifest records for it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..errors import BadInput, Problem

RUNTIMES: dict[str, str] = {
    "reference": "trt_pipeline.backends.reference",
    "onnxruntime": "trt_pipeline.backends.onnx.runtime",
    "tensorrt_rtx": "trt_pipeline.backends.rtx.engine",
    "tensorrt_llm": "trt_pipeline.backends.trtllm",
}


def open_runtime(engine_dir: Path, runtime: dict[str, Any]) -> Any:
    kind = runtime.get("kind")
    if kind not in RUNTIMES:
        raise BadInput([Problem("manifest.runtime.kind", f"got {kind!r}; this build-engine "
                                f"runs {', '.join(RUNTIMES)}", None, str(engine_dir))])
    return importlib.import_module(RUNTIMES[kind]).open_runtime(engine_dir, runtime)
