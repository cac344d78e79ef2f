"""The build_trtllm stage: a TensorRT-LLM checkpoint -> a TensorRT-LLM 1.2.1 engine dir.

ctx.out becomes the engine dir: config.json and rank{N}.engine from trtllm-build, build.log, the
timing cache, and the checkpoint's tokenizer files. A tp=1 checkpoint is split first when the
recipe asks for tensor or pipeline parallelism.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends.trtllm import TrtllmBuildSpec, preflight, run_build
from ..errors import BadInput, Problem
from .base import Stage, StageContext

LOG = "build.log"
TIMING_CACHE = "timing.cache"
SHARDS = "checkpoint-ranks"
KV_ALGOS = {"int8": "INT8", "fp8": "FP8"}  # recipe build.kv_cache.dtype -> kv_cache_quant_algo


@dataclass(frozen=True)
class BuildTrtllmParams:
    """The recipe's build section as this stage needs it (target_sm from its target)."""

    target_sm: int
    dtype: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    gpt_attention_plugin: str
    gemm_plugin: str
    moe_plugin: str
    kv_cache_type: str
    kv_cache_dtype: str
    tp_size: int
    pp_size: int
    workers: int

    @classmethod
    def from_build(cls, build: Any, *, target_sm: int, max_num_tokens: int) -> BuildTrtllmParams:
        """From a recipe `build` section (read by attribute: stages do not import recipe);
        max_num_tokens is the plan's resolved value."""
        return cls(target_sm=target_sm, dtype=build.dtype, max_batch_size=build.max_batch_size,
                   max_input_len=build.max_input_len, max_seq_len=build.max_seq_len,
                   max_num_tokens=max_num_tokens,
                   gpt_attention_plugin=build.plugins.gpt_attention,
                   gemm_plugin=build.plugins.gemm, moe_plugin=build.plugins.moe,
                   kv_cache_type=build.kv_cache.type, kv_cache_dtype=build.kv_cache.dtype,
                   tp_size=build.tp_size, pp_size=build.pp_size, workers=build.workers)


def checkpoint_problems(p: BuildTrtllmParams, cfg: dict[str, Any]) -> list[Problem]:
    """What the recipe asks that this checkpoint cannot give (the engine dtype and the KV-cache
    dtype are properties of the checkpoint in TensorRT-LLM, not build flags)."""
    dtype = cfg["dtype"]
    kv_algo = (cfg.get("quantization") or {}).get("kv_cache_quant_algo")
    m = cfg.get("mapping") or {}
    out = []
    if p.dtype not in ("auto", dtype):
        out.append(Problem("build.dtype", f"got {p.dtype}; the checkpoint is {dtype} and "
                           "trtllm-build builds in the checkpoint's dtype",
                           f"Set build.dtype=auto, or model.dtype={p.dtype}."))
    want_kv = KV_ALGOS.get(p.kv_cache_dtype)
    if (want_kv or kv_algo) and want_kv != kv_algo and p.kv_cache_dtype != "auto":
        out.append(Problem("build.kv_cache.dtype", f"got {p.kv_cache_dtype}; the checkpoint's "
                           f"kv_cache_quant_algo is {kv_algo}", "Set build.kv_cache.dtype=auto."))
    if p.kv_cache_dtype == "float16" and dtype != "float16":
        out.append(Problem("build.kv_cache.dtype", f"got float16 with a {dtype} checkpoint",
                           "Set build.kv_cache.dtype=auto."))
    split = (m.get("tp_size", 1), m.get("pp_size", 1))
    if split not in ((1, 1), (p.tp_size, p.pp_size)):
        out.append(Problem("build.tp_size", f"the checkpoint is split tp={split[0]}, "
                           f"pp={split[1]}; the recipe asks tp={p.tp_size}, pp={p.pp_size}",
                           "Use the tp=1 checkpoint, or match build.tp_size/pp_size."))
    return out


def make_spec(p: BuildTrtllmParams, cfg: dict[str, Any], ckpt_dir: Path, out_dir: Path
              ) -> TrtllmBuildSpec:
    """The TrtllmBuildSpec of p for the checkpoint `cfg` in ckpt_dir (pure)."""
    moe = (cfg.get("moe") or {}).get("num_experts", 0) > 1
    quant = cfg.get("quantization") or {}
    return TrtllmBuildSpec(
        checkpoint_dir=ckpt_dir, output_dir=out_dir, timing_cache=out_dir / TIMING_CACHE,
        checkpoint_dtype=cfg["dtype"], quant_algo=quant.get("quant_algo"),
        kv_cache_quant_algo=quant.get("kv_cache_quant_algo"), moe=moe,
        max_batch_size=p.max_batch_size, max_input_len=p.max_input_len,
        max_seq_len=p.max_seq_len, max_num_tokens=p.max_num_tokens,
        gpt_attention_plugin=p.gpt_attention_plugin, gemm_plugin=p.gemm_plugin,
        moe_plugin=p.moe_plugin, kv_cache_type=p.kv_cache_type, workers=p.workers,
        target_sm=p.target_sm)


def run(ctx: StageContext) -> dict[str, Any]:
    from ..checkpoint.io import CONFIG, read_config
    from ..checkpoint.shard import split_checkpoint

    p: BuildTrtllmParams = ctx.params
    src = ctx.inputs["checkpoint"].dir
    cfg = read_config(src)
    problems = checkpoint_problems(p, cfg)
    if problems:
        raise BadInput(problems, str(src))
    mapping = cfg.get("mapping") or {}
    split = p.tp_size * p.pp_size > 1 and mapping.get("tp_size", 1) * mapping.get("pp_size", 1) == 1
    ckpt = ctx.out / SHARDS if split else src
    spec = make_spec(p, cfg, ckpt, ctx.out)
    preflight(spec)  # before splitting: a machine that cannot build should not spend the time
    if split:
        split_checkpoint(src, ckpt, p.tp_size, p.pp_size)
    metrics = run_build(spec, ctx.out / LOG)
    if ckpt != src:
        shutil.rmtree(ckpt)
    for f in sorted(src.iterdir()):  # tokenizer files: the runner reads only the engine dir
        if f.is_file() and f.name != CONFIG and f.suffix != ".safetensors" \
                and not (ctx.out / f.name).exists():
            shutil.copy2(f, ctx.out / f.name)
    return {**metrics, "tp_size": p.tp_size, "pp_size": p.pp_size}


STAGE = Stage(
    name="build_trtllm",
    run=run,
    code=("stages/build_trtllm.py", "backends/trtllm.py", "checkpoint"),
    vendors=("tensorrt_llm", "tensorrt"),
)
