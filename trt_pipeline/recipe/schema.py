"""The recipe schema: a strict pydantic model per YAML section; field descriptions are the docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from ..errors import did_you_mean
from ..targets import TARGETS

PluginDtype = Literal["auto", "float16", "bfloat16", "float32", "disable"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSection(Section):
    source: str = Field(
        description="Local Hugging Face directory (relative paths resolve against the recipe file) "
        "or a hub id such as tencent/Hunyuan-0.5B-Instruct (taken from the local HF cache)."
    )
    family: str = Field("auto", description="Model family, or auto to detect it from config.json.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Dtype of the converted checkpoint."
    )
    revision: str | None = Field(None, description="Hub revision, for a hub id source.")
    trust_remote_code: bool = Field(
        False, description="Allow the source's own Python code. Off unless set here explicitly."
    )


class CalibSection(Section):
    data: str = Field(
        "builtin",
        description="Calibration text: builtin (shipped Shakespeare slice), random (seeded random "
        "token ids, for models without a tokenizer) or a path to a UTF-8 text file.",
    )
    samples: int = Field(32, ge=1, le=4096, description="Number of calibration sequences.")
    seq_len: int = Field(256, ge=8, le=32768, description="Tokens per calibration sequence.")
    seed: int = Field(0, ge=0, description="Seed for sampling calibration windows.")


class GateSection(Section):
    max_ppl_ratio: float = Field(
        1.25, gt=1.0, le=100.0,
        description="Fail quantize if perplexity(quantized)/perplexity(float) on held-out text "
        "exceeds this."
    )
    min_top1: float = Field(
        0.75, ge=0.0, le=1.0, description="Fail quantize if top-1 agreement with the float model "
        "on held-out text falls below this."
    )
    text: str = Field("builtin", description="Held-out text: builtin, random or a text file path.")
    tokens: int = Field(1024, ge=32, le=1_000_000, description="Held-out tokens to evaluate.")


class QuantizeSection(Section):
    method: Literal["none", "awq", "rtn"] = Field(
        "none", description="none (float), awq (activation-aware, W4A16) or rtn (round to nearest)."
    )
    bits: Literal[4, 8] = Field(4, description="Weight bits. awq supports 4 only.")
    group_size: Literal[-1, 64, 128] = Field(
        128, description="Input columns per scale; -1 = one scale per output channel."
    )
    calib: CalibSection = Field(default_factory=CalibSection)  # type: ignore[arg-type]
    exclude: tuple[StrictStr, ...] = Field(
        ("lm_head",),
        strict=False,
        description="fnmatch patterns of checkpoint modules kept in float (the router and the "
        "embedding never are quantized).",
    )
    skip_indivisible: bool = Field(
        True, description="Keep in float the linears whose input width is not a multiple of "
        "group_size (recorded in exclude_modules); false makes them an error."
    )
    gate: GateSection = Field(default_factory=GateSection)  # type: ignore[arg-type]


class PluginsSection(Section):
    gpt_attention: PluginDtype = Field("auto", description="trtllm-build --gpt_attention_plugin.")
    gemm: PluginDtype = Field(
        "auto", description="trtllm-build --gemm_plugin; auto = model dtype for float models, "
        "disabled for weight-only quantized ones (TensorRT-LLM adds its own groupwise plugin)."
    )
    moe: PluginDtype = Field(
        "auto", description="trtllm-build --moe_plugin; auto = on for MoE families, off otherwise."
    )


class KVCacheSection(Section):
    type: Literal["paged", "continuous"] = Field("paged", description="KV cache layout (trtllm).")
    dtype: Literal["auto", "float16", "int8", "fp8"] = Field(
        "auto", description="KV cache dtype; auto = the activation dtype. fp8 needs SM89+."
    )


class BuildSection(Section):
    backend: Literal["onnx", "rtx", "trtllm"] = Field(
        description="onnx (ONNX Runtime, any CPU), rtx (TensorRT for RTX engine, built without a "
        "GPU) or trtllm (TensorRT-LLM 1.2.1, in the NGC container)."
    )
    target: str = Field("rtx3060-12gb", description="Target device profile (see targets).")
    dtype: Literal["auto", "float16", "float32"] = Field(
        "auto", description="Activation dtype of the engine; auto = float32 for onnx on cpu, "
        "float16 otherwise."
    )
    max_batch_size: int = Field(1, ge=1, le=4096, description="Most concurrent sequences.")
    max_input_len: int = Field(512, ge=1, le=1_048_576, description="Longest prompt in tokens.")
    max_seq_len: int = Field(
        1024, ge=2, le=1_048_576, description="Longest prompt + generated tokens (KV cache length)."
    )
    max_num_tokens: int | None = Field(
        None, ge=1, le=1_048_576, description="Most tokens in one forward pass (trtllm); default "
        "max_batch_size x max_input_len capped at 2048."
    )
    plugins: PluginsSection = Field(default_factory=PluginsSection)  # type: ignore[arg-type]
    kv_cache: KVCacheSection = Field(default_factory=KVCacheSection)  # type: ignore[arg-type]
    tp_size: int = Field(1, ge=1, le=8, description="Tensor parallel GPUs (trtllm).")
    pp_size: int = Field(1, ge=1, le=8, description="Pipeline parallel GPUs (trtllm).")
    workers: int = Field(1, ge=1, le=8, description="Parallel engine builds (trtllm --workers).")

    @field_validator("target")
    @classmethod
    def _known_target(cls, v: str) -> str:
        if v not in TARGETS:
            hint = did_you_mean(v, TARGETS) or f"Known targets: {', '.join(TARGETS)}."
            raise ValueError(f"unknown target {v!r}. {hint}")
        return v


class RunnerSection(Section):
    max_new_tokens: int = Field(64, ge=1, le=1_048_576, description="Tokens generated per request.")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy.")
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 = off.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="1 = off.")
    seed: int = Field(0, ge=0, description="Sampling seed.")
    stop: tuple[StrictStr, ...] = Field((), strict=False, description="Stop strings.")


class BenchSection(Section):
    workload: str = Field(
        "synthetic", description="synthetic, or a trtllm-bench JSONL file, or a text file."
    )
    isl: int = Field(128, ge=1, le=1_048_576, description="Synthetic input length (tokens).")
    osl: int = Field(64, ge=1, le=1_048_576, description="Output length (tokens, EOS ignored).")
    isl_stddev: float = Field(0.0, ge=0.0, description="Synthetic input length std-dev.")
    osl_stddev: float = Field(0.0, ge=0.0, description="Output length std-dev.")
    concurrency: tuple[StrictInt, ...] = Field(
        (1,), min_length=1, strict=False, description="Concurrency sweep."
    )
    requests: int = Field(8, ge=1, le=1_000_000, description="Measured requests per level.")
    warmup: int = Field(2, ge=0, le=1000, description="Warm-up requests, excluded.")
    seed: int = Field(0, ge=0, description="Workload seed.")

    @field_validator("concurrency")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 1 or c > 4096 for c in v):
            raise ValueError("every concurrency level must be in 1..4096")
        return v


class Recipe(Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="Engine name: engines/<name>/. Letters, digits, '.', '_', '-'.",
    )
    description: str = Field("", description="One line saying what this recipe builds.")
    model: ModelSection
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)  # type: ignore[arg-type]
    build: BuildSection
    runner: RunnerSection = Field(default_factory=RunnerSection)  # type: ignore[arg-type]
    bench: BenchSection = Field(default_factory=BenchSection)  # type: ignore[arg-type]


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSection,
    "quantize": QuantizeSection,
    "quantize.calib": CalibSection,
    "quantize.gate": GateSection,
    "build": BuildSection,
    "build.plugins": PluginsSection,
    "build.kv_cache": KVCacheSection,
    "runner": RunnerSection,
    "bench": BenchSection,
    "": Recipe,
}
