"""The lower stage: a checkpoint -> one standard ONNX graph (the onnx backend's engine, and what
the rtx backend builds from)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Stage, StageContext


@dataclass(frozen=True)
class LowerParams:
    dtype: str  # float32 (CPU) or float16 (GPU engines)


def run(ctx: StageContext) -> dict[str, Any]:
    from ..backends.onnx.lower import lower_checkpoint
    from ..backends.onnx.runtime import FAST
    from ..checkpoint.io import copy_tokenizer

    src = ctx.inputs["checkpoint"].dir
    metrics = lower_checkpoint(src, ctx.out, ctx.params.dtype)
    copy_tokenizer(src, ctx.out)
    # MatMulNBits at accuracy level 4 (int8 activations per block): 1.6x faster INT4 decode for
    # a 0.01 % perplexity cost on the default model (BENCHMARKS.md); float graphs are unaffected.
    metrics["runtime"] = {"kind": "onnxruntime", "model_dir": ".", "dtype": ctx.params.dtype,
                          "accuracy_level": FAST}
    return metrics


STAGE = Stage(
    name="lower",
    run=run,
    code=("stages/lower.py", "backends/onnx/lower.py", "backends/onnx/ops.py", "checkpoint",
          "reference/model.py"),
    vendors=("onnx", "torch", "safetensors"),
)
