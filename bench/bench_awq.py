"""AWQ INT4 g128 of a Hunyuan-0.5B-shape model (random bf16 weights, fp16 checkpoint) on the CPU.

    python bench/bench_awq.py [--work /tmp/trtp-bench-awq] [--samples 32] [--seq-len 256]

Calibrates on seeded random token ids (the model has no tokenizer) and prints the quantize
process's seconds and peak RSS (a fresh process) against the targets: < 300 s, < 3 GB.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import make_random_model, run_child

CONVERT = """
from pathlib import Path
from trt_pipeline.families.apply import convert_checkpoint
m = convert_checkpoint(Path({src!r}), Path({out!r}), "float16")
result = dict(parameters=m["parameters"])
"""
QUANTIZE = """
import os, time
from pathlib import Path
t0 = time.perf_counter()
from trt_pipeline.quant.quantize import QuantParams, quantize_checkpoint
m = quantize_checkpoint(Path({src!r}), Path({out!r}), QuantParams(
    method="awq", bits=4, group_size=128, calib_data="random", samples={samples},
    seq_len={seq_len}))
result = dict(seconds=round(time.perf_counter() - t0, 2), quantize_s=m["seconds"],
              layer_seconds=m["layer_seconds"], bytes=m["bytes"],
              cpu_s=round(sum(os.times()[:2]), 1))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hunyuan-0.5b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/trtp-bench-awq"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    hf = make_random_model(args.model, args.work / f"{args.model}-hf")
    ckpt = args.work / f"{args.model}-fp16"
    if not (ckpt / "config.json").is_file():
        run_child(CONVERT.format(src=str(hf), out=str(ckpt)))
    out = args.work / f"{args.model}-int4-awq"
    shutil.rmtree(out, ignore_errors=True)
    r = run_child(QUANTIZE.format(src=str(ckpt), out=str(out), samples=args.samples,
                                  seq_len=args.seq_len))
    fp16_mb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
    layers = r["layer_seconds"]
    print(f"model {args.model}: fp16 checkpoint {fp16_mb:.0f} MiB -> int4 AWQ "
          f"{r['bytes'] / 2**20:.0f} MiB; calibration {args.samples} x {args.seq_len} tokens")
    print(f"quantize: {r['seconds']:.1f} s wall in process ({r['cpu_s']:.0f} s CPU), "
          f"per layer {min(layers):.1f}..{max(layers):.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB")
    print(f"targets: time {r['seconds']:.0f} s < 300 s: {r['seconds'] < 300}; "
          f"peak RSS {r['peak_rss_mb']:.0f} MiB < 3072 MiB: {r['peak_rss_mb'] < 3072}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
