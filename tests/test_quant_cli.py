"""`build-engine quantize` end to end on the trained default model: the JSON figures it prints, the
W4A16_AWQ checkpoint it writes (facts/trtllm.md §8), and the quality gate, which fails with exit
code 1 and leaves no output directory behind."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "trt_pipeline" / "data" / "default_model"
SCRIPT = Path(sys.executable).parent / "build-engine"
ENTRY = [str(SCRIPT)] if SCRIPT.exists() else \
    [sys.executable, "-c", "from trt_pipeline.cli import main; main()"]
TINY_CALIB = ["--method", "awq", "--calib", "builtin", "--samples", "4", "--seq-len", "64"]


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    from trt_pipeline.families.apply import convert_checkpoint

    out = tmp_path_factory.mktemp("default") / "float32"
    convert_checkpoint(DEFAULT_MODEL, out, "float32")
    return out


def build_engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ENTRY, *args], capture_output=True, text=True, timeout=300)


def test_quantize_awq_json_and_checkpoint(float_ckpt, tmp_path):
    out = tmp_path / "awq"
    done = build_engine("quantize", str(float_ckpt), str(out), *TINY_CALIB, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"out_dir", "scheme", "seconds", "ppl_float", "ppl_quant", "ppl_ratio",
                           "top1_agreement", "tokens"}
    assert report["out_dir"] == str(out)
    assert report["scheme"] == "int4_awq"
    # builtin held-out text, 1024 tokens in windows of 256: 4 windows x 255 next-token targets
    assert report["tokens"] == 4 * 255
    assert math.isclose(report["ppl_ratio"], report["ppl_quant"] / report["ppl_float"],
                        rel_tol=1e-9)
    assert 1 < report["ppl_float"] < 2048  # a trained model: better than uniform over the vocab
    assert 0.8 < report["ppl_ratio"] < 1.25 and 0.75 <= report["top1_agreement"] <= 1

    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization"]
    assert (q["quant_algo"], q["group_size"], q["has_zero_point"], q["pre_quant_scale"]) == \
        ("W4A16_AWQ", 128, False, True)
    assert "lm_head" in q["exclude_modules"]
    # default model: hidden 128, 4 q heads + 2 kv heads of 32 -> qkv [256, 128]; packed [out/2, in]
    with safe_open(str(out / "rank0.safetensors"), framework="pt") as f:
        qkv = f.get_tensor("transformer.layers.0.attention.qkv.weight")
        assert (str(qkv.dtype), tuple(qkv.shape)) == ("torch.int8", (128, 128))
        sf = f.get_tensor("transformer.layers.0.attention.qkv.weights_scaling_factor")
        assert tuple(sf.shape) == (256, 1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_quality_gate_failure_writes_nothing(float_ckpt, tmp_path):
    out = tmp_path / "gated"
    done = build_engine("quantize", str(float_ckpt), str(out), *TINY_CALIB, "--gate",
                        "--max-ppl-ratio", "0")  # a perplexity ratio is always > 0
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "quality gate" in done.stderr and "nothing written" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp dir left beside it either


def test_no_exclude_quantizes_the_head_and_conflicts_with_exclude(float_ckpt, tmp_path):
    both = build_engine("quantize", str(float_ckpt), str(tmp_path / "x"), "--method", "rtn",
                        "--no-exclude", "--exclude", "lm_head")
    assert both.returncode == 2 and "--no-exclude" in both.stderr
    assert "Traceback" not in both.stderr and not (tmp_path / "x").exists()
    done = build_engine("quantize", str(float_ckpt), str(tmp_path / "q"), "--method", "rtn",
                        "--no-exclude", "--json")
    assert done.returncode == 0, done.stderr
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert not any(m == "lm_head" for m in cfg["quantization"]["exclude_modules"])
    with safe_open(str(tmp_path / "q" / "rank0.safetensors"), "pt") as f:
        assert str(f.get_tensor("lm_head.weight").dtype) == "torch.int8"
