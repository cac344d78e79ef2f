"""Build shipped rtx recipes at real shapes on this CPU-only machine (random weights, since no
model hub is reachable): the Hunyuan-0.5B recipe for the RTX 3060, and the Qwen1.5-MoE-A2.7B
recipe at real widths with the layer count reduced by an override.

    python bench/bench_recipes_real_shape.py [--moe-layers 1] [--work /tmp/trtp-real]

Prints each stage's seconds, the engine bytes, and the planner's memory estimate next to
TensorRT for RTX's own figures. Random weights have no tokenizer: calibration and the quality
gate use random token ids and the gate bounds are opened (quality is measured on the trained
default model elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import make_random_model

REPO = Path(__file__).resolve().parents[1]
RANDOM_WEIGHTS = ["quantize.calib.data=random", "quantize.gate.text=random",
                  "quantize.gate.max_ppl_ratio=100", "quantize.gate.min_top1=0"]


def build(recipe: str, overrides: list[str], env: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "trt_pipeline.cli", "-q", "build",
                          str(REPO / "recipes" / recipe), *overrides, "--json"],
                         capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(res.stderr[-4000:])
    out = json.loads(res.stdout)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def report(name: str, result: dict) -> None:
    manifest = json.loads((Path(result["engine_dir"]) / "manifest.json").read_text())
    engine = Path(result["engine_dir"]) / "model.engine"
    print(f"\n{name}: {result['wall_s']} s wall, engine {engine.stat().st_size:,} B")
    for s in result["stages"]:
        status = "cached" if s["cached"] else f"{s['seconds']:8.1f} s"
        print(f"  {s['stage']:<10} {status}")
    fit = manifest["metrics"].get("memory_fit", {})
    est = fit.get("estimate", {})
    print(f"  planner total {est.get('total_bytes', 0) / 2**30:.2f} GiB on {manifest['target']}")
    for part, row in fit.get("vs_tensorrt", {}).items():
        print(f"  {part:<12} estimate {row['estimate']:>14,}  tensorrt {row['tensorrt']:>14,}  "
              f"({row['rel_diff']:+.1%})")
    build_rtx = manifest["metrics"]["build_rtx"]
    print(f"  build_rtx: {build_rtx.get('build_s')} s, peak RSS {build_rtx.get('peak_rss_mb')} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/trtp-real"))
    ap.add_argument("--moe-layers", type=int, default=1)
    ap.add_argument("--only", choices=["hunyuan", "moe"], default=None)
    args = ap.parse_args()
    env = {**os.environ, "TRT_PIPELINE_CACHE": str(args.work / "cache"),
           "TRT_PIPELINE_ENGINES": str(args.work / "engines")}
    if args.only in (None, "hunyuan"):
        src = make_random_model("hunyuan-0.5b", Path("/tmp/trtp-bench/hunyuan-0.5b-hf"))
        report("hunyuan-0.5b-int4-awq-rtx3060 (real shape)", build(
            "hunyuan-0.5b-int4-awq-rtx3060.yaml", [f"model.source={src}", *RANDOM_WEIGHTS], env))
    if args.only in (None, "moe"):
        src = make_random_model("qwen1.5-moe-a2.7b", args.work / f"qwen-moe-{args.moe_layers}l",
                                layers=args.moe_layers)
        report(f"qwen1.5-moe-a2.7b-int4-awq-rtx3060 (real widths, {args.moe_layers} layer(s))",
               build("qwen1.5-moe-a2.7b-int4-awq-rtx3060.yaml",
                     [f"model.source={src}", *RANDOM_WEIGHTS, "quantize.calib.samples=8"], env))


if __name__ == "__main__":
    main()
