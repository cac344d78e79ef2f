"""Convert a Hunyuan-0.5B-shape model (random bf16 weights) to an fp16 checkpoint, side by side
with loading the same model through transformers `from_pretrained` in the same run.

    python bench/bench_convert.py [--model hunyuan-0.5b] [--work /tmp/trtp-bench]

Prints seconds and peak RSS of each (fresh processes), and the ratios the issue targets:
conversion time / load time <= 1, conversion peak RSS / fp16 model bytes <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import make_random_model, run_child

CONVERT = """
import time
from pathlib import Path
t0 = time.perf_counter()
from trt_pipeline.families.apply import convert_checkpoint
m = convert_checkpoint(Path({src!r}), Path({out!r}), "float16")
result = dict(seconds=round(time.perf_counter() - t0, 2), parameters=m["parameters"])
"""
LOAD = """
import time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({src!r}, dtype=torch.float16)
result = dict(seconds=round(time.perf_counter() - t0, 2),
              parameters=sum(p.numel() for p in model.parameters()))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hunyuan-0.5b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/trtp-bench"))
    args = ap.parse_args()
    src = make_random_model(args.model, args.work / f"{args.model}-hf")
    out = args.work / f"{args.model}-ckpt"
    shutil.rmtree(out, ignore_errors=True)
    load = run_child(LOAD.format(src=str(src)))
    conv = run_child(CONVERT.format(src=str(src), out=str(out)))
    fp16_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    rows = {"transformers from_pretrained (fp16)": load, "trt-pipeline convert (fp16)": conv}
    print(f"model {args.model}: {conv['parameters']:,} parameters, fp16 checkpoint "
          f"{fp16_mb:.0f} MiB")
    print(f"{'':38} {'seconds':>8} {'wall s':>8} {'peak RSS MiB':>13}")
    for name, r in rows.items():
        print(f"{name:38} {r['seconds']:8.2f} {r['wall_s']:8.2f} {r['peak_rss_mb']:13.0f}")
    print(f"convert / load time: {conv['seconds'] / load['seconds']:.2f} (target <= 1)")
    print(f"convert peak RSS / fp16 model: {conv['peak_rss_mb'] / fp16_mb:.2f} (target <= 1.3)")
    print(json.dumps({"load": load, "convert": conv, "fp16_mib": round(fp16_mb, 1)}))


if __name__ == "__main__":
    main()
