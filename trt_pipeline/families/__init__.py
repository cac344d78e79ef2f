"""FAMILIES: HF architecture -> Family, exact keys only; family_for() detects from config.json."""

from __future__ import annotations

from typing import Any

from ..errors import BadInput, Problem, did_you_mean
from ..registry import registry
from . import hunyuan, llama, mixtral, qwen2, qwen2_moe, qwen3
from .rules import Family

FAMILIES: dict[str, Family] = registry("family",
    llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, hunyuan.FAMILY, mixtral.FAMILY, qwen2_moe.FAMILY
)
BY_ARCHITECTURE: dict[str, Family] = {a: f for f in FAMILIES.values() for a in f.architectures}
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}


def supported() -> str:
    return ", ".join(f"{f.name} ({', '.join(f.architectures)})" for f in FAMILIES.values())


def family_for(hf_config: dict[str, Any], requested: str = "auto", where: str | None = None
               ) -> Family:
    """The family of an HF config.json; an explicit `requested` name must agree with it."""
    archs = hf_config.get("architectures") or []
    found = BY_ARCHITECTURE.get(archs[0]) if archs else None
    found = found or BY_MODEL_TYPE.get(hf_config.get("model_type", ""))
    if requested != "auto":
        if requested not in FAMILIES:
            raise BadInput([Problem("model.family", f"unknown family {requested!r}",
                                    did_you_mean(requested, FAMILIES)
                                    or f"Known: {', '.join(FAMILIES)}.", where)])
        if found is not None and found.name != requested:
            raise BadInput([Problem("model.family", f"got {requested!r} but config.json says "
                                    f"{found.name} ({archs[0] if archs else 'model_type'})",
                                    "Set model.family=auto.", where)])
        return FAMILIES[requested]
    if found is None:
        arch = archs[0] if archs else hf_config.get("model_type", "<none>")
        raise BadInput([Problem("model.source", f"unsupported architecture {arch!r}",
                                f"Supported: {supported()}.", where)])
    return found
