"""Quantized tensor layouts against hand-computed bytes, error bounds, schemes and config fields."""

from __future__ import annotations

import pytest
import torch

from trt_pipeline.checkpoint.desc import QuantDesc
from trt_pipeline.checkpoint.layout import dequantize_linear, pack_int4, unpack_int4
from trt_pipeline.quant.pack import linear_tensors, quantize_groupwise
from trt_pipeline.quant.quantize import quantized_config
from trt_pipeline.quant.schemes import SCHEMES, select_scheme

AWQ = QuantDesc("W4A16_AWQ", 128, pre_quant_scale=True)


def hand_weight() -> torch.Tensor:
    """Two output rows whose every group has amax 7, so scale = 1 and q = w."""
    w = torch.zeros(2, 256)
    w[0, :3] = torch.tensor([1.0, -2.0, 7.0])
    w[1, :3] = torch.tensor([7.0, -7.0, 0.0])
    w[:, 128] = 7.0
    return w


def test_pack_int4_bytes_by_hand():
    # rows [1, 7] -> 0x71; [-2, -8] -> low nibble 0xE, high 0x8 -> 0x8E (int8 -114)
    packed = pack_int4(torch.tensor([[1, -2], [7, -8]], dtype=torch.int8), dim=0)
    assert packed.tolist() == [[0x71, 0x8E - 256]]
    q = torch.randint(-8, 8, (6, 10, 4), generator=torch.Generator().manual_seed(0))
    for dim in (0, 1, 2):
        assert torch.equal(unpack_int4(pack_int4(q, dim), dim), q.to(torch.int8))


def test_w4a16_awq_layout_by_hand():
    t = linear_tensors("x", hand_weight(), AWQ, torch.float16)
    assert t["x.weight"].dtype == torch.int8 and t["x.weight"].shape == (1, 256)
    # column 0: rows (1, 7) -> 0x71; column 1: (-2, -7) -> 0x9E; column 2: (7, 0) -> 0x07
    assert t["x.weight"][0, :3].tolist() == [0x71, 0x9E - 256, 0x07]
    assert t["x.weights_scaling_factor"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert t["x.weights_scaling_factor"].dtype == torch.float16
    assert t["x.prequant_scaling_factor"].tolist() == [1.0] * 256


@pytest.mark.parametrize("algo", ["W8A16", "W4A16"])
def test_per_channel_layout_by_hand(algo):
    """weight [in, out] (int4: [in, out/2], low nibble = even output column) + per_channel_scale."""
    w = hand_weight()
    w[1] *= 127 / 7 if algo == "W8A16" else 1.0
    t = linear_tensors("x", w, QuantDesc(algo), torch.float32)
    if algo == "W8A16":
        assert t["x.weight"].shape == (256, 2)
        # row 0 scale 7/127: 1 -> 18.1 -> 18, -2 -> -36.3 -> -36, 7 -> 127
        assert t["x.weight"][:3].tolist() == [[18, 127], [-36, -127], [127, 0]]
        assert t["x.per_channel_scale"].tolist() == pytest.approx([7 / 127, 1.0])
    else:
        assert t["x.weight"].shape == (256, 1)
        assert t["x.weight"][:3, 0].tolist() == [0x71, 0x9E - 256, 0x07]
        assert t["x.per_channel_scale"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("algo", ["W4A16_AWQ", "W4A16", "W8A16"])
def test_dequantized_error_is_within_half_a_step(algo, dtype):
    """What the reference model computes with (layout.dequantize_linear) is within scale/2 of the
    float weight, element by element, including for stacked experts and a pre-quant scale."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 64, 256, generator=g) * torch.rand(3, 64, 1, generator=g)
    quant = QuantDesc(algo, 128, pre_quant_scale=algo == "W4A16_AWQ")
    s = torch.exp(torch.randn(256, generator=g)) if algo == "W4A16_AWQ" else None
    pqs = (1 / s).to(dtype) if s is not None else None
    scaled = w * (1 / pqs.float()) if s is not None else w
    t = linear_tensors("x", scaled, quant, dtype, pqs.expand(3, 256) if s is not None else None)
    parts = {k.removeprefix("x."): v for k, v in t.items()}
    got = dequantize_linear(parts, quant, torch.float32)
    if algo == "W4A16_AWQ":
        step = parts["weights_scaling_factor"].float().repeat_interleave(128, -1) * pqs.float()
    else:
        step = parts["per_channel_scale"].float()[..., None].expand_as(w)
    assert ((got - w).abs() <= step / 2 * (1 + 1e-3) + 1e-7).all()


def test_groupwise_scale_is_amax_over_7():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    q, scale = quantize_groupwise(w, 64, torch.float32)
    torch.testing.assert_close(scale, w.unflatten(-1, (4, 64)).abs().amax(-1) / 7)
    assert q.abs().max() == 7 and q.dtype == torch.int8


def test_scheme_selection():
    pick = {(m, b, g): select_scheme(m, b, g) for m in ("awq", "rtn") for b in (4, 8)
            for g in (128, 64, -1)}
    assert {k: v[0].name for k, v in pick.items() if v[0]} == {
        ("awq", 4, 128): "int4_awq", ("awq", 4, 64): "int4_awq", ("rtn", 4, 128): "int4_rtn",
        ("rtn", 4, 64): "int4_rtn", ("rtn", 4, -1): "int4_wo", ("rtn", 8, -1): "int8_wo"}
    assert pick[("awq", 8, 128)][1][0].path == "quantize.bits"
    assert pick[("rtn", 8, 128)][1][0].path == "quantize.group_size"
    assert select_scheme("awq", 4, 100)[1][0].path == "quantize.group_size"
    assert {s.quant_algo for s in SCHEMES.values()} == {"W4A16_AWQ", "W4A16", "W8A16"}
    assert not SCHEMES["int4_rtn"].pre_quant_scale and SCHEMES["int4_awq"].pre_quant_scale


def test_config_fields_exactly_as_the_facts_list():
    cfg = quantized_config({"dtype": "float16", "quantization": {"quant_algo": None}},
                           SCHEMES["int4_awq"], 128, ["*router*", "lm_head"])
    assert cfg["quantization"] == {
        "quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 128,
        "has_zero_point": False, "pre_quant_scale": True,
        "exclude_modules": ["*router*", "lm_head"]}
    rtn = quantized_config({}, SCHEMES["int4_rtn"], 64, ["lm_head"])["quantization"]
    assert (rtn["quant_algo"], rtn["group_size"], rtn["pre_quant_scale"]) == (
        "W4A16_AWQ", 64, False)
    wo = quantized_config({}, SCHEMES["int8_wo"], -1, ["lm_head"])["quantization"]
    # per channel: group_size is unused; 128 is what TensorRT-LLM's converters leave there
    assert (wo["quant_algo"], wo["group_size"], wo["pre_quant_scale"]) == ("W8A16", 128, False)
