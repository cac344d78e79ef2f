"""The quantize stage: float checkpoint -> quantized checkpoint, gated on held-out quality."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

from ..errors import StageFailed
from .base import Stage, StageContext


@dataclass(frozen=True)
class QuantizeParams:
    method: str
    bits: int
    group_size: int
    exclude: tuple[str, ...]
    skip_indivisible: bool
    calib_data: str
    samples: int
    seq_len: int
    seed: int
    max_ppl_ratio: float
    min_top1: float
    gate_text: str
    gate_tokens: int
    # TensorRT-LLM quantizes per-channel weight-only (W8A16/W4A16) weights itself at build time,
    # into its SM-specific layout; it passes int8 weights through untouched (modeling_utils.py
    # preprocess_perlayer_weights -> weight_only_quantize_dict). So for trtllm the checkpoint keeps
    # float weights under the W8A16/W4A16 quant_algo.
    float_weights_for_trtllm: bool = False

    @classmethod
    def from_recipe(cls, q: Any, backend: str) -> QuantizeParams:
        """From a recipe `quantize` section (read by attribute: stages do not import recipe)."""
        return cls(method=q.method, bits=q.bits, group_size=q.group_size,
                   exclude=tuple(q.exclude), skip_indivisible=q.skip_indivisible,
                   calib_data=q.calib.data, samples=q.calib.samples, seq_len=q.calib.seq_len,
                   seed=q.calib.seed, max_ppl_ratio=q.gate.max_ppl_ratio, min_top1=q.gate.min_top1,
                   gate_text=q.gate.text, gate_tokens=q.gate.tokens,
                   float_weights_for_trtllm=backend == "trtllm" and q.group_size == -1)


def run(ctx: StageContext) -> dict[str, Any]:
    from ..checkpoint.io import rank_file
    from ..quant.quality import evaluate
    from ..quant.quantize import QuantParams, quantize_checkpoint

    p: QuantizeParams = ctx.params
    src = ctx.inputs["checkpoint"].dir
    metrics = quantize_checkpoint(src, ctx.out, QuantParams(
        method=p.method, bits=p.bits, group_size=p.group_size, exclude=p.exclude,
        skip_indivisible=p.skip_indivisible, calib_data=p.calib_data, samples=p.samples,
        seq_len=p.seq_len, seed=p.seed))
    quality = evaluate(src, ctx.out, p.gate_text, p.gate_tokens)
    metrics["quality"] = quality
    ctx.log.info("quality: ppl float %.3f, quantized %.3f (x%.3f), top-1 agreement %.3f",
                 quality["ppl_float"], quality["ppl_quant"], quality["ppl_ratio"],
                 quality["top1_agreement"])
    failed = []
    if quality["ppl_ratio"] > p.max_ppl_ratio:
        failed.append(f"perplexity ratio {quality['ppl_ratio']:.3f} > quantize.gate."
                      f"max_ppl_ratio {p.max_ppl_ratio}")
    if quality["top1_agreement"] < p.min_top1:
        failed.append(f"top-1 agreement {quality['top1_agreement']:.3f} < quantize.gate."
                      f"min_top1 {p.min_top1}")
    if failed:
        raise StageFailed("quality gate: " + "; ".join(failed) + " (on "
                          f"{quality['tokens']} held-out tokens). Try quantize.method=awq, more "
                          "calibration samples, or a wider quantize.exclude.")
    if p.float_weights_for_trtllm:
        shutil.copy2(src / rank_file(0), ctx.out / rank_file(0))
        metrics["weights"] = "float (trtllm-build quantizes per channel)"
    return metrics


STAGE = Stage(
    name="quantize",
    run=run,
    code=("stages/quantize.py", "quant", "checkpoint", "reference", "textdata.py"),
    vendors=("torch", "safetensors", "tokenizers"),
)
