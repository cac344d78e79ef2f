"""STAGES: stage name -> Stage. Each module holds one stage and its Params."""

from __future__ import annotations

from ..registry import registry
from . import build_rtx, build_trtllm, convert, lower, quantize, source, verify
from .base import Artifact, Stage, StageContext

STAGES: dict[str, Stage] = registry("stage",
    source.STAGE, convert.STAGE, quantize.STAGE, lower.STAGE, build_rtx.STAGE, build_trtllm.STAGE,
    verify.STAGE,
)

__all__ = ["STAGES", "Artifact", "Stage", "StageContext"]
