"""STAGES: stage name -> Stage. Each module holds one stage and its Params."""

from __future__ import annotations

from . import build_rtx, build_trtllm, convert, lower, quantize, source, verify
from .base import Artifact, Stage, StageContext


def _registry(*stages: Stage) -> dict[str, Stage]:
    out: dict[str, Stage] = {}
    for s in stages:
        if s.name in out:
            raise ValueError(f"duplicate stage {s.name}")
        out[s.name] = s
    return out


STAGES: dict[str, Stage] = _registry(
    source.STAGE, convert.STAGE, quantize.STAGE, lower.STAGE, build_rtx.STAGE, build_trtllm.STAGE,
    verify.STAGE,
)

__all__ = ["STAGES", "Artifact", "Stage", "StageContext"]
