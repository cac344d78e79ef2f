"""The verify stage: the built engine's logits against the Hugging Face source on held-out text.

It runs the engine through the runtime the runner would pick on this machine (on a CPU: ONNX
Runtime on the very graph the engine was built from) and fails the build when top-1 agreement
with transformers falls below the bound, so a broken lowering can never be published.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import StageFailed
from .base import Stage, StageContext

REPORT = "verify.json"


@dataclass(frozen=True)
class VerifyParams:
    text: str = "builtin"
    tokens: int = 512
    window: int = 128
    min_top1: float = 0.95


def run(ctx: StageContext) -> dict[str, Any]:
    from ..backends import open_runtime
    from ..verify import verify_model

    p: VerifyParams = ctx.params
    engine = ctx.inputs["engine"]
    runtime = engine.metrics["runtime"]
    model = open_runtime(engine.dir, runtime)
    report = verify_model(model, model.runtime, f"{engine.stage} {engine.key}",
                          ctx.inputs["source"].dir, p.text, p.tokens, p.window,
                          key="quantize.gate.text")
    (ctx.out / REPORT).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    ctx.log.info("verify: max |logit diff| %.3g, top-1 agreement %.4f, ppl %.3f vs hf %.3f",
                 report.max_abs_diff, report.top1_agreement, report.ppl_artifact, report.ppl_hf)
    if report.top1_agreement < p.min_top1:
        raise StageFailed(f"top-1 agreement with transformers {report.top1_agreement:.4f} < "
                          f"{p.min_top1} (max |logit diff| {report.max_abs_diff:.3g}); the engine "
                          "does not compute what its source does")
    return report.as_dict()


STAGE = Stage(
    name="verify",
    run=run,
    code=("stages/verify.py", "verify.py", "textdata.py", "backends/onnx/runtime.py",
          "backends/rtx/engine.py"),
    vendors=("transformers", "onnxruntime", "torch"),
)
