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
