"""The convert stage: Hugging Face directory -> TensorRT-LLM checkpoint (tp=1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Stage, StageContext


@dataclass(frozen=True)
class ConvertParams:
    dtype: str
    family: str = "auto"


def run(ctx: StageContext) -> dict[str, Any]:
    from ..families.apply import convert_checkpoint

    p: ConvertParams = ctx.params
    return convert_checkpoint(ctx.inputs["source"].dir, ctx.out, p.dtype, p.family)


STAGE = Stage(
    name="convert",
    run=run,
    code=("stages/convert.py", "families", "checkpoint"),
    vendors=("torch", "safetensors"),
)
