"""Quantized checkpoints made by round-to-nearest from a float one: test inputs, not a quantizer.

The real quantizer (trt_pipeline/quant/) is tested on its own; backends need only checkpoints in
the exact W4A16_AWQ / W8A16 / W4A16 layouts (checkpoint/layout.py). A random positive
prequant_scaling_factor, with the weight divided by it, makes the activation-scale path change the
result if a backend drops it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from trt_pipeline.checkpoint.desc import ModelDesc
from trt_pipeline.checkpoint.io import (
    CONFIG,
    Checkpoint,
    StreamWriter,
    expected_tensors,
    rank_file,
    write_config,
)
from trt_pipeline.checkpoint.layout import pack_int4

AWQ = {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 128,
       "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": ["lm_head"]}


def rtn_w4a16_awq(float_ckpt_dir: Path, out_dir: Path, group: int = 128, prequant: bool = True,
                  seed: int = 0) -> Path:
    """Write a W4A16_AWQ checkpoint of `float_ckpt_dir` to `out_dir` and return it."""
    gen = torch.Generator().manual_seed(seed)
    quant = {**AWQ, "group_size": group, "pre_quant_scale": prequant}
    return _write(float_ckpt_dir, out_dir, quant,
                  lambda module, w: _awq(module, w, group, prequant, gen))


def rtn_weight_only(float_ckpt_dir: Path, out_dir: Path, algo: str) -> Path:
    """Write a per-channel W8A16 or W4A16 checkpoint of `float_ckpt_dir` to `out_dir`."""
    quant = {**AWQ, "quant_algo": algo, "pre_quant_scale": False}
    return _write(float_ckpt_dir, out_dir, quant, lambda module, w: _per_channel(module, w, algo))


def _write(float_ckpt_dir: Path, out_dir: Path, quant: dict,
           quantize: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]) -> Path:
    src = Checkpoint(Path(float_ckpt_dir))
    cfg = json.loads((src.dir / CONFIG).read_text())
    cfg["quantization"] = quant
    desc = ModelDesc.from_config(cfg)
    specs = expected_tensors(desc)
    linears = {lin.name for lin in desc.quantizable() if desc.quant.quantized(lin.name)}
    out_dir = Path(out_dir)
    with StreamWriter(out_dir / rank_file(0), specs) as writer:
        done: dict[str, torch.Tensor] = {}
        for name in specs:
            if name not in done:
                module, _, leaf = name.rpartition(".")
                if leaf == "weight" and module in linears:
                    done.update(quantize(module, src.get(name).float()))
                else:
                    done[name] = src.get(name)
            writer.write(name, done.pop(name).to(getattr(torch, specs[name].dtype)))
    write_config(out_dir, cfg)
    for extra in src.dir.iterdir():  # tokenizer files and the like travel with the checkpoint
        if extra.is_file() and extra.name not in (CONFIG, rank_file(0)):
            shutil.copy2(extra, out_dir / extra.name)
    return out_dir


def _awq(module: str, w: torch.Tensor, group: int, prequant: bool, gen: torch.Generator
         ) -> dict[str, torch.Tensor]:
    """Symmetric RTN per group of `group` inputs of w [.., out, in]: scale = amax / 7."""
    out: dict[str, torch.Tensor] = {}
    if prequant:
        pqs = 0.5 + 1.5 * torch.rand(w.shape[:-2] + w.shape[-1:], generator=gen)
        w = w / pqs.unsqueeze(-2)
        out[f"{module}.prequant_scaling_factor"] = pqs
    grouped = w.unflatten(-1, (-1, group))  # [.., out, in/g, g]
    scale = grouped.abs().amax(-1).clamp(min=1e-8) / 7
    q = (grouped / scale.unsqueeze(-1)).round().clamp(-8, 7).flatten(-2)
    out[f"{module}.weight"] = pack_int4(q, dim=-2)
    out[f"{module}.weights_scaling_factor"] = scale
    return out


def _per_channel(module: str, w: torch.Tensor, algo: str) -> dict[str, torch.Tensor]:
    """Symmetric RTN per output channel; stored [.., in, out] (int4 packed along out)."""
    qmax = 7 if algo == "W4A16" else 127
    wt = w.transpose(-1, -2)  # [.., in, out]
    scale = wt.abs().amax(-2).clamp(min=1e-8) / qmax  # [.., out]
    q = (wt / scale.unsqueeze(-2)).round().clamp(-qmax - 1, qmax).to(torch.int8)
    return {f"{module}.weight": pack_int4(q, dim=-1) if algo == "W4A16" else q,
            f"{module}.per_channel_scale": scale}
