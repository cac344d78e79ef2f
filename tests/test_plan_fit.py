"""The planner's memory fit at real shapes: every shipped recipe against its model's published
config, figures checked against hand arithmetic from the config and facts/trtllm.md."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import REPO

from trt_pipeline.errors import BadInput, Problem
from trt_pipeline.memory_fit import OVERHEAD_BYTES, GiB, usable_bytes
from trt_pipeline.plan import Plan, make_plan
from trt_pipeline.recipe.load import load_recipe
from trt_pipeline.targets import TARGETS

CONFIGS = REPO / "tests" / "data" / "configs"
MIXTRAL = REPO / "recipes" / "mixtral-8x7b-int4-trtllm.yaml"
LLAMA = REPO / "recipes" / "llama-3.2-1b-int4-awq-trtllm.yaml"
# Mixtral 8x7B (tests/data/configs): 32 layers, hidden 4096, 8 experts of 14336, 32/8 heads of
# 128, vocab 32000. Quantized: every expert's w1/w3/w2 and q/k/v/o; lm_head and embedding float16.
MIXTRAL_LINEARS = 32 * 8 * 3 * 4096 * 14336 + 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
MIXTRAL_FLOAT = 2 * 32000 * 4096 * 2  # embedding + lm_head
MIXTRAL_EMBED = 32000 * 4096 * 2


def _matching_config(recipe: Path) -> Path | None:
    return next((c for c in sorted(CONFIGS.glob("*.json"))
                 if recipe.stem.startswith(f"{c.stem}-")), None)


WITH_CONFIG = [p for p in sorted((REPO / "recipes").glob("*.yaml")) if _matching_config(p)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """config stem -> a model dir holding only that published config.json (no weights)."""
    root = tmp_path_factory.mktemp("real_configs")
    out = {}
    for c in CONFIGS.glob("*.json"):
        (root / c.stem).mkdir()
        shutil.copy(c, root / c.stem / "config.json")
        out[c.stem] = root / c.stem
    return out


def plan(recipe: Path, sources: dict[str, Path], *overrides: str) -> Plan:
    cfg = _matching_config(recipe)
    assert cfg is not None
    return make_plan(load_recipe(recipe, [f"model.source={sources[cfg.stem]}", *overrides]))


def refusal(recipe: Path, sources: dict[str, Path], *overrides: str) -> list[Problem]:
    with pytest.raises(BadInput) as info:
        plan(recipe, sources, *overrides)
    return info.value.problems


def test_every_shipped_recipe_with_a_real_config_is_covered():
    stems = {p.stem for p in WITH_CONFIG}
    assert {"mixtral-8x7b-int4-trtllm", "llama-3.2-1b-int4-awq-trtllm",
            "hunyuan-0.5b-int4-awq-rtx3060", "qwen1.5-moe-a2.7b-int4-awq-rtx3060"} <= stems


@pytest.mark.parametrize("recipe", WITH_CONFIG, ids=lambda p: p.stem)
def test_shipped_recipe_fits_its_own_target_at_real_shape(recipe, sources):
    p = plan(recipe, sources)  # raises BadInput when refused
    if p.target.kind != "cpu":
        assert p.estimate is not None and p.estimate.fits(p.target)


def test_mixtral_int4_per_channel_weights_by_hand(sources):
    e = plan(MIXTRAL, sources).estimate
    int4 = MIXTRAL_LINEARS // 2 + MIXTRAL_FLOAT
    assert int4 == 23_743_954_944  # 22.11 GiB before scales, router, norms
    assert abs(e.weights_bytes - int4) / int4 < 0.02
    # one float16 scale per output channel: experts (2 x 14336 + 4096) x 8, qkv 6144, dense 4096
    assert e.breakdown["weights.quant_scales"] == 32 * ((2 * 14336 + 4096) * 8 + 6144 + 4096) * 2


def test_mixtral_on_a_12gb_card_names_the_smallest_rtx_card_that_fits(sources):
    (p,) = refusal(MIXTRAL, sources, "build.target=rtx3060-12gb")
    assert p.path == "build.target"
    needs = float(p.message.split(" needs ")[1].split(" GiB")[0])
    assert needs > 12 and "rtx3060-12gb has 10.80 GiB usable" in p.message
    assert "build.target=rtx5090-32gb" in (p.fix or "") and "h200" not in (p.fix or "")


def test_float_moe_on_trtllm_is_pointed_at_int4_weight_only_not_awq(sources):
    (p,) = refusal(MIXTRAL, sources, "build.target=rtx3060-12gb", "quantize.method=none")
    fix = p.fix or ""
    assert "quantize.method=rtn quantize.group_size=-1" in fix
    assert "method=awq" not in fix
    assert "build.target=rtx5090-32gb with quantize.method=rtn quantize.group_size=-1" in fix


def test_llama_trtllm_batch_8_fits_a_3060_by_hand(sources):
    p = plan(LLAMA, sources, "build.max_batch_size=8")
    e = p.estimate
    # 16 layers x 8 KV heads x 64 x (K, V) x 4096 positions x 8 sequences x 2 B, one paged pool
    assert e.kv_cache_bytes == 2 * 16 * 8 * 64 * 4096 * 8 * 2 == GiB and e.kv_copies == 1
    # 2048 tokens (build.max_num_tokens) x (2 x 2048 hidden + 3 x 8192 MLP) x 2 B, and the last
    # token's logits per sequence: 8 x 128256 x (2 B float16 + 4 B float32)
    assert e.activations_bytes == 2048 * (2 * 2048 + 3 * 8192) * 2 + 8 * 128256 * 6
    assert e.overhead_bytes == OVERHEAD_BYTES
    assert e.total_bytes == e.weights_bytes + e.kv_cache_bytes + e.activations_bytes \
        + e.overhead_bytes
    assert e.total_bytes <= usable_bytes(TARGETS["rtx3060-12gb"]) and e.fits()


def test_mixtral_tensor_parallel_is_costed_per_gpu(sources):
    one = plan(MIXTRAL, sources).estimate
    four = plan(MIXTRAL, sources, "build.tp_size=4").estimate
    # 8 KV heads over 4 ranks: 2 each -> a quarter of the pool
    assert four.kv_cache_bytes == 2 * 32 * 2 * 128 * 4096 * 2 * 2 == one.kv_cache_bytes // 4
    # everything split four ways but the embedding, which each tp rank holds whole
    per_gpu = (one.weights_bytes - MIXTRAL_EMBED) / 4 + MIXTRAL_EMBED
    assert abs(four.weights_bytes - per_gpu) < 16
    assert "tp x pp" in refusal(MIXTRAL, sources, "build.tp_size=4",
                                "build.target=rtx3060-8gb", "build.max_batch_size=64")[0].message


def test_shorter_sequence_suggestion_applies_as_written(sources):
    """The suggestion goes below max_input_len, so it must lower that too: applied as printed,
    the recipe passes validation and fits."""
    over = ("build.max_batch_size=64", "build.max_input_len=8192", "build.max_seq_len=131072")
    (p,) = refusal(LLAMA, sources, *over)
    shorter = next(s for s in (p.fix or "").split("; ") if "build.max_seq_len=" in s)
    settings = shorter.split(") ", 1)[1].split(":")[0].split()
    assert any(s.startswith("build.max_input_len=") for s in settings), shorter
    assert plan(LLAMA, sources, *over, *settings).estimate.fits()


@pytest.mark.parametrize("dtype,target", [("int8", "rtx3060-12gb"), ("fp8", "rtx4090-24gb")])
def test_quantized_kv_cache_is_refused_at_plan_time(sources, dtype, target):
    problems = refusal(LLAMA, sources, f"build.kv_cache.dtype={dtype}", f"build.target={target}")
    (p,) = [p for p in problems if p.path == "build.kv_cache.dtype"]
    assert "not implemented" in p.message and "auto" in (p.fix or "")


def test_no_suggestion_names_a_quantized_kv_cache(sources):
    (p,) = refusal(LLAMA, sources, "build.target=rtx4090-24gb", "build.max_batch_size=256",
                   "build.max_seq_len=131072", "build.max_input_len=8192")
    assert "kv_cache" not in (p.fix or "")
