"""What `build-engine plan` shows: stages and keys, the memory estimate, the trtllm command."""

from __future__ import annotations

from typing import Any

from .plan import Plan

GiB = 1 << 30


def plan_summary(plan: Plan, resolved: list[Any]) -> dict[str, Any]:
    """A JSON-able summary of a plan and its resolved stages (executor.resolve)."""
    out: dict[str, Any] = {
        "recipe": plan.name, "family": plan.family.name, "target": plan.target.name,
        "backend": plan.loaded.recipe.build.backend, "notes": list(plan.notes),
        "stages": [{"stage": r.spec.stage, "key": r.key, "cached": r.cached, "dir": str(r.dir)}
                   for r in resolved],
    }
    if plan.estimate is not None:
        from .memory_fit import usable_bytes

        e = plan.estimate.as_dict()
        out["memory"] = {k.replace("_bytes", "_gib"): v / GiB for k, v in e.items()
                         if k.endswith("_bytes")}
        out["memory"]["kv_copies"] = e["kv_copies"]
        out["memory"]["usable_gib"] = usable_bytes(plan.target) / GiB
    if plan.engine_stage == "build_trtllm":
        out["command"] = trtllm_command(plan, resolved)
    return out


def trtllm_command(plan: Plan, resolved: list[Any]) -> list[str]:
    """The exact trtllm-build command the build stage will run, with its cache paths."""
    from .backends.trtllm import build_command
    from .quant.schemes import select_scheme
    from .stages.build_trtllm import make_spec

    by_stage = {r.spec.stage: r for r in resolved}
    build = by_stage["build_trtllm"]
    ckpt = by_stage[next(iter(build.spec.inputs.values()))]
    q = plan.loaded.recipe.quantize
    algo = select_scheme(q.method, q.bits, q.group_size)[0].quant_algo \
        if q.method != "none" else None
    cfg = {"dtype": plan.loaded.recipe.model.dtype, "quantization": {"quant_algo": algo},
           "moe": {"num_experts": plan.desc.moe.num_experts if plan.desc.moe else 0}}
    return build_command(make_spec(build.spec.params, cfg, ckpt.dir, build.dir))
