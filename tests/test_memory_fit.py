"""memory_fit: hand-computed bytes at real shapes, the checkpoint contract as a second witness,
and refusals that say by how much and what to change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trt_pipeline.checkpoint.desc import ModelDesc, QuantDesc
from trt_pipeline.checkpoint.io import expected_tensors
from trt_pipeline.families import family_for
from trt_pipeline.families.apply import checkpoint_config
from trt_pipeline.memory_fit import (
    KV_COPIES,
    OVERHEAD_BYTES,
    RTX_SMS,
    GiB,
    compare,
    estimate,
    fit_problems,
    suggestions,
    usable_bytes,
)
from trt_pipeline.targets import TARGETS

CONFIGS = Path(__file__).parent / "data" / "configs"
RTX3060 = TARGETS["rtx3060-12gb"]
AWQ = {"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False,
       "pre_quant_scale": True, "exclude_modules": ["lm_head"]}
# Hunyuan-0.5B (facts/benchmarking.md §7.2): 415,236,096 linear + 123,717,632 embedding params
LINEARS, EMBED = 415_236_096, 123_717_632
NORMS = 24 * (2 * 1024 + 2 * 128) + 1024  # input/post norms, QK norms, ln_f
ROPE = 2 * 32768 * 64 * 2  # cos + sin [max_position_embeddings, head/2] float16


def desc(name: str, quant: dict | None = None) -> ModelDesc:
    hf = json.loads((CONFIGS / f"{name}.json").read_text())
    cfg = checkpoint_config(family_for(hf), hf, "float16")
    if quant:
        cfg["quantization"] = quant
    return ModelDesc.from_config(cfg)


def hunyuan(weight_bits, batch=1, inp=512, seq=4096, target=RTX3060):
    return estimate(desc("hunyuan-0.5b"), weight_bits, "float16", batch, inp, seq, target)


def test_hunyuan_kv_cache_is_96_kib_per_token():
    assert hunyuan(None, seq=1, inp=1).kv_cache_bytes == 98_304
    e = hunyuan(None, batch=2, seq=4096)
    assert e.kv_cache_bytes == 2 * 4096 * 98_304  # 768 MiB, held twice (past + present)
    assert e.total_bytes - e.weights_bytes - e.activations_bytes - e.overhead_bytes \
        == KV_COPIES * e.kv_cache_bytes == 2 * e.kv_cache_bytes


def test_hunyuan_int4_weights_by_hand():
    everything = hunyuan({"*": 4})  # tied embedding INT4 too
    int4 = (LINEARS + EMBED) // 2 + (LINEARS + EMBED) // 128 * 2
    assert int4 == 277_898_016  # 538.95 M x 0.515625: "≈ 278 MB"
    assert everything.weights_bytes == int4 + NORMS * 2 + ROPE
    head_fp16 = hunyuan(QuantDesc("W4A16_AWQ", exclude_modules=("lm_head",)))
    w4 = LINEARS // 2 + LINEARS // 128 * 2 + EMBED * 2
    assert w4 == 461_541_376  # "W4 linears + FP16 tied head ≈ 461.5 MB"
    assert head_fp16.weights_bytes == w4 + NORMS * 2 + ROPE
    assert hunyuan(None).weights_bytes == (LINEARS + EMBED + NORMS) * 2 + ROPE


def test_hunyuan_activations_by_hand():
    e = hunyuan(None, batch=2, inp=512, seq=4096)
    b = e.breakdown
    tokens = 2 * 512
    assert b["activations.hidden"] == tokens * (2 * 1024 + 3 * 3584) * 2
    assert b["activations.logits_float16"] == tokens * 120_818 * 2
    assert b["activations.logits_output"] == tokens * 120_818 * 4
    assert b["activations.mask"] == tokens * 4096
    assert b["activations.mask_internal"] == tokens * 4096 * 9
    assert e.activations_bytes == sum(v for k, v in b.items() if k.startswith("activations."))
    assert e.overhead_bytes == OVERHEAD_BYTES and e.fits(RTX3060)
    assert hunyuan(None, target=TARGETS["cpu"]).overhead_bytes == 0


@pytest.mark.parametrize("quant", [None, AWQ], ids=["float16", "awq"])
@pytest.mark.parametrize("name", ["hunyuan-0.5b", "qwen2.5-0.5b", "llama-3.2-1b",
                                  "mixtral-8x7b", "qwen1.5-moe-a2.7b"])
def test_weights_equal_the_checkpoint_contract(name, quant):
    """Second witness: every tensor expected_tensors says the checkpoint holds (which the
    lowering puts in the graph as is), plus the graph's RoPE tables."""
    d = desc(name, quant)
    contract = sum(s.nbytes for s in expected_tensors(d).values())
    rope = 2 * d.max_position_embeddings * (d.head_size // 2) * 2
    assert estimate(d, None, "float16", 1, 128, 1024, RTX3060).weights_bytes == contract + rope


def test_mixtral_8x7b_float16_on_rtx3060_is_refused_with_ranked_suggestions():
    d = desc("mixtral-8x7b")
    e = estimate(d, None, "float16", 1, 512, 4096, RTX3060)
    experts = 32 * 8 * 3 * 4096 * 14336  # every expert counts, not the top-2
    attention = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
    assert e.breakdown["weights.linears"] == (experts + attention) * 2
    assert e.breakdown["weights.router"] == 32 * 4096 * 8 * 4
    assert not e.fits()
    (p,) = fit_problems(e, RTX3060)
    over = (e.total_bytes - usable_bytes(RTX3060)) / GiB
    assert p.path == "build.target" and f"{over:.2f} GiB over" in p.message
    ranked = suggestions(e, RTX3060)
    assert ranked[0].setting == "quantize.method=awq" and not ranked[0].fits
    assert ranked[-1].setting == "build.target=rtx5090-32gb with quantize.method=awq"
    assert ranked[-1].fits and ranked[-1].setting in (p.fix or "")
    assert "fp8" not in (p.fix or "").lower()


def test_sequence_and_batch_suggestions_are_the_largest_that_fit():
    q = QuantDesc("W4A16_AWQ")
    e = hunyuan(q, batch=8, inp=512, seq=32768)  # KV 2 x 24 GiB
    by_knob = {s.setting.split("=")[0]: s for s in suggestions(e, RTX3060, "awq")}
    assert "quantize.method=awq" not in by_knob  # already quantized
    seq = int(by_knob["build.max_seq_len"].setting.split("=")[1])
    batch = int(by_knob["build.max_batch_size"].setting.split("=")[1])
    assert by_knob["build.max_seq_len"].fits and by_knob["build.max_batch_size"].fits
    assert seq % 256 == 0 and hunyuan(q, batch=8, seq=seq).fits()
    assert not hunyuan(q, batch=8, seq=seq + 256).fits()
    assert hunyuan(q, batch=batch, seq=32768).fits()
    assert not hunyuan(q, batch=batch + 1, seq=32768).fits()


def test_quantized_kv_cache_is_never_suggested():
    """No stage writes a quantized KV cache (plan.py refuses build.kv_cache.dtype int8/fp8)."""
    big = dict(batch=64, inp=512, seq=32768)
    for target, backend in (("rtx4090-24gb", "trtllm"), ("rtx4090-24gb", "rtx"),
                            ("rtx3090-24gb", "trtllm")):
        t = TARGETS[target]
        e = hunyuan(None, target=t, **big)
        fix = fit_problems(e, t, backend=backend)[0].fix or ""
        assert "kv_cache" not in fix, (target, backend, fix)


def test_per_channel_int4_is_one_scale_per_output_channel():
    """group_size -1 (W4A16/W8A16 weight-only): a float16 scale per row, not per value."""
    per_channel = estimate(desc("hunyuan-0.5b"), {"*": 4}, "float16", 1, 512, 4096, RTX3060,
                           group_size=-1)
    # Hunyuan-0.5B rows: 24 x (qkv 16x128 + 2x8x128 + dense 1024 + fc, gate 3584 + proj 1024) and
    # the tied embedding's 120818 rows
    rows = 24 * (4096 + 1024 + 3584 + 3584 + 1024) + 120_818
    assert per_channel.breakdown["weights.quant_scales"] == rows * 2
    assert per_channel.weights_bytes == (LINEARS + EMBED) // 2 + rows * 2 + NORMS * 2 + ROPE


def test_bigger_target_for_rtx_is_never_sm90():
    d = desc("mixtral-8x7b")
    e = estimate(d, QuantDesc("W4A16_AWQ", exclude_modules=("lm_head",)), "float16", 1, 512,
                 4096, RTX3060)
    (target,) = [s for s in suggestions(e, RTX3060, "awq") if s.setting.startswith(
        "build.target=")]
    name = target.setting.split("=")[1]
    assert TARGETS[name].sm in RTX_SMS and target.fits


def test_compare_puts_tensorrt_figures_beside_the_estimate():
    e = hunyuan(None)
    internal = e.activations_bytes - e.breakdown["activations.logits_output"] \
        - e.breakdown["activations.mask"]
    got = compare(e, {"weights_bytes": e.weights_bytes // 2, "activation_bytes": internal})
    assert got["weights"] == {"estimate": e.weights_bytes, "tensorrt": e.weights_bytes // 2,
                              "rel_diff": 1.0}
    assert got["activations"]["rel_diff"] == 0.0


def test_rtx_sms_are_the_installed_tensorrt_for_rtx_targets():
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 (extra [rtx]) missing")
    sms = {int(m[2:]) for m in trt.ComputeCapability.__members__ if m.startswith("SM")}
    assert sms == set(RTX_SMS)
