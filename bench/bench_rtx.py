"""TensorRT for RTX SM86 engine of a Hunyuan-0.5B-shape model (random weights), INT4 W4A16 g128,
lowered to float16, built on this machine's CPUs (no GPU needed).

    python bench/bench_rtx.py [--work /tmp/trtp-bench-rtx] [--method awq|rtn] [--profiles 1 2]

Prints the build's wall seconds, the build process's peak RSS (a fresh process), the engine bytes
and engine bytes / ideal bytes, against the targets: build < 60 s, peak RSS < 2.5 GB,
engine / ideal < 1.10. Ideal = what the graph's weights take as stored: packed int4 values,
float16 scales, float16 norms and embedding, float32 routers (from the checkpoint's safetensors
header); the RoPE tables the graph adds are shown beside it. Then memory_fit's estimate beside
TensorRT's own weight and activation figures. Checkpoints and graphs are reused across runs.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

from common import make_random_model, run_child

CONVERT = """
from pathlib import Path
from trt_pipeline.families.apply import convert_checkpoint
m = convert_checkpoint(Path({src!r}), Path({out!r}), "float16")
result = dict(parameters=m["parameters"])
"""
QUANTIZE = """
from pathlib import Path
from trt_pipeline.quant.quantize import QuantParams, quantize_checkpoint
m = quantize_checkpoint(Path({src!r}), Path({out!r}), QuantParams(
    method={method!r}, bits=4, group_size=128, calib_data="random", samples={samples},
    seq_len={seq_len}))
result = dict(seconds=m["seconds"])
"""
LOWER = """
from pathlib import Path
from trt_pipeline.backends.onnx.lower import lower_checkpoint
result = lower_checkpoint(Path({src!r}), Path({out!r}), "float16")
"""
BUILD = """
import shutil
from pathlib import Path
from trt_pipeline.backends.rtx.build import RtxBuildSpec, build_engine
out = Path({out!r})
shutil.rmtree(out, ignore_errors=True)
result = build_engine(Path({src!r}), out, RtxBuildSpec({target!r}, 86, {batch}, {inp}, {seq},
                                                      decode_profile={two}))
"""


def checkpoint_bytes(ckpt: Path) -> dict[str, int]:
    """The graph's weight bytes as stored, from the checkpoint's safetensors header."""
    raw = (ckpt / "rank0.safetensors").open("rb").read(8)
    (n,) = struct.unpack("<Q", raw)
    with (ckpt / "rank0.safetensors").open("rb") as f:
        f.seek(8)
        header = json.loads(f.read(n))
    cfg = json.loads((ckpt / "config.json").read_text())
    out = {"int4_values": 0, "scales": 0, "float": 0}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for d in info["shape"]:
            numel *= d
        if info["dtype"] == "I8":
            out["int4_values"] += numel  # two int4 per byte
        elif "scaling_factor" in name:
            out["scales"] += 2 * numel
        else:
            out["float"] += (4 if name.endswith("router.weight") else 2) * numel
    head = cfg.get("head_size") or cfg["hidden_size"] // cfg["num_attention_heads"]
    out["ideal"] = out["int4_values"] + out["scales"] + out["float"]
    out["rope"] = 2 * cfg["max_position_embeddings"] * (head // 2) * 2
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hunyuan-0.5b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/trtp-bench-rtx"))
    ap.add_argument("--method", choices=("awq", "rtn"), default="awq")
    ap.add_argument("--samples", type=int, default=8, help="AWQ calibration sequences")
    ap.add_argument("--seq-len", type=int, default=128, help="AWQ calibration length")
    ap.add_argument("--target", default="rtx3060-12gb")
    ap.add_argument("--max-batch-size", type=int, default=1)
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--profiles", type=int, nargs="+", default=[1], choices=(1, 2),
                    help="1: one profile; 2: plus a decode-only profile (both: compare them)")
    args = ap.parse_args()
    w = args.work
    hf = make_random_model(args.model, w / f"{args.model}-hf")
    fp16, int4, graph = w / "fp16", w / f"int4-{args.method}", w / f"onnx-int4-{args.method}"
    if not (fp16 / "config.json").is_file():
        run_child(CONVERT.format(src=str(hf), out=str(fp16)))
    if not (int4 / "config.json").is_file():
        run_child(QUANTIZE.format(src=str(fp16), out=str(int4), method=args.method,
                                  samples=args.samples, seq_len=args.seq_len))
    if not (graph / "model.onnx").is_file():
        run_child(LOWER.format(src=str(int4), out=str(graph)))
    ideal = checkpoint_bytes(int4)
    report = {"ideal": ideal}
    for n in args.profiles:
        r = run_child(BUILD.format(out=str(w / f"engine-{n}p"), src=str(graph),
                                   target=args.target, batch=args.max_batch_size,
                                   inp=args.max_input_len, seq=args.max_seq_len, two=n == 2))
        report[f"{n}_profile"] = r
        ratio = r["engine_bytes"] / ideal["ideal"]
        print(f"{args.model} INT4 ({args.method}) -> sm86 engine, {n} profile(s), limits batch "
              f"{args.max_batch_size} input {args.max_input_len} seq {args.max_seq_len}:")
        print(f"  build {r['build_s']:.1f} s (child wall {r['wall_s']:.1f} s); peak RSS "
              f"{r['peak_rss_mb']:.0f} MiB (sampled during the build {r['build_peak_rss_mb']:.0f}"
              f", before it {r['rss_before_mb']:.0f})")
        print(f"  engine {r['engine_bytes']:,} B; ideal {ideal['ideal']:,} B (int4 "
              f"{ideal['int4_values']:,} + scales {ideal['scales']:,} + float "
              f"{ideal['float']:,}); engine / ideal {ratio:.3f} (with the RoPE tables, "
              f"{ideal['rope']:,} B: {r['engine_bytes'] / (ideal['ideal'] + ideal['rope']):.3f})")
        print(f"  TensorRT: weights {r['trt']['weights_bytes']:,} B, activations "
              f"{r['trt']['activation_bytes']:,} B; int4 constants {r['int4_weight_bytes']:,} B "
              f"in {r['int4_layers']} kernels {r['int4_kernel_families']}")
        print(f"  targets: build {r['build_s']:.0f} s < 60 s: {r['build_s'] < 60}; peak RSS "
              f"{r['peak_rss_mb'] / 1024:.2f} GiB < 2.5: {r['peak_rss_mb'] < 2560}; engine/ideal "
              f"{ratio:.3f} < 1.10: {ratio < 1.10}")
        report[f"{n}_profile_fit"] = run_child(FIT.format(ckpt=str(int4), target=args.target,
                                                          batch=args.max_batch_size,
                                                          inp=args.max_input_len,
                                                          seq=args.max_seq_len,
                                                          trt=json.dumps(r["trt"])))
        print(f"  memory_fit vs TensorRT: {json.dumps(report[f'{n}_profile_fit']['compare'])}")
    print(json.dumps(report))


FIT = """
from pathlib import Path
from trt_pipeline.checkpoint.io import Checkpoint
from trt_pipeline.memory_fit import compare, estimate
from trt_pipeline.targets import TARGETS
e = estimate(Checkpoint(Path({ckpt!r})).desc, None, "float16", {batch}, {inp}, {seq},
             TARGETS[{target!r}])
result = dict(compare=compare(e, {trt}), total_gib=round(e.total_bytes / 2**30, 3),
              breakdown=e.breakdown)
"""

if __name__ == "__main__":
    main()
