"""Quantize a float checkpoint into a TensorRT-LLM W4A16_AWQ / W4A16 / W8A16 one, layer by layer.

Memory stays at about one decoder layer: calibration runs through the reference model one layer at
a time (its float32 weights plus the activations of the calibration batch), and the output file is
streamed tensor by tensor in `expected_tensors` order. Everything is checked before anything is
written; the result appears under `out` only when complete.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint.desc import NEVER_QUANTIZED, ModelDesc
from ..checkpoint.io import (
    Checkpoint,
    StreamWriter,
    copy_tokenizer,
    expected_tensors,
    rank_file,
    write_config,
)
from ..console import track
from ..errors import BadInput, Problem
from ..fsio import replace_dir
from ..reference.model import Context, embed, load_weights
from .awq import calibrate_layer
from .calib import calibration_ids
from .pack import linear_tensors
from .schemes import Scheme, select_scheme

log = logging.getLogger(__name__)
# Rows of each linear's input that the AWQ scale search measures its loss on (attention: whole
# sequences, ceil(SEARCH_TOKENS / seq_len) of them). mean|x| and the clip objective use every
# calibration token; only the loss is sampled, because the 20-point search costs about 26 layer
# forwards over these rows. 512 is llm-awq's clip sample size; on the default model 256..4096
# gave the same perplexity within noise, and 512 keeps Hunyuan-0.5B under 5 minutes on 2 cores.
SEARCH_TOKENS = 512
# TensorRT-LLM's converters leave QuantConfig.group_size at its default for per-channel algos.
PER_CHANNEL_GROUP_SIZE = 128


@dataclass(frozen=True, slots=True)
class QuantParams:
    method: Literal["awq", "rtn"] = "awq"
    bits: int = 4
    group_size: int = 128  # 64, 128, or -1 for one scale per output channel
    exclude: tuple[str, ...] = ("lm_head",)  # fnmatch patterns kept in float
    skip_indivisible: bool = True  # keep linears with in % group_size != 0 in float
    calib_data: str = "builtin"  # builtin, random, or a UTF-8 text file
    samples: int = 32
    seq_len: int = 256
    seed: int = 0


def plan_excludes(d: ModelDesc, scheme: Scheme, params: QuantParams
                  ) -> tuple[list[str], list[Problem]]:
    """exclude_modules for the output config: the user's patterns, the linears whose input width
    the group size does not divide, and what TensorRT-LLM must know stays float (its defaults
    `*router`, `*shared_expert_gate`, ... apply only when the list is empty)."""
    user = tuple(params.exclude)
    todo = [lin for lin in d.quantizable()
            if not any(fnmatch.fnmatchcase(lin.name, p) for p in user)]
    if not todo:
        return [], [Problem("quantize.exclude", f"{list(user)} excludes every quantizable linear",
                            "Remove patterns from quantize.exclude.")]
    g = params.group_size
    odd = [lin for lin in todo if scheme.per_group and lin.in_features % g]
    problems = []
    if len(odd) == len(todo):
        widths = sorted({lin.in_features for lin in todo})
        problems.append(Problem("quantize.group_size", f"got {g}; it divides the input width of "
                                f"no linear (widths {widths})",
                                "Set quantize.group_size=64, or -1 with quantize.method=rtn."))
    elif odd and not params.skip_indivisible:
        problems.append(Problem("quantize.group_size", f"{len(odd)} linears have an input width "
                                f"not divisible by {g}, e.g. {odd[0].name} ({odd[0].in_features})",
                                "Set quantize.skip_indivisible=true to keep them in float, or "
                                "choose another quantize.group_size."))
    return sorted({*user, *(lin.name for lin in odd), *NEVER_QUANTIZED}), problems


def quantized_config(cfg: dict[str, Any], scheme: Scheme, group_size: int,
                     excludes: list[str]) -> dict[str, Any]:
    """The source config with the `quantization` section TensorRT-LLM 1.2.1 reads (facts §6, §8)."""
    out = copy.deepcopy(cfg)
    out["quantization"] = {
        "quant_algo": scheme.quant_algo,
        "kv_cache_quant_algo": None,
        "group_size": group_size if scheme.per_group else PER_CHANNEL_GROUP_SIZE,
        "has_zero_point": False,
        "pre_quant_scale": scheme.pre_quant_scale,
        "exclude_modules": excludes,
    }
    return out


def _check(src: Path, params: QuantParams) -> tuple[Checkpoint, Scheme, list[str]]:
    scheme, problems = select_scheme(params.method, params.bits, params.group_size)
    ckpt = Checkpoint(src)
    d = ckpt.desc
    if d.quant.algo is not None:
        problems.append(Problem("quantize", f"{src} is already quantized ({d.quant.algo})",
                                "Quantize the float checkpoint that the convert stage wrote."))
    if (d.tp_size, d.pp_size) != (1, 1):
        problems.append(Problem("quantize", f"{src} is split for tp={d.tp_size} pp={d.pp_size}; "
                                "quantize reads and writes unsplit (tp=1, pp=1) checkpoints"))
    if scheme is None or scheme.needs_calibration:
        if params.samples < 1:
            problems.append(Problem("quantize.calib.samples", f"got {params.samples}; "
                                    "expected >= 1"))
        if not 2 <= params.seq_len <= d.max_position_embeddings:
            problems.append(Problem("quantize.calib.seq_len", f"got {params.seq_len}; expected "
                                    f"2..{d.max_position_embeddings} (max_position_embeddings)"))
    excludes: list[str] = []
    if scheme is not None and d.quant.algo is None:
        excludes, more = plan_excludes(d, scheme, params)
        problems += more + ckpt.contract_problems()
    if problems:
        raise BadInput(problems, str(src))
    assert scheme is not None
    return ckpt, scheme, excludes


def quantize_checkpoint(src: Path, out: Path, params: QuantParams) -> dict[str, Any]:
    """Float checkpoint `src` -> quantized checkpoint `out` (config.json, rank0.safetensors,
    tokenizer files). Returns metrics: seconds, per-layer seconds, bytes, AWQ alphas, peak RSS."""
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    ckpt, scheme, excludes = _check(src, params)
    ids = None
    if scheme.needs_calibration:
        ids = calibration_ids(params.calib_data, src, ckpt.desc.vocab_size, params.samples,
                              params.seq_len, params.seed)
    cfg = quantized_config(ckpt.config, scheme, params.group_size, excludes)
    if cfg.get("tie_word_embeddings") and ModelDesc.from_config(cfg).quant.quantized("lm_head"):
        # The embedding is never quantized (a Gather reads one row), but the head is read whole
        # every token: quantizing it means storing it apart (54 % of Hunyuan-0.5B's W4 decode
        # bytes; facts/benchmarking.md §7.3). TensorRT-LLM reads an untied head as lm_head.*.
        cfg["tie_word_embeddings"] = False
    desc = ModelDesc.from_config(cfg)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        metrics = _write_tensors(ckpt, desc, tmp / rank_file(0), ids)
        write_config(tmp, cfg)
        copy_tokenizer(src, tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    metrics.update(scheme=scheme.name, quant_algo=scheme.quant_algo,
                   group_size=cfg["quantization"]["group_size"], exclude_modules=excludes,
                   bytes=(out / rank_file(0)).stat().st_size,
                   seconds=round(time.perf_counter() - start, 3),
                   peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if ids is not None:
        metrics["calib"] = {"data": params.calib_data, "samples": params.samples,
                            "seq_len": params.seq_len, "seed": params.seed}
    log.info("quantized %s -> %s (%s) in %.1f s", src, out, scheme.name, metrics["seconds"])
    return metrics


def _write_tensors(ckpt: Checkpoint, desc: ModelDesc, path: Path, ids: torch.Tensor | None
                   ) -> dict[str, Any]:
    dtype = getattr(torch, desc.dtype)
    specs = expected_tensors(desc)
    layer_names = [[n for n in specs if n.startswith(f"transformer.layers.{i}.")]
                   for i in range(desc.num_layers)]
    rest = [n for n in specs if not n.startswith("transformer.layers.")]
    first = list(specs).index(layer_names[0][0])
    layer_s: list[float] = []
    alphas: dict[str, float] = {}
    with StreamWriter(path, specs) as writer:
        for name, tensor in _outer_tensors(ckpt, desc, rest[:first], dtype):
            writer.write(name, tensor)
        calib = _Calibration.start(ckpt, desc, ids)
        for i in track(range(desc.num_layers), "quantize", desc.num_layers):
            t0 = time.perf_counter()
            w = load_weights(ckpt, torch.float32, prefix=f"transformer.layers.{i}.")
            _refuse_nonfinite(w, ckpt.dir)
            prequant, found = calib.layer(desc, w, i) if calib else ({}, {})
            alphas.update({f"layers.{i}.{k}": v for k, v in found.items()})
            tensors = _layer_tensors(desc, w, i, prequant, dtype)
            if set(tensors) != set(layer_names[i]):  # our bug, not the user's
                raise RuntimeError(f"layer {i}: made {sorted(set(tensors) ^ set(layer_names[i]))}")
            for name in layer_names[i]:
                writer.write(name, tensors[name])
            del w, tensors
            layer_s.append(round(time.perf_counter() - t0, 3))
            log.debug("layer %d quantized in %.2f s", i, layer_s[-1])
        for name, tensor in _outer_tensors(ckpt, desc, rest[first:], dtype):
            writer.write(name, tensor)
    return {"layer_seconds": layer_s, "alphas": alphas}


def _refuse_nonfinite(w: dict[str, torch.Tensor], where: Path) -> None:
    """NaN/Inf weights are refused before any search runs on them (max/min propagate NaN)."""
    for name, t in w.items():
        if not (torch.isfinite(t.amax()) and torch.isfinite(t.amin())):
            raise BadInput([Problem("checkpoint", f"{name} holds NaN or Inf values", None,
                                    str(where))])


@dataclass
class _Calibration:
    """The calibration batch's hidden states between layers (float32), and what every layer's
    search shares."""

    h: torch.Tensor
    ctx: Context
    search_seqs: int

    @classmethod
    def start(cls, ckpt: Checkpoint, desc: ModelDesc, ids: torch.Tensor | None
              ) -> _Calibration | None:
        if ids is None:
            return None
        name = "transformer.vocab_embedding.weight"
        h = embed({name: ckpt.get(name)}, ids).to(torch.float32)
        seqs = min(ids.shape[0], math.ceil(SEARCH_TOKENS / ids.shape[1]))
        return cls(h, Context.make(desc, ids.shape, None, None), seqs)

    def layer(self, desc: ModelDesc, w: dict[str, torch.Tensor], i: int
              ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        self.h, prequant, alphas = calibrate_layer(desc, desc.quant, w, i, self.h, self.ctx,
                                                   self.search_seqs, SEARCH_TOKENS)
        return prequant, alphas


def _outer_tensors(ckpt: Checkpoint, desc: ModelDesc, names: list[str], dtype: torch.dtype):
    """Embedding, final norm and lm_head, in order; lm_head, when not excluded, is quantized
    round-to-nearest (AWQ here covers the decoder layers only)."""
    lm_head = {}
    if "lm_head.weight" in names and desc.quant.quantized("lm_head"):
        source = "lm_head.weight" if ckpt.has("lm_head.weight") else \
            "transformer.vocab_embedding.weight"  # a tied head, stored apart to be quantized
        lm_head = linear_tensors("lm_head", ckpt.get(source).float(), desc.quant, dtype)
    for name in names:
        yield name, lm_head[name] if name in lm_head else ckpt.get(name).to(dtype)


def _layer_tensors(desc: ModelDesc, w: dict[str, torch.Tensor], i: int,
                   prequant: dict[str, torch.Tensor], dtype: torch.dtype
                   ) -> dict[str, torch.Tensor]:
    """Layer i's checkpoint tensors from its (folded, clipped) float32 weights."""
    linears = desc.layer_linears(i)
    weights = {f"{lin.name}.weight" for lin in linears}
    out = {name: t.to(dtype) for name, t in w.items() if name not in weights}
    for lin in linears:
        weight = w[f"{lin.name}.weight"]
        if lin.name.endswith(".router"):
            out[f"{lin.name}.weight"] = weight.to(torch.float32)  # facts §7: router stays fp32
        elif desc.quant.quantized(lin.name):
            out.update(linear_tensors(lin.name, weight, desc.quant, dtype,
                                      prequant.get(lin.name)))
        else:
            out[f"{lin.name}.weight"] = weight.to(dtype)
    return out
