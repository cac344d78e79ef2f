"""Apply a family's rules to a Hugging Face directory: plan every tensor, check, then stream."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint.desc import EXTRA, ModelDesc
from ..checkpoint.io import (
    StreamWriter,
    TensorSpec,
    copy_tokenizer,
    expected_tensors,
    rank_file,
    write_config,
)
from ..console import track
from ..errors import BadInput, Problem
from . import family_for
from .hf import HFSource
from .rules import Family, config_problems

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
IGNORED_SOURCES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True, slots=True)
class Job:
    """One checkpoint tensor: `sources[e]` are concatenated along dim 0; several e are stacked."""

    target: str
    sources: tuple[tuple[str, ...], ...]
    stacked: bool
    spec: TensorSpec


def mapping(tp_size: int = 1, pp_size: int = 1) -> dict[str, Any]:
    """`Mapping.to_dict()` as TensorRT-LLM 1.2.1 writes it (rank dropped; facts/trtllm.md §6)."""
    return {
        "world_size": tp_size * pp_size, "gpus_per_node": 8, "cp_size": 1, "tp_size": tp_size,
        "pp_size": pp_size, "moe_tp_size": tp_size, "moe_ep_size": 1, "moe_cluster_size": 1,
        "attn_tp_size": tp_size, "attn_cp_size": 1, "cp_config": {},
        "enable_attention_dp": False, "enable_lm_head_tp_in_adp": False,
    }


def float_quantization() -> dict[str, Any]:
    return {"quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128,
            "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None}


def checkpoint_config(family: Family, hf: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The checkpoint config.json for a tp=1 float conversion of `hf`."""
    problems = [Problem("model.source", msg, None) for msg in config_problems(hf)]
    problems = problems or [Problem("model.source", msg, None) for msg in family.check(hf)]
    if problems:
        raise BadInput(problems)
    try:
        cfg = family.make_config(hf)
    except KeyError as exc:  # a field only this family needs (e.g. num_experts)
        raise BadInput([Problem("model.source", f"config.json has no {exc.args[0]}, which the "
                                f"{family.name} family needs", None)]) from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise BadInput([Problem("model.source", f"config.json does not fit the {family.name} "
                                f"family ({type(exc).__name__}: {exc})", None)]) from None
    cfg["dtype"] = dtype
    cfg["mapping"] = mapping()
    cfg["quantization"] = float_quantization()
    extra = dict(cfg.get(EXTRA, {}))
    extra.update(family=family.name, backends=list(family.backends),
                 source_architecture=(hf.get("architectures") or [hf.get("model_type")])[0])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf.get(key) is not None:
            extra[key] = hf[key]
    cfg[EXTRA] = extra
    return cfg


def plan_jobs(src: HFSource, family: Family, cfg: dict[str, Any]) -> list[Job]:
    """Every checkpoint tensor with its HF sources, checked against the contract's shapes
    before anything is read or written; all problems are reported together."""
    desc = ModelDesc.from_config(cfg)
    specs = expected_tensors(desc)
    experts = desc.moe.num_experts if desc.moe else 0
    jobs: dict[str, Job] = {}
    for rule in family.model_rules:
        if rule.applies(cfg):
            jobs[rule.target] = Job(rule.target, (rule.sources,), False, specs.get(rule.target))
    for i in range(desc.num_layers):
        for rule in family.layer_rules:
            if not rule.applies(cfg):
                continue
            target = rule.target.format(i=i)
            groups = [tuple(s.format(i=i, e=e) for s in rule.sources)
                      for e in range(experts if rule.per_expert else 1)]
            jobs[target] = Job(target, tuple(groups), rule.per_expert, specs.get(target))
    unproduced = sorted(set(specs) - set(jobs))
    unexpected = sorted(set(jobs) - set(specs))
    if unproduced or unexpected:  # the family's rules disagree with the contract: our bug
        raise RuntimeError(f"family {family.name}: never produced {unproduced[:3]}, "
                           f"not in the contract {unexpected[:3]}")
    problems = _check_sources(src, [jobs[n] for n in specs])
    if problems:
        raise BadInput(problems, f"{src.dir}")
    used = {s for j in jobs.values() for g in j.sources for s in g}
    unused = [n for n in src.names if n not in used and not n.endswith(IGNORED_SOURCES)]
    if unused:
        log.warning("%d source tensors not used by family %s, e.g. %s", len(unused), family.name,
                    unused[0])
    return [jobs[n] for n in specs]


def _check_sources(src: HFSource, jobs: list[Job]) -> list[Problem]:
    problems = []
    for job in jobs:
        missing = [s for g in job.sources for s in g if not src.has(s)]
        if missing:
            problems += [Problem("model.source", f"missing tensor {m} (needed for {job.target})",
                                 None, str(src.dir)) for m in missing]
            continue
        bad_dtype = [s for g in job.sources for s in g
                     if src.dtype(s).lower() not in ("f32", "f16", "bf16")]
        if bad_dtype:
            problems.append(Problem("model.source", f"tensor {bad_dtype[0]} has dtype "
                                    f"{src.dtype(bad_dtype[0])}; expected a float checkpoint",
                                    None, str(src.dir)))
            continue
        shapes = [[src.shape(s) for s in g] for g in job.sources]
        got = _combined_shape(shapes, job.stacked)
        if got is None or got != job.spec.shape:
            pairs = zip(job.sources[0], shapes[0], strict=True)
            desc = " + ".join(f"{s}{list(sh)}" for s, sh in pairs)
            problems.append(Problem("model.source", f"{job.target}: sources {desc} give "
                                    f"{list(got) if got else 'incompatible shapes'}, config.json "
                                    f"implies {list(job.spec.shape)}", None, str(src.dir)))
    return problems


def _combined_shape(shapes: list[list[tuple[int, ...]]], stacked: bool) -> tuple[int, ...] | None:
    per_group = []
    for group in shapes:
        rest = {s[1:] for s in group}
        if len(rest) != 1:
            return None
        per_group.append((sum(s[0] for s in group), *rest.pop()))
    if len(set(per_group)) != 1:
        return None
    return (len(per_group), *per_group[0]) if stacked else per_group[0]


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf: max/min propagate NaN, and are 20x faster than isfinite().all() on CPU."""
    import torch

    return bool(torch.isfinite(t.amax()) and torch.isfinite(t.amin()))


def convert_checkpoint(hf_dir: Path, out_dir: Path, dtype: str = "float16",
                       family: str = "auto") -> dict[str, Any]:
    """HF directory -> TensorRT-LLM checkpoint in out_dir (config.json, rank0.safetensors and
    the tokenizer files). Streams: about one model of memory, not two."""
    import torch

    if dtype not in FLOAT_DTYPES:
        raise BadInput([Problem("dtype", f"got {dtype!r}; expected one of "
                                f"{', '.join(FLOAT_DTYPES)}", None)])
    src = HFSource(Path(hf_dir))
    fam = family_for(src.config, family, str(src.dir))
    cfg = checkpoint_config(fam, src.config, dtype)
    jobs = plan_jobs(src, fam, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = 0
    with StreamWriter(out_dir / rank_file(0), {j.target: j.spec for j in jobs}) as writer:
        for job in track(jobs, f"convert {fam.name}"):
            parts = [torch.cat([src.get(s) for s in g], dim=0) if len(g) > 1 else src.get(g[0])
                     for g in job.sources]
            tensor = torch.stack(parts) if job.stacked else parts[0]
            del parts
            tensor = tensor.to(getattr(torch, job.spec.dtype))
            if tensor.is_floating_point() and not _finite(tensor):
                raise BadInput([Problem("model.source", f"{job.target} (from {job.sources[0][0]})"
                                        " holds NaN or Inf values", "Check the source weights.",
                                        str(src.dir))])
            params += tensor.numel()
            writer.write(job.target, tensor)
            del tensor
    write_config(out_dir, cfg)
    copy_tokenizer(src.dir, out_dir)
    return {"family": fam.name, "parameters": params, "tensors": len(jobs)}
