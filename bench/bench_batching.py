"""In-flight vs static batching: the same workload through the same runner, scheduled both ways.

    python bench/bench_batching.py [--work /tmp/trtp-bench-harness] [--requests 48]
        [--isl 128] [--osl 64] [--osl-stddev 48] [--concurrency 8] [--rate 0] [--reps 3]

The default model's float32 ONNX engine (built through the pipeline, cached under --work), a
seeded synthetic workload with spread-out output lengths (where static batching hurts most: a
batch lasts as long as its longest request), closed loop at --concurrency (or Poisson arrivals
at --rate requests/s, capped at --concurrency in flight), max_batch_size = --concurrency. Modes
alternate per repetition (ABBA) and every figure is the median over repetitions; the ratios
printed are in-flight / static from the same run.
"""

from __future__ import annotations

import argparse
import statistics

from bench_harness_overhead import default_onnx_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/trtp-bench-harness")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--osl-stddev", type=float, default=48.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s; 0 = closed loop")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from pathlib import Path

    from trt_pipeline.bench.measure import measure
    from trt_pipeline.bench.metrics import summarize
    from trt_pipeline.bench.workload import synthetic
    from trt_pipeline.runner import Runner

    runner = Runner.open(default_onnx_engine(Path(args.work)))
    requests = synthetic(args.requests, args.isl, args.osl, 0.0, args.osl_stddev,
                         runner.model.vocab_size, 0)
    rate = args.rate or None
    modes = {"static": False, "inflight": True}
    got: dict[str, list] = {m: [] for m in modes}
    for rep in range(args.reps):
        order = list(modes) if rep % 2 == 0 else list(reversed(modes))
        for mode in order:
            records = measure(runner, requests, args.concurrency, warmup=args.concurrency,
                              rate=rate, max_batch_size=args.concurrency,
                              inflight=modes[mode])
            if not all(r.ok for r in records):
                raise RuntimeError(f"{mode}: failed requests")
            got[mode].append(summarize(records))
    load = f"Poisson {args.rate}/s" if rate else f"closed loop, concurrency {args.concurrency}"
    osls = [r.output_tokens for r in requests]
    print(f"workload: {args.requests} requests, ISL {args.isl}, OSL {min(osls)}-{max(osls)} "
          f"(mean {statistics.mean(osls):.1f}), {load}, max_batch_size {args.concurrency}, "
          f"{args.reps} reps ABBA; engine {runner.info['path']}")
    rows = [("TTFT p50 ms", lambda s: s.ttft_ms.p50), ("TTFT p99 ms", lambda s: s.ttft_ms.p99),
            ("ITL p50 ms", lambda s: s.itl_ms.p50), ("E2E p50 ms", lambda s: s.e2e_ms.p50),
            ("E2E p99 ms", lambda s: s.e2e_ms.p99), ("output tok/s", lambda s: s.output_tok_s),
            ("mean concurrency", lambda s: s.mean_concurrency)]
    print("| metric | static | in-flight | in-flight / static |\n|---|---|---|---|")
    for name, get in rows:
        a = statistics.median(get(s) for s in got["static"])
        b = statistics.median(get(s) for s in got["inflight"])
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
