"""Shared fixtures: tiny models of every family (made once per session), the default model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILY_NAMES, make_tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "trt_pipeline" / "data" / "default_model"


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """family -> directory of a tiny random HF model (float32 safetensors)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {f: make_tiny(f, root / f) for f in FAMILY_NAMES}


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_hf, tmp_path_factory):
    """family -> float32 TensorRT-LLM checkpoint converted from the tiny HF model."""
    from trt_pipeline.families.apply import convert_checkpoint

    root = tmp_path_factory.mktemp("tiny_ckpt")
    out = {}
    for fam, hf in tiny_hf.items():
        out[fam] = root / fam
        convert_checkpoint(hf, out[fam], "float32")
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache and engines roots; nothing touches the user's."""
    monkeypatch.setenv("TRT_PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRT_PIPELINE_ENGINES", str(tmp_path / "engines"))


@pytest.fixture(scope="module")
def float_engine(tmp_path_factory):
    """(recipe, cache root, engine dir) of a float32 ONNX engine of the default model, built once
    per module in its own roots."""
    from reliability_helpers import FLOAT_ONNX, env_roots, write_recipe

    from trt_pipeline.cache import Cache
    from trt_pipeline.executor import execute
    from trt_pipeline.plan import make_plan
    from trt_pipeline.recipe.load import load_recipe

    root = tmp_path_factory.mktemp("float")
    recipe = write_recipe(root / "float-onnx.yaml", FLOAT_ONNX)
    with env_roots(root):
        result = execute(make_plan(load_recipe(recipe)), Cache(root / "cache"), root / "engines")
    return recipe, root / "cache", result.engine_dir
