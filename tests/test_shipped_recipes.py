"""Every shipped onnx and rtx recipe builds for real at tiny shapes: the recipe as written, its
source swapped for a tiny model of the same family (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_recipe import shipped_recipes, tiny_source_overrides

from trt_pipeline.cache import Cache
from trt_pipeline.executor import execute
from trt_pipeline.manifest import read_engine_manifest
from trt_pipeline.plan import make_plan
from trt_pipeline.recipe.load import load_recipe

TINY_LIMITS = ["build.max_batch_size=2", "build.max_input_len=64", "build.max_seq_len=128",
               "quantize.calib.samples=4", "quantize.calib.seq_len=64", "quantize.gate.tokens=128"]
# Random tiny models have no tokenizer and near-uniform outputs: calibrate and verify on random
# ids, and leave quality to the tests that use the trained default model.
RANDOM_TEXT = ["quantize.calib.data=random", "quantize.gate.text=random",
               "quantize.gate.max_ppl_ratio=100", "quantize.gate.min_top1=0"]
BUILDABLE = [p for p in shipped_recipes()
             if load_recipe(p).recipe.build.backend in ("onnx", "rtx")]


@pytest.mark.parametrize("path", BUILDABLE, ids=lambda p: p.stem)
def test_recipe_builds_at_tiny_shape(path, tiny_hf):
    overrides = tiny_source_overrides(path, tiny_hf)
    if overrides:
        overrides += RANDOM_TEXT
    plan = make_plan(load_recipe(path, [*overrides, *TINY_LIMITS]))
    result = execute(plan, Cache(), Path(os.environ["TRT_PIPELINE_ENGINES"]))
    m = read_engine_manifest(result.engine_dir)
    files = {f.path for f in m.files}
    assert m.recipe == plan.name and m.backend == plan.loaded.recipe.build.backend
    if m.backend == "rtx":
        assert {"model.engine", "onnx/model.onnx"} <= files and m.runtime["sm"] == plan.target.sm
    else:
        assert "model.onnx" in files
    assert m.metrics["verify"]["top1_agreement"] >= plan.specs[-1].params.min_top1
