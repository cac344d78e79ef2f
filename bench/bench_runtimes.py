"""Our runners beside transformers generate() on the same model, in one run: output tokens/s at
batch 1 and at concurrency 4, on the default model and on a Hunyuan-0.5B-shape model.

    python bench/bench_runtimes.py [--work /tmp/trtp-bench-runtimes] [--models default hunyuan]
        [--rounds 3] [--isl 128] [--osl 64] [--hunyuan-osl 32] [--hunyuan-quant rtn|awq]
        [--onnx-accuracy-level 4] [--profile]

Each model's INT4 W4A16 g128 ONNX engine is built by the pipeline (cached under --work): the
default model with AWQ on its builtin text (recipes/default-onnx.yaml's quantization), the
Hunyuan shape (random bf16 weights, bench/common.py) with --hunyuan-quant and random calibration
ids (its quality gate off: random weights give near-flat logits whose top-1 any quantization
reorders). Engines beside each other, one process, interleaved rounds, medians:
  onnxruntime  `Runner.open(engine dir)`; re-opened at --onnx-accuracy-level (4: ONNX Runtime's
               int8-activation MatMulNBits) when the engine's runtime dict records another level
               or none (then 1), and said so
  reference    `Runner.open(quantized checkpoint dir)`: the CPU reference model (float32,
               dequantized weights)
  transformers `generate()` of the source HF model in float32, greedy, batch = concurrency
Every side gets the same seeded random prompts (ISL tokens) and makes exactly OSL tokens each
(ignore_eos / min_new_tokens). tokens/s = all new tokens / wall seconds of the whole call, prefill
included. Concurrency 4 = one call with 4 requests: the runner batches them.
--profile: then a torch profile of one batch-1 call (OSL tokens) of the reference and of
transformers: where their time goes, op by op.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from common import make_random_model

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "default": """\
name: default-onnx-int4
model: {{source: {source}, dtype: float16}}
quantize: {{method: awq, calib: {{data: builtin}}}}
build: {{backend: onnx, target: cpu, max_batch_size: 4, max_input_len: 512, max_seq_len: 1024}}
""",
    "hunyuan": """\
name: hunyuan-0.5b-onnx-int4
model: {{source: {source}, dtype: float16}}
quantize: {{method: {method}, calib: {{data: random, samples: 16, seq_len: 128}},
           gate: {{text: random, tokens: 256, min_top1: 0.0, max_ppl_ratio: 100.0}}}}
build: {{backend: onnx, target: cpu, max_batch_size: 4, max_input_len: 512, max_seq_len: 1024}}
""",
}


def build(model: str, work: Path, method: str) -> tuple[Path, Path, Path]:
    """(engine dir, quantized checkpoint dir, HF source dir) through the pipeline's cache."""
    from trt_pipeline.cache import Cache
    from trt_pipeline.executor import execute, resolve
    from trt_pipeline.plan import make_plan
    from trt_pipeline.recipe.load import load_recipe

    source = (REPO / "trt_pipeline" / "data" / "default_model" if model == "default"
              else make_random_model("hunyuan-0.5b", work / "hunyuan-0.5b-hf"))
    recipe = work / f"{model}.yaml"
    recipe.write_text(RECIPES[model].format(source=source, method=method))
    plan = make_plan(load_recipe(recipe))
    cache = Cache(work / "cache")
    engine = execute(plan, cache, work / "engines").engine_dir
    dirs = {r.spec.stage: r.dir for r in resolve(plan, cache)}
    return engine, dirs["quantize"], source


def sides(engine: Path, ckpt: Path, source: Path, level: int) -> dict:
    """name -> generate(prompts, osl) returning the new tokens per prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from trt_pipeline.backends.onnx.runtime import OnnxModel
    from trt_pipeline.runner import Runner, SamplingParams

    onnx = Runner.open(engine)
    recorded = onnx.model.session.get_session_options().get_session_config_entry(
        "session.qdq_matmulnbits_accuracy_level")
    if recorded != str(level):
        print(f"{engine.name}: the engine opens at accuracy level {recorded}; benchmarking it at "
              f"{level} (--onnx-accuracy-level)")
        onnx.model = OnnxModel.load(engine, accuracy_level=level)
    reference = Runner.open(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()

    def runner(r: Runner):
        def generate(prompts: list[list[int]], osl: int) -> list[int]:
            params = SamplingParams(max_new_tokens=osl, ignore_eos=True)
            return [e.token_id for e in r.generate(prompts, params)]
        return generate

    def transformers(prompts: list[list[int]], osl: int) -> list[int]:
        with torch.no_grad():
            out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(
                len(prompts), len(prompts[0]), dtype=torch.long), max_new_tokens=osl,
                min_new_tokens=osl, do_sample=False, pad_token_id=0)
        return out[:, len(prompts[0]):].flatten().tolist()

    return {f"onnxruntime (level {level})": runner(onnx), "reference": runner(reference),
            "transformers generate()": transformers}


def bench(model: str, args: argparse.Namespace) -> dict:
    engine, ckpt, source = build(model, args.work, args.hunyuan_quant)
    osl = args.osl if model == "default" else args.hunyuan_osl
    run = sides(engine, ckpt, source, args.onnx_accuracy_level)
    vocab = 2048 if model == "default" else 120818
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, min(vocab, 1000), (4, args.isl)).tolist()
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for conc in (1, 4):
            for name, generate in run.items():
                time.sleep(0.5)  # let the last side's spinning threads (ORT, OpenMP) go idle
                t = time.perf_counter()
                tokens = generate(prompts[:conc], osl)
                times.setdefault((name, conc), []).append(time.perf_counter() - t)
                if len(tokens) != conc * osl:
                    raise RuntimeError(f"{name}: {len(tokens)} tokens, expected {conc * osl}")
    import onnx

    nodes = onnx.load(str(engine / "model.onnx"), load_external_data=False).graph.node
    head = "float tied head" if any(n.name == "lm_head/Gemm" for n in nodes) else "own head"
    print(f"\n{model} ({engine.name}, {head}; ISL {args.isl}, OSL {osl}, greedy; medians of "
          f"{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.2f})")
    print("| side | batch 1 tok/s | concurrency 4 tok/s | vs transformers (1 / 4) |")
    print("|---|---|---|---|")
    table = {name: {c: c * osl / statistics.median(times[name, c]) for c in (1, 4)}
             for name in run}
    hf = table["transformers generate()"]
    for name, t in table.items():
        print(f"| {name} | {t[1]:.1f} | {t[4]:.1f} | {t[1] / hf[1]:.2f}x / {t[4] / hf[4]:.2f}x |")
    if args.profile:
        profile({k: run[k] for k in ("reference", "transformers generate()")}, prompts[:1], osl)
    return {"engine": str(engine), "osl": osl, "tok_s": table}


def profile(run: dict, prompts: list[list[int]], osl: int) -> None:
    """Self CPU time of the top ops of each side, and the matmul share of its total."""
    from torch.profiler import profile as torch_profile

    for name, generate in run.items():
        with torch_profile() as prof:
            generate(prompts, osl)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        top = ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms ({e.count})"
                        for e in ops[:4])
        print(f"profile {name}: total {total / 1e3:.0f} ms; {top}; aten::mm share "
              f"{sum(e.self_cpu_time_total for e in ops if e.key == 'aten::mm') / total:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/trtp-bench-runtimes"))
    ap.add_argument("--models", nargs="+", choices=tuple(RECIPES), default=list(RECIPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--hunyuan-osl", type=int, default=32)
    ap.add_argument("--hunyuan-quant", choices=("rtn", "awq"), default="rtn")
    ap.add_argument("--onnx-accuracy-level", type=int, choices=(1, 4), default=4)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(json.dumps({m: bench(m, args) for m in args.models}))


if __name__ == "__main__":
    main()
