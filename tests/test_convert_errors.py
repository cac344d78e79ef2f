"""Broken model inputs: each refused with a clear message, and no output directory left behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from trt_pipeline.errors import BadInput
from trt_pipeline.families.apply import convert_checkpoint
from trt_pipeline.fsio import atomic_output_dir


@pytest.fixture
def model(tiny_hf, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_hf["llama"], d)
    return d


def refuse(model_dir, tmp_path, *needles, dtype="float32"):
    out = tmp_path / "out"
    with pytest.raises(BadInput) as info, atomic_output_dir(out) as tmp:
        convert_checkpoint(model_dir, tmp, dtype)
    text = info.value.render()
    for n in needles:
        assert n in text, text
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return text


def edit_weights(model_dir, fn):
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_truncated_shard(model, tmp_path):
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    refuse(model, tmp_path, "model.safetensors is not a readable safetensors file")


def test_missing_shard_of_an_index(model, tmp_path):
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    refuse(model, tmp_path, "missing shard model-00002-of-00002.safetensors")


def test_shape_mismatch_and_missing_tensor_reported_together(model, tmp_path):
    def fn(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(100, 256)
        del t["model.layers.1.mlp.up_proj.weight"]

    edit_weights(model, fn)
    refuse(model, tmp_path, "2 problems", "transformer.layers.0.attention.qkv.weight: sources",
           "implies [512, 256]", "missing tensor model.layers.1.mlp.up_proj.weight")


def test_nan_weights(model, tmp_path):
    def fn(t):
        t["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")

    edit_weights(model, fn)
    refuse(model, tmp_path, "transformer.layers.1.mlp.proj.weight",
           "model.layers.1.mlp.down_proj.weight", "NaN or Inf")


def test_integer_weights(model, tmp_path):
    edit_weights(model, lambda t: t.update({"model.norm.weight": torch.ones(256,
                                                                            dtype=torch.int32)}))
    refuse(model, tmp_path, "model.norm.weight has dtype I32; expected a float checkpoint")


def test_pickle_only_checkpoint_is_never_loaded(model, tmp_path):
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"not even read")
    refuse(model, tmp_path, "pickle", "never loaded")


def test_unsupported_architecture_and_prequantized(model, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"],
                                                   "model_type": "falcon"}))
    refuse(model, tmp_path, "unsupported architecture 'FalconForCausalLM'", "Supported: llama")
    (model / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
        "quant_method": "awq"}}))
    refuse(model, tmp_path, "already quantized (awq)")


def test_non_float_dtype_request(model, tmp_path):
    refuse(model, tmp_path, "dtype: got 'int8'", dtype="int8")
