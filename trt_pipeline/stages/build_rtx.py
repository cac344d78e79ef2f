"""The build_rtx stage: the lowered float16 ONNX graph -> a TensorRT for RTX engine dir.

ctx.out becomes the engine dir: model.engine, build.log (the whole VERBOSE builder log), onnx/
(hard links to the graph the engine was built from, which the CPU fallback runs) and the
tokenizer files. The build runs
on any machine; the engine runs only on a GPU of the target's SM (backends/rtx/engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backends.rtx.build import RtxBuildSpec, build_engine
from .base import Stage, StageContext


@dataclass(frozen=True)
class BuildRtxParams:
    """The recipe's target and build limits as this stage needs them (sm from the target)."""

    target: str
    sm: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    decode_profile: bool = False

    def spec(self) -> RtxBuildSpec:
        return RtxBuildSpec(self.target, self.sm, self.max_batch_size, self.max_input_len,
                            self.max_seq_len, self.decode_profile)


def run(ctx: StageContext) -> dict[str, Any]:
    from ..checkpoint.io import copy_tokenizer

    p: BuildRtxParams = ctx.params
    src = ctx.inputs["onnx"].dir
    metrics = build_engine(src, ctx.out, p.spec())
    copy_tokenizer(src, ctx.out)  # the runner reads only the engine dir
    return metrics


STAGE = Stage(
    name="build_rtx",
    run=run,
    code=("stages/build_rtx.py", "backends/rtx/build.py"),
    vendors=("tensorrt-rtx-cu12-libs", "tensorrt-rtx-cu12-bindings"),
)
