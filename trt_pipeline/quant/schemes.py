"""SCHEMES: the weight-only quantization formats we write, as data, keyed by their recipe name.

Each maps onto a TensorRT-LLM 1.2.1 `QuantAlgo` (facts/trtllm.md §6, §8). Group-wise INT4 is only
expressible as W4A16_AWQ: TensorRT-LLM's plain W4A16 is per output channel, so round-to-nearest
group-wise INT4 is written as W4A16_AWQ without a pre-quant scale (`pre_quant_scale: false`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Problem, one_of
from ..registry import registry

GROUP_SIZES = (64, 128)
PER_CHANNEL = -1


@dataclass(frozen=True, slots=True)
class Scheme:
    name: str
    quant_algo: str  # TensorRT-LLM QuantAlgo, spelled verbatim
    bits: int
    per_group: bool
    needs_calibration: bool
    pre_quant_scale: bool  # the checkpoint carries `prequant_scaling_factor` tensors



SCHEMES = registry("scheme",
    Scheme("int4_awq", "W4A16_AWQ", 4, per_group=True, needs_calibration=True,
           pre_quant_scale=True),
    Scheme("int4_rtn", "W4A16_AWQ", 4, per_group=True, needs_calibration=False,
           pre_quant_scale=False),
    Scheme("int4_wo", "W4A16", 4, per_group=False, needs_calibration=False,
           pre_quant_scale=False),
    Scheme("int8_wo", "W8A16", 8, per_group=False, needs_calibration=False,
           pre_quant_scale=False),
)

# (method, bits, per_group) -> scheme name; the one place the recipe's three knobs meet.
SELECT = {
    ("awq", 4, True): "int4_awq",
    ("rtn", 4, True): "int4_rtn",
    ("rtn", 4, False): "int4_wo",
    ("rtn", 8, False): "int8_wo",
}


def select_scheme(method: str, bits: int, group_size: int) -> tuple[Scheme | None, list[Problem]]:
    """The scheme for a recipe's method/bits/group_size, or the problems that rule it out."""
    problems = []
    if method not in ("awq", "rtn"):
        problems.append(Problem("quantize.method",
                                f"got {method!r}; expected {one_of(('awq', 'rtn'))}"))
    if bits not in (4, 8):
        problems.append(Problem("quantize.bits", f"got {bits!r}; expected 4 or 8"))
    if group_size not in (*GROUP_SIZES, PER_CHANNEL):
        problems.append(Problem("quantize.group_size", f"got {group_size!r}; expected "
                                f"{one_of((*GROUP_SIZES, PER_CHANNEL))}",
                                "Set quantize.group_size=128."))
    if problems:
        return None, problems
    name = SELECT.get((method, bits, group_size != PER_CHANNEL))
    if name is not None:
        return SCHEMES[name], []
    if method == "awq" and bits == 8:
        return None, [Problem("quantize.bits", "got 8; awq supports 4 bits only",
                              "Set quantize.bits=4, or quantize.method=rtn for INT8.")]
    if method == "awq":
        return None, [Problem("quantize.group_size", "got -1; awq needs a group size (its "
                              "scales protect salient channels within a group)",
                              "Set quantize.group_size=128.")]
    return None, [Problem("quantize.group_size", f"got {group_size}; INT8 weight-only is per "
                          "output channel in TensorRT-LLM (W8A16)", "Set quantize.group_size=-1.")]
