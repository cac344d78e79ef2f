"""Sampling defaults of an engine: its recipe's runner section, under explicit options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..manifest import RECIPE_FILE
from .sampling import SamplingParams


def recipe_runner_section(engine_dir: Path) -> dict[str, Any]:
    """The `runner:` section of the resolved recipe saved beside the engine ({} if none)."""
    path = Path(engine_dir) / RECIPE_FILE
    if not path.is_file():
        return {}
    return dict((yaml.safe_load(path.read_text()) or {}).get("runner") or {})


def sampling_params(engine_dir: Path, given: dict[str, Any]) -> SamplingParams:
    """Options given explicitly win; then the recipe's runner section; then SamplingParams."""
    base = recipe_runner_section(engine_dir)
    merged: dict[str, Any] = {k: base[k] for k in ("max_new_tokens", "temperature", "top_k",
                                                   "top_p", "repetition_penalty", "seed")
                              if base.get(k) is not None}
    merged["stop"] = tuple(base.get("stop") or ())
    for k, v in given.items():
        if v is not None and v != ():
            merged[k] = tuple(v) if isinstance(v, tuple | list) else v
    return SamplingParams(**merged)
