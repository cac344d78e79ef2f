"""Every family quantizes into exactly the tensors TensorRT-LLM expects and runs on the reference
model; bad input fails up front with a key path and leaves nothing behind."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import FAMILY_NAMES

from trt_pipeline.checkpoint.desc import ModelDesc
from trt_pipeline.checkpoint.io import Checkpoint, StreamWriter, expected_tensors, write_config
from trt_pipeline.errors import BadInput
from trt_pipeline.quant.quantize import QuantParams, quantize_checkpoint
from trt_pipeline.reference.model import ReferenceModel

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "trt_pipeline" / "data" / "default_model"
IDS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(9))
TINY_AWQ = QuantParams(method="awq", calib_data="random", samples=4, seq_len=64)
INT8 = QuantParams(method="rtn", bits=8, group_size=-1)
NAMES = {"W4A16_AWQ": {"weight", "weights_scaling_factor", "prequant_scaling_factor"},
         "W8A16": {"weight", "per_channel_scale"}}


def synthetic_ckpt(path, base_cfg, **changes):
    """A float32 checkpoint with random weights for a config we have no tiny HF model of."""
    cfg = {**copy.deepcopy(base_cfg), **changes}
    specs = expected_tensors(ModelDesc.from_config(cfg))
    g = torch.Generator().manual_seed(0)
    with StreamWriter(path / "rank0.safetensors", specs) as writer:
        for name, spec in specs.items():
            t = torch.randn(spec.shape, generator=g)
            writer.write(name, 1 + 0.1 * t if "layernorm" in name or "ln_f" in name else 0.08 * t)
    write_config(path, cfg)
    return path


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("params", [TINY_AWQ, INT8], ids=["awq_int4_g128", "rtn_int8"])
def test_every_family_quantizes_and_runs(family, params, tiny_ckpt, tmp_path):
    out = tmp_path / "q"
    metrics = quantize_checkpoint(tiny_ckpt[family], out, params)
    cfg = json.loads((out / "config.json").read_text())
    desc = ModelDesc.from_config(cfg)
    specs = expected_tensors(desc)
    with safe_open(str(out / "rank0.safetensors"), framework="pt") as f:
        assert list(f.keys()) == sorted(specs)
        for name, spec in specs.items():
            t = f.get_tensor(name)
            assert (tuple(t.shape), str(t.dtype)) == (spec.shape, f"torch.{spec.dtype}"), name
        if desc.moe and params is TINY_AWQ:  # TensorRT-LLM reads only row 0 of an MoE pre-quant
            pqs = f.get_tensor("transformer.layers.0.mlp.fc.prequant_scaling_factor")
            assert torch.equal(pqs, pqs[:1].expand_as(pqs))
    quantized = {n.rpartition(".")[2] for n in specs
                 if desc.quant.quantized(n.rpartition(".")[0]) and not n.endswith(".bias")}
    assert quantized == NAMES[cfg["quantization"]["quant_algo"]]
    assert "*router*" in cfg["quantization"]["exclude_modules"]
    assert metrics["bytes"] == (out / "rank0.safetensors").stat().st_size
    assert len(metrics["layer_seconds"]) == desc.num_layers
    assert bool(metrics.get("alphas")) == (params is TINY_AWQ)
    ref = ReferenceModel.load(tiny_ckpt[family]).forward(IDS)
    got = ReferenceModel.load(out).forward(IDS)
    assert torch.isfinite(got).all()
    if params is INT8:
        assert rel_error(got, ref) < 0.01
        assert (ref.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9
    else:  # random tiny weights: INT4 is coarse, but AWQ must not be worse than plain rounding
        quantize_checkpoint(tiny_ckpt[family], tmp_path / "rtn", QuantParams(method="rtn"))
        rtn = ReferenceModel.load(tmp_path / "rtn").forward(IDS)
        assert rel_error(got, ref) < 1.02 * rel_error(rtn, ref) < 0.3


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("family", ["hunyuan", "qwen2_moe"])
def test_float16_checkpoint_keeps_its_dtypes(family, tiny_hf, tmp_path):
    from trt_pipeline.families.apply import convert_checkpoint

    convert_checkpoint(tiny_hf[family], tmp_path / "f16", "float16")
    quantize_checkpoint(tmp_path / "f16", tmp_path / "q", TINY_AWQ)
    desc = ModelDesc.from_config(json.loads((tmp_path / "q" / "config.json").read_text()))
    with safe_open(str(tmp_path / "q" / "rank0.safetensors"), framework="pt") as f:
        for name, spec in expected_tensors(desc).items():
            assert str(f.get_tensor(name).dtype) == f"torch.{spec.dtype}", name
    ref = ReferenceModel.load(tmp_path / "f16").forward(IDS)
    got = ReferenceModel.load(tmp_path / "q").forward(IDS)
    assert rel_error(got, ref) < 0.3


def test_indivisible_linears_stay_float_and_are_listed(tiny_ckpt, tmp_path):
    base = Checkpoint(tiny_ckpt["llama"]).config
    src = synthetic_ckpt(tmp_path / "src", base, intermediate_size=192)  # proj in = 192
    metrics = quantize_checkpoint(src, tmp_path / "q", QuantParams(method="rtn"))
    excluded = [f"transformer.layers.{i}.mlp.proj" for i in range(2)]
    assert metrics["exclude_modules"] == sorted(
        ["*router*", "*shared_expert_gate*", "*vocab_embedding*", "lm_head", *excluded])
    with safe_open(str(tmp_path / "q" / "rank0.safetensors"), framework="pt") as f:
        assert f.get_tensor(f"{excluded[0]}.weight").dtype == torch.float32
        assert f.get_tensor("transformer.layers.0.mlp.fc.weight").dtype == torch.int8


def test_lm_head_is_quantized_when_not_excluded(tiny_ckpt, tmp_path):
    metrics = quantize_checkpoint(tiny_ckpt["llama"], tmp_path / "q",
                                  QuantParams(method="awq", exclude=(), calib_data="random",
                                              samples=2, seq_len=32))
    assert "lm_head" not in metrics["exclude_modules"]
    with safe_open(str(tmp_path / "q" / "rank0.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").shape == (256, 256)  # [vocab/2, hidden] int8
        assert f.get_tensor("lm_head.prequant_scaling_factor").eq(1).all()
    assert torch.isfinite(ReferenceModel.load(tmp_path / "q").forward(IDS)).all()


def bad(key, src, out, params):
    with pytest.raises(BadInput) as exc:
        quantize_checkpoint(src, out, params)
    assert key in [p.path for p in exc.value.problems], exc.value.render()
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []
    return exc.value.render()


def test_bad_input_fails_with_key_paths_and_writes_nothing(tiny_ckpt, tmp_path):
    llama = Checkpoint(tiny_ckpt["llama"]).config
    out = tmp_path / "out"
    none_divisible = synthetic_ckpt(tmp_path / "w96", llama, hidden_size=96, head_size=24,
                                    intermediate_size=160)
    bad("quantize.group_size", none_divisible, out, QuantParams(method="rtn", group_size=64))
    some = synthetic_ckpt(tmp_path / "w192", llama, intermediate_size=192)
    bad("quantize.group_size", some, out, QuantParams(method="rtn", skip_indivisible=False))
    bad("quantize.bits", tiny_ckpt["llama"], out, QuantParams(method="awq", bits=8))
    bad("quantize.exclude", tiny_ckpt["llama"], out, QuantParams(method="rtn", exclude=("*",)))
    quantize_checkpoint(tiny_ckpt["llama"], tmp_path / "int8", INT8)
    assert "already quantized" in bad("quantize", tmp_path / "int8", out, INT8)


def test_bad_calibration_data(tiny_ckpt, tmp_path):
    llama = Checkpoint(tiny_ckpt["llama"]).config
    with_tok = synthetic_ckpt(tmp_path / "with_tok", llama, vocab_size=2048)
    shutil.copy(DEFAULT_MODEL / "tokenizer.json", with_tok)
    out = tmp_path / "out"
    key = "quantize.calib.data"
    msg = bad(key, tiny_ckpt["llama"], out, QuantParams(calib_data="builtin", samples=2))
    assert "calib.data=random" in msg  # no tokenizer: says how to go on
    bad(key, with_tok, out, QuantParams(calib_data=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text(" \n")
    bad(key, with_tok, out, QuantParams(calib_data=str(tmp_path / "empty.txt")))
    (tmp_path / "short.txt").write_text("To be, or not to be, that is the question.\n" * 20)
    msg = bad(key, with_tok, out, QuantParams(calib_data=str(tmp_path / "short.txt"),
                                              samples=32, seq_len=256))
    assert "32 are needed" in msg
    tiny_vocab = tmp_path / "tiny_vocab"
    shutil.copytree(tiny_ckpt["llama"], tiny_vocab)  # vocab 512 < the tokenizer's 2048
    shutil.copy(DEFAULT_MODEL / "tokenizer.json", tiny_vocab)
    assert "vocab_size 512" in bad(key, tiny_vocab, out, QuantParams())


# ---- the W4A16_AWQ layout, derived here from facts/trtllm.md §7-§8, not from expected_tensors ----

def facts_layout(hf: dict, group: int = 128) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of a float32 checkpoint quantized W4A16_AWQ with lm_head excluded:
    a quantized linear [.., out, in] is `weight` int8 [.., out/2, in] (int4 pairs packed along
    out), `weights_scaling_factor` [.., out, in/group] and `prequant_scaling_factor` [.., in] in
    the model dtype; the router stays float32; everything else keeps its float shape."""
    f32 = "float32"
    hidden, vocab = hf["hidden_size"], hf["vocab_size"]
    head = hf.get("head_dim") or hidden // hf["num_attention_heads"]
    q, kv = hf["num_attention_heads"] * head, hf["num_key_value_heads"] * head
    out = {"transformer.vocab_embedding.weight": (f32, (vocab, hidden)),
           "transformer.ln_f.weight": (f32, (hidden,)), "lm_head.weight": (f32, (vocab, hidden))}

    def linear(name, n_out, n_in, *experts):
        assert n_out % 2 == 0 and n_in % group == 0
        out[f"{name}.weight"] = ("int8", (*experts, n_out // 2, n_in))
        out[f"{name}.weights_scaling_factor"] = (f32, (*experts, n_out, n_in // group))
        out[f"{name}.prequant_scaling_factor"] = (f32, (*experts, n_in))

    for i in range(hf["num_hidden_layers"]):
        p = f"transformer.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (f32, (hidden,))
        out[f"{p}.post_layernorm.weight"] = (f32, (hidden,))
        linear(f"{p}.attention.qkv", q + 2 * kv, hidden)
        if hf.get("attention_bias") or hf["model_type"] == "qwen2_moe":  # Qwen: attn_bias
            out[f"{p}.attention.qkv.bias"] = (f32, (q + 2 * kv,))
        linear(f"{p}.attention.dense", hidden, q)
        experts = hf.get("num_experts") or hf.get("num_local_experts")
        if not experts:
            inter = hf["intermediate_size"]
            linear(f"{p}.mlp.fc", inter, hidden)
            linear(f"{p}.mlp.gate", inter, hidden)
            linear(f"{p}.mlp.proj", hidden, inter)
            continue
        inter = hf.get("moe_intermediate_size") or hf["intermediate_size"]
        out[f"{p}.mlp.router.weight"] = ("float32", (experts, hidden))
        linear(f"{p}.mlp.fc", 2 * inter, hidden, experts)  # [up; gate] stacked per expert
        linear(f"{p}.mlp.proj", hidden, inter, experts)
        shared = hf.get("shared_expert_intermediate_size")
        if shared:
            linear(f"{p}.mlp.shared_expert.fc", 2 * shared, hidden)
            linear(f"{p}.mlp.shared_expert.proj", hidden, shared)
            out[f"{p}.mlp.shared_expert_gate.weight"] = (f32, (1, hidden))
    return out


def dequantize(weight: torch.Tensor, scale: torch.Tensor, group: int = 128) -> torch.Tensor:
    """facts/trtllm.md §8: byte = low nibble (even output row) | high nibble (odd row), signed
    int4; w = q * scale[row, col // group]."""
    b = weight.to(torch.int16)
    low, high = ((b & 0xF) ^ 8) - 8, b >> 4  # sign-extended nibbles
    q = torch.stack([low, high], dim=-2).flatten(-3, -2)  # rows 0, 1 from byte 0, ...
    assert q.min() >= -8 and q.max() <= 7
    return q.float() * scale.float().repeat_interleave(group, dim=-1)


def read_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt / "rank0.safetensors"), framework="pt") as f:
        return {n: f.get_tensor(n) for n in list(f.keys())}


def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_awq_layout_matches_the_facts(family, tiny_hf, tiny_ckpt, tmp_path):
    hf = json.loads((tiny_hf[family] / "config.json").read_text())
    out = tmp_path / "q"
    quantize_checkpoint(tiny_ckpt[family], out, TINY_AWQ)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["quant_algo"], q["group_size"], q["has_zero_point"], q["pre_quant_scale"]) == \
        ("W4A16_AWQ", 128, False, True)
    want = facts_layout(hf)
    t, src = read_tensors(out), read_tensors(tiny_ckpt[family])
    got = {n: (str(x.dtype).removeprefix("torch."), tuple(x.shape)) for n, x in t.items()}
    assert got == want

    # Unpacking by the facts' rule gives back the float model: scales folded into a norm
    # (x / s there, W * s here) cancel column-wise; a pre-quant scale multiplies the input.
    p = "transformer.layers.0"

    def effective(name):
        return dequantize(t[f"{p}.{name}.weight"], t[f"{p}.{name}.weights_scaling_factor"]) * \
            t[f"{p}.{name}.prequant_scaling_factor"].unsqueeze(-2)

    def through_norm(name, norm, weights):
        return (weights * t[f"{p}.{norm}.weight"],
                src[f"{p}.{name}.weight"] * src[f"{p}.{norm}.weight"])

    checks = {"attention.qkv": through_norm("attention.qkv", "input_layernorm",
                                            effective("attention.qkv")),
              "attention.dense": (effective("attention.dense"), src[f"{p}.attention.dense.weight"])}
    if family == "llama":  # GQA: dense's scale cannot fold into v, so it is a pre-quant scale
        assert not t[f"{p}.attention.dense.prequant_scaling_factor"].eq(1).all()
        checks["mlp.fc"] = through_norm("mlp.fc", "post_layernorm", effective("mlp.fc"))
    else:  # expert gate rows [I, 2I): only the post-norm fold applies (up rows also hold 1/s)
        inter = hf["moe_intermediate_size"]
        eff, ref = through_norm("mlp.fc", "post_layernorm", effective("mlp.fc"))
        checks["mlp.fc (gate rows)"] = (eff[:, inter:], ref[:, inter:])
        pqs = t[f"{p}.mlp.fc.prequant_scaling_factor"]  # TensorRT-LLM reads only row 0
        assert torch.equal(pqs, pqs[:1].expand_as(pqs))
    for name, (eff, ref) in checks.items():
        assert rel_rms(eff, ref) < 0.2, name  # INT4 g128 error ~0.11; a wrong layout ~1.4
