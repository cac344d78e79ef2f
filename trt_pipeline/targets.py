"""TARGETS: the GPUs (and the CPU) a recipe can name, with what the planner and builders need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .registry import registry

Precision = Literal["fp32", "fp16", "bf16", "int8", "int4", "fp8", "fp4"]

_AMPERE: tuple[Precision, ...] = ("fp32", "fp16", "bf16", "int8", "int4")
_ADA: tuple[Precision, ...] = (*_AMPERE, "fp8")
_BLACKWELL: tuple[Precision, ...] = (*_ADA, "fp4")


@dataclass(frozen=True, slots=True)
class Target:
    """A deployment device. `sm` is the compute capability as an int (86 = 8.6); 0 for the CPU."""

    name: str
    description: str
    sm: int
    vram_gib: float
    bandwidth_gbs: float
    precisions: tuple[Precision, ...]
    kind: Literal["geforce", "datacenter", "cpu"] = "geforce"
    fp16_tflops: float | None = None  # dense tensor rate, FP32 accumulate, where sourced

    @property
    def sm_name(self) -> str:
        return f"sm{self.sm}" if self.sm else "cpu"



# Memory sizes and bandwidths are NVIDIA's published board specs; the 3060 tensor rate is
# derived in facts/benchmarking.md §7.1 (GeForce Ampere: FP16 with FP32 accumulate at half rate).
TARGETS: dict[str, Target] = registry("target",
    Target("rtx3060-12gb", "GeForce RTX 3060 12 GB (GA106)", 86, 12, 360, _AMPERE,
           fp16_tflops=25.5),
    Target("rtx3060-8gb", "GeForce RTX 3060 8 GB (GA106, 128-bit)", 86, 8, 240, _AMPERE),
    Target("rtx3070-8gb", "GeForce RTX 3070 8 GB (GA104)", 86, 8, 448, _AMPERE),
    Target("rtx3080-10gb", "GeForce RTX 3080 10 GB (GA102)", 86, 10, 760, _AMPERE),
    Target("rtx3090-24gb", "GeForce RTX 3090 24 GB (GA102)", 86, 24, 936, _AMPERE, fp16_tflops=71),
    Target("rtx4060-8gb", "GeForce RTX 4060 8 GB (AD107)", 89, 8, 272, _ADA),
    Target("rtx4060ti-16gb", "GeForce RTX 4060 Ti 16 GB (AD106)", 89, 16, 288, _ADA),
    Target("rtx4070-12gb", "GeForce RTX 4070 12 GB (AD104)", 89, 12, 504, _ADA),
    Target("rtx4080-16gb", "GeForce RTX 4080 16 GB (AD103)", 89, 16, 717, _ADA),
    Target("rtx4090-24gb", "GeForce RTX 4090 24 GB (AD102)", 89, 24, 1008, _ADA),
    Target("rtx5070-12gb", "GeForce RTX 5070 12 GB (GB205)", 120, 12, 672, _BLACKWELL),
    Target("rtx5080-16gb", "GeForce RTX 5080 16 GB (GB203)", 120, 16, 960, _BLACKWELL),
    Target("rtx5090-32gb", "GeForce RTX 5090 32 GB (GB202)", 120, 32, 1792, _BLACKWELL),
    Target("a100-40gb", "A100 40 GB (SXM4)", 80, 40, 1555, _AMPERE, "datacenter"),
    Target("l40s-48gb", "L40S 48 GB", 89, 48, 864, _ADA, "datacenter"),
    Target("h100-80gb", "H100 SXM5 80 GB", 90, 80, 3350, _ADA, "datacenter", 989.4),
    Target("h200-141gb", "H200 SXM 141 GB", 90, 141, 4800, _ADA, "datacenter", 989.4),
    Target("cpu", "Any x86-64/aarch64 CPU (ONNX Runtime)", 0, 0, 0,
           ("fp32", "fp16", "int8", "int4"), "cpu"),
)
